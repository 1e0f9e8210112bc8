"""ONNX export: the graph of a network, its metadata, and its INT8 form. This module writes graphs; running them
(onnxruntime, the cache, the check against PyTorch) is `pfanet.runtime`'s, and `pfanet export` as a whole is
`pfanet.export_weights.export_weights`.

The exported graph is the network alone: pre- and post-processing stay in `pfanet.transforms`, and the input
convention the graph expects (channel order, mean, std, size) is stored in the model's metadata_props, so any
consumer can reproduce it. `Predictor(weights="model.onnx")` reads that metadata (`parse_metadata`) and runs the same
pipeline with onnxruntime in place of PyTorch.

Two variants change what the graph itself does:
- `output="probability"` appends the sigmoid (for runtimes that want maps, not logits);
- `for_rembg=True` makes a drop-in model for rembg's custom-model option: it takes rembg's input convention
  (RGB / 255, ImageNet mean/std, 320 x 320), converts it to the weights' convention inside the graph, resizes to the
  weights' size, and ends in a sigmoid.

`quantize_onnx` turns an exported graph into a statically quantised INT8 one (onnxruntime's quantiser, calibrated on
real images through `pfanet.transforms.preprocess`); it keeps the metadata, so `Predictor` runs it like any export.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pathlib
import tempfile
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import __version__
from .io import atomic_write
from .transforms import IMAGENET_INPUT, InputSpec, normalise, resize
from .weights import WeightsError

log = logging.getLogger(__name__)

META_KEY = "pfanet"
FORMAT = "pfanet-onnx"
FORMAT_VERSION = 1
OUTPUTS = ("logits", "probability")
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 17
INT8_FORMATS = ("qdq", "qoperator")  # onnxruntime QuantFormat.QDQ / QuantFormat.QOperator
DEFAULT_CALIBRATION_COUNT = 32
# rembg's u2net sessions (session_simple.py): RGB resized to 320 x 320 (LANCZOS, aspect ratio not kept), divided by
# the image's maximum (255 for ordinary photos), then ImageNet mean/std. In 0..255 units that is this InputSpec.
REMBG_INPUT = dataclasses.replace(IMAGENET_INPUT, size=320)


class ConvertInput(nn.Module):
    """Re-express a batch given in convention `src` in convention `dst`, as one per-channel affine map.

    pixel = x_src * std_src + mean_src (in src's channel order), reordered to dst's order, then
    x_dst = (pixel - mean_dst) / std_dst.
    """

    def __init__(self, src: InputSpec, dst: InputSpec):
        super().__init__()
        self.flip = src.channel_order != dst.channel_order
        order = (2, 1, 0) if self.flip else (0, 1, 2)  # dst channel c holds src channel order[c]
        scale = [src.std[order[c]] / dst.std[c] for c in range(3)]
        shift = [(src.mean[order[c]] - dst.mean[c]) / dst.std[c] for c in range(3)]
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip:
            x = x[:, [2, 1, 0]]
        return x * self.scale + self.shift


class ExportedNetwork(nn.Module):
    """What goes into the ONNX graph: [input conversion, resize] -> PFANet -> [sigmoid].

    Args:
        model: the network (eval mode).
        output: "logits" (the network's own output) or "probability" (sigmoid applied).
        convert: converts the graph's input convention to the weights' one (None: the graph takes the weights' one).
        size: resize the input to size x size before the network (None: run at the input's size).
    """

    def __init__(self, model: nn.Module, output: str = "logits", convert: ConvertInput | None = None,
                 size: int | None = None):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.model, self.output, self.convert, self.size = model, output, convert, size
        # Inference only. The exporter restores the wrapper's mode afterwards and that propagates to the network:
        # a wrapper left in training mode would switch PFANet's dropout on for later PyTorch runs.
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.convert is not None:
            x = self.convert(x)
        if self.size is not None:
            x = resize(x, self.size)  # the same bilinear resize as preprocessing
        z = self.model(x)
        return torch.sigmoid(z) if self.output == "probability" else z


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """The graph to export and the description that goes into its metadata."""

    network: ExportedNetwork
    input_spec: InputSpec  # the convention of the graph's input
    output: str
    dynamic_size: bool
    for_rembg: bool


def plan_export(model: nn.Module, spec: InputSpec, *, size: int | None = None, output: str = "logits",
                for_rembg: bool = False, dynamic_size: bool = True) -> ExportPlan:
    """Decide the exported graph for weights with input convention `spec`.

    Args:
        size: input size recorded in the metadata and used to trace (default: the weights' size). With
            `for_rembg` it is the size the graph resizes rembg's 320 x 320 input to before the network.
        output: "logits" or "probability".
        for_rembg: take rembg's input convention (`REMBG_INPUT`) and output probabilities (see module docstring).
        dynamic_size: leave height and width free (multiples of 32); the batch axis is always dynamic.
    """
    model = model.eval()
    net_size = size or spec.size
    if for_rembg:
        convert = ConvertInput(REMBG_INPUT, spec)
        network = ExportedNetwork(model, "probability", convert, size=net_size)
        return ExportPlan(network, REMBG_INPUT, "probability", dynamic_size, True)
    input_spec = dataclasses.replace(spec, size=net_size)
    return ExportPlan(ExportedNetwork(model, output), input_spec, output, dynamic_size, False)


def metadata(plan: ExportPlan, weights_meta: dict, exporter: str, opset: int) -> dict[str, str]:
    """The ONNX metadata_props: one JSON entry for code (`pfanet`) and flat entries for people reading them."""
    spec = plan.input_spec
    full = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "input": spec.to_dict(),
        "output": plan.output,
        "dynamic_size": plan.dynamic_size,
        "for_rembg": plan.for_rembg,
        "config": weights_meta.get("config", {}),
        "weights_input": weights_meta.get("input", {}),
        "training": weights_meta.get("training", {}),
        "weights_sha256": weights_meta.get("weights_sha256"),  # of the file exported (None: not from a file)
        "exporter": exporter,
        "opset": opset,
        "torch": torch.__version__,
        "pfanet_version": __version__,
    }
    flat = {
        META_KEY: json.dumps(full, sort_keys=True),
        "input_layout": "NCHW float32; x = (pixel - mean) / std, pixels 0..255 in input_channel_order",
        "input_channel_order": spec.channel_order,
        "input_mean": ",".join(f"{v:g}" for v in spec.mean),
        "input_std": ",".join(f"{v:g}" for v in spec.std),
        "input_size": str(spec.size),
        "output": plan.output,
    }
    # the PyTorch port's convention pads and resizes differently (InputSpec, docs/WEIGHTS.md)
    flat |= {f"input_{k}": v for k, v in spec.to_dict().items() if k in ("pad", "resize")}
    return flat


def _graph_bytes(plan: ExportPlan, example: torch.Tensor, exporter: str, opset: int) -> bytes:
    """Serialised ONNX graph of `plan.network` from one of torch's two exporters."""
    dims = {0: "batch"} | ({2: "height", 3: "width"} if plan.dynamic_size else {})
    if exporter == "torchscript":
        buf = io.BytesIO()
        with warnings.catch_warnings():
            # Expected and harmless here: the exporter's deprecation notice; the size checks in PFANet.check_input
            # traced as constants (they hold for every multiple of 32); instance_norm has no train/eval difference.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*instance_norm.*train=True.*")
            torch.onnx.export(plan.network, (example,), buf, dynamo=False, input_names=["input"],
                              output_names=[plan.output], dynamic_axes={"input": dims, plan.output: dims},
                              opset_version=opset, do_constant_folding=True)
        return buf.getvalue()
    if exporter == "dynamo":
        from torch.export import Dim

        try:
            import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        except ImportError as e:
            raise RuntimeError("--exporter dynamo needs the onnxscript package: pip install onnxscript") from e
        shapes = {0: Dim("batch", min=1, max=4096)}
        if plan.dynamic_size:  # height and width are multiples of 32 (PFANet's stride)
            shapes |= {2: 32 * Dim("h32", min=1, max=512), 3: 32 * Dim("w32", min=1, max=512)}
        program = torch.onnx.export(plan.network, (example,), dynamo=True, input_names=["input"],
                                    output_names=[plan.output], dynamic_shapes={"x": shapes}, opset_version=opset,
                                    external_data=False, verbose=False)
        return program.model_proto.SerializeToString()
    raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")


def export_onnx(plan: ExportPlan, path: str | os.PathLike, weights_meta: dict | None = None, *,
                exporter: str = "torchscript", opset: int = DEFAULT_OPSET) -> pathlib.Path:
    """Write `plan` as an ONNX file with its metadata; returns the path.

    The TorchScript exporter is the default: on this network it is as exact as the dynamo one (both ~4e-6 max
    |logit| difference to PyTorch), takes half the CPU time and needs no onnxscript.
    """
    import onnx

    example = torch.from_numpy(example_batch(plan.input_spec, 2))
    proto = onnx.load_from_string(_graph_bytes(plan, example, exporter, opset))
    proto.doc_string = ("PFANet saliency network (Zhao & Wu, CVPR 2019), exported by pfanet. Input convention and "
                        "provenance in metadata_props (key 'pfanet').")
    del proto.metadata_props[:]
    for key, value in metadata(plan, weights_meta or {}, exporter, opset).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    path = pathlib.Path(path)
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return path


def example_batch(spec: InputSpec, n: int, seed: int = 0) -> np.ndarray:
    """n random images of spec.size, as the graph's input (uint8-like pixels through the spec's normalisation)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, spec.size, spec.size, 3), dtype=np.uint8)
    return np.stack([normalise(p, spec) for p in pixels])


def calibration_images(source: str | os.PathLike, count: int = DEFAULT_CALIBRATION_COUNT) -> list[pathlib.Path]:
    """The first `count` images of a list file ("image mask" per line), a benchmark folder or a folder of images."""
    from .data import DataError, find_folder_pairs, read_pairs
    from .io import list_images

    source = pathlib.Path(source)
    if source.is_dir() and find_folder_pairs(source) is None:
        images = list_images(source)
    else:
        images = [img for img, _ in read_pairs(source)]
    if not images:
        raise DataError(f"{source}: no calibration images")
    return images[:count]


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, images: list[str | os.PathLike], *,
                  per_channel: bool = True, reduce_range: bool = True, quant_format: str = "qdq",
                  progress: bool = True) -> pathlib.Path:
    """Statically quantise an exported graph to INT8 with onnxruntime; returns the path written.

    Activations become uint8 and weights int8, with ranges calibrated (min/max) on `images`, each put through
    `pfanet.transforms.preprocess` in the graph's input convention, one at a time, as `Predictor` would. Two layers
    stay float:
    - the last convolution (the logits): 8 bits there would quantise the map itself, near logit 0 in steps of
      several gray levels;
    - the per-image normalisation (InstanceNormalization): it has no integer kernel, and the range of its input
      changes from image to image by design.

    Args:
        src: an fp32 .onnx written by `export_onnx`.
        dst: the INT8 .onnx to write (metadata copied from `src`, plus an "int8" entry saying how it was made).
        images: calibration images (paths), e.g. from `calibration_images`.
        per_channel: one weight scale per output channel (instead of one per tensor).
        reduce_range: 7-bit weights. onnxruntime's uint8 x int8 kernels on CPUs without AVX-512 VNNI / AVX-VNNI
            add pairs of products in int16 (vpmaddubsw), which saturates with full-range weights; on an AVX2-only
            machine that moved maps of the shipped model by up to 85 gray levels (docs/PERFORMANCE.md).
        quant_format: "qdq" (QuantizeLinear/DequantizeLinear pairs around float ops, fused by onnxruntime) or
            "qoperator" (QLinearConv and friends).

    `pfanet export --int8` then copies the graph to the cache entry of its weights (`pfanet.runtime.cache_int8_graph`).
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .io import ImageError, load_image
    from .transforms import preprocess

    if quant_format not in INT8_FORMATS:
        raise ValueError(f"quant_format must be one of {INT8_FORMATS}, got {quant_format!r}")
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    source = onnx.load(str(src), load_external_data=False)
    meta = parse_metadata({p.key: p.value for p in source.metadata_props}, src)
    spec, input_name = InputSpec.from_dict(meta["input"]), source.graph.input[0].name
    del source

    class Reader(CalibrationDataReader):
        """One preprocessed image per call; unreadable files are skipped with a warning."""

        def __init__(self):
            self.used = 0
            self.it = iter(tqdm(images, desc="calibrating", unit="img", disable=not progress, dynamic_ncols=True))

        def get_next(self) -> dict[str, np.ndarray] | None:
            for path in self.it:
                try:
                    rgb = load_image(path)
                except ImageError as e:
                    log.warning("calibration: skipped %s", e)
                    continue
                self.used += 1
                return {input_name: preprocess(rgb, spec)[None].numpy()}
            return None

    registry = QDQRegistry if quant_format == "qdq" else QLinearOpsRegistry
    op_types = sorted(set(registry) - {"InstanceNormalization"})
    with tempfile.TemporaryDirectory(prefix="pfanet-int8-") as tmp:
        pre = pathlib.Path(tmp) / "pre.onnx"
        # Shape inference and graph clean-up, as onnxruntime recommends; its symbolic shape inference gives up on
        # the free height and width (ONNX's own shape inference still runs).
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        outputs = {o.name for o in graph.output}
        logits_nodes = [n.name for n in graph.node if outputs & set(n.output)]
        out = pathlib.Path(tmp) / "int8.onnx"
        fmt = QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator
        reader = Reader()
        try:
            quantize_static(
                str(pre), str(out), reader, quant_format=fmt, op_types_to_quantize=op_types, per_channel=per_channel,
                reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=logits_nodes)  # min/max calibration keeps two numbers per tensor and image
        except ValueError:
            if reader.used == 0:  # onnxruntime's own message ("No data is collected") would not say why
                raise ImageError(f"none of the {len(images)} calibration images could be read") from None
            raise
        proto = onnx.load(str(out))
    meta = dict(meta, int8={"format": quant_format, "per_channel": per_channel, "reduce_range": reduce_range,
                            "activations": "uint8", "weights": "int8", "calibration": "minmax",
                            "calibration_images": reader.used, "float_nodes": logits_nodes,
                            "onnxruntime": ort.__version__})
    del proto.metadata_props[:]
    for prop in onnx.load(str(src), load_external_data=False).metadata_props:
        proto.metadata_props.add(key=prop.key, value=json.dumps(meta, sort_keys=True) if prop.key == META_KEY
                                 else prop.value)
    proto.doc_string = ("PFANet saliency network (Zhao & Wu, CVPR 2019), exported by pfanet and statically quantised "
                        "to INT8. Input convention and provenance in metadata_props (key 'pfanet').")
    onnx.checker.check_model(proto)
    atomic_write(dst, lambda tmp: onnx.save(proto, tmp))
    return dst


def parse_metadata(props: Mapping[str, str], path: str | os.PathLike) -> dict:
    """The pfanet metadata among a graph's metadata_props (key -> value); an error naming the file when it is not
    ours or is damaged."""
    if META_KEY not in props:
        raise WeightsError(f"{path}: ONNX model without pfanet metadata (export one with `pfanet export`)")
    try:
        meta = json.loads(props[META_KEY])
        InputSpec.from_dict(meta["input"])
        if meta["output"] not in OUTPUTS:
            raise ValueError(f"unknown output {meta['output']!r}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{path}: bad pfanet metadata in the ONNX model ({e})") from e
    return meta


def graph_metadata(path: str | os.PathLike) -> dict:
    """The pfanet metadata of an .onnx file, read without its weights."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return parse_metadata({p.key: p.value for p in proto.metadata_props}, path)
