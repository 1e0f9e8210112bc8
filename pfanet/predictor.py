"""Predictor: load weights once, pre-process, run batches, post-process to maps at the original size.

The CLI, the server, the exporters' parity checks, validation during training and distributed jobs all go through
this class, so there is one copy of the pipeline.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pathlib
import tempfile
import threading
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from . import hardware
from .io import load_image, to_rgb
from .model import PFANet
from .transforms import InputSpec, postprocess, preprocess

DEFAULT_WEIGHTS = pathlib.Path(__file__).parent / "weights" / "pfanet_duts.safetensors"
# "auto" picks the fastest faithful path measured (docs/PERFORMANCE.md): on the CPU, the INT8 graph made from the
# weights where the CPU has VNNI or AMX (`hardware.int8_instructions`), else ONNX Runtime fp32; on a GPU, PyTorch with
# channels_last + bf16 autocast. "torch" is plain PyTorch fp32 (the reference every path is checked against); "int8"
# needs an INT8 graph made from these weights (beside them, or cached by `pfanet export --int8`).
BACKENDS = ("auto", "torch", "onnxruntime", "int8")

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | bytes | np.ndarray | Image.Image


def as_rgb(image: ImageInput) -> np.ndarray:
    """Paths, encoded bytes, PIL images and numpy arrays (HxW gray, HxWx3 RGB, HxWx4 RGBA) -> (H, W, 3) uint8."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8, got {image.dtype}")
        if image.ndim == 2:
            return np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim == 3 and image.shape[2] in (3, 4):
            return to_rgb(Image.fromarray(image))
        raise ValueError(f"numpy images must be HxW, HxWx3 or HxWx4, got shape {image.shape}")
    if isinstance(image, Image.Image):
        return to_rgb(image)
    return load_image(image)


class Predictor:
    """Saliency maps from a trained PFANet.

    Inputs may be paths, encoded bytes (both decoded by `pfanet.io.load_image`, EXIF orientation applied), PIL images
    or uint8 numpy arrays (used as given). Maps come back as (H, W) uint8 at each input's own size.

    Safe to share between threads (the HTTP server does): the forward pass holds a lock, so concurrent callers decode
    and post-process in parallel but run the network one batch at a time. That bounds memory to one batch of
    activations and avoids several forwards fighting over the same cores; callers wanting more throughput batch.

    Args:
        weights: a weights file (.safetensors, official .h5, .pth), or None for the shipped default model.
        device: "cpu", "cuda", ... (default: cuda when available).
        batch_size: images per forward pass in `predict_batch`.
        model: an already built model (used as is, e.g. during training); needs `spec`. It stays on its device
            unless `device` is given (then it is moved there), and in its mode: eval only during each forward pass,
            its own mode (e.g. train) restored after.
        spec: the input convention of `model`.
        backend: "torch" (default here: plain PyTorch), "onnxruntime" (the weights exported once to an ONNX graph,
            checked against PyTorch and cached by content under `onnx_cache_dir()`), "int8" (an INT8 graph made from
            these weights: `int8_path` beside them, or `int8_cache_path` left by `pfanet export --int8`; an error
            when there is none), or "auto" (what `pfanet predict` and `pfanet serve` use: on the CPU "int8" where
            the CPU has VNNI or AMX and such a graph exists, else "onnxruntime"; on a GPU PyTorch with channels_last
            and bf16 autocast). Weights that are already .onnx always run on onnxruntime; a model passed in memory
            always on PyTorch. `backend` and `backend_reason` say what was chosen and why (logged too).
        flip: average each map with the map of the horizontally flipped image (test-time augmentation; the
            network runs on twice the images). On the shipped model: ECSSD val max F 0.8407 -> 0.8523, DUTS-TR val
            (200) 0.8687 -> 0.8721, MAE about the same (docs/BENCHMARKS.md).
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: str | None = None, batch_size: int = 4,
                 model: PFANet | None = None, spec: InputSpec | None = None, backend: str = "torch",
                 flip: bool = False):
        self.flip = flip
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        own = model is None
        if own:
            if weights is None and not DEFAULT_WEIGHTS.is_file():
                from .weights import WeightsError

                raise WeightsError(f"no default model: {DEFAULT_WEIGHTS} is missing (not installed with this copy "
                                   "of pfanet); pass a weights file (--weights FILE: a .safetensors from `pfanet "
                                   "train` or `pfanet convert`, or an official .h5)")
            path = pathlib.Path(weights) if weights is not None else DEFAULT_WEIGHTS
            if path.suffix.lower() == ".onnx":  # an exported graph: onnxruntime behind the same `logits` hook
                from .export import load_onnx

                model, spec, self.meta = load_onnx(path, self.device)
                self.backend = "int8" if "int8" in self.meta else "onnxruntime"
                self.backend_reason = "the weights are an ONNX graph"
            else:
                model, spec = self._load(path, backend)
            self.source = str(path)
            log.info("backend %s: %s", self.backend, self.backend_reason)
        else:
            self.meta, self.source = {}, "a model passed in memory"
            self.backend, self.backend_reason = "torch", "a model passed in memory"
            if device is None:  # where the caller's model is, not where a default would move it
                self.device = next(model.parameters(), torch.empty(0)).device
        if spec is None:
            raise ValueError("a model passed directly needs its InputSpec")
        self.model, self.spec, self.batch_size = model.to(self.device), spec, batch_size
        if own:
            self.model.eval()
        # On a GPU the fast path is NHWC convolutions in bf16; the logits come back as float32 all the same.
        self.gpu_fast = own and backend == "auto" and self.backend == "torch" and self.device.type == "cuda"
        if self.gpu_fast:
            self.model.to(memory_format=torch.channels_last)
        self._lock = threading.Lock()

    def _load(self, path: pathlib.Path, backend: str) -> tuple[torch.nn.Module, InputSpec]:
        """The network to run for `backend` and its input convention; sets `meta`, `backend`, `backend_reason`.

        A graph (INT8, or the cached fp32 export) is used without building the PyTorch model.
        """
        from .weights import load_checkpoint  # here to keep `import pfanet.predictor` light

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        sha = file_sha256(path)
        checkpoint = functools.cache(lambda: load_checkpoint(path))
        self.backend, self.backend_reason = self._auto_backend() if backend == "auto" else (backend, "asked for")
        net = None
        if self.backend == "int8":
            net = find_int8_graph(path, sha, self.device)
            if net is not None:
                self.backend_reason += f"; {net.path} was made from these weights"
            elif backend == "int8":
                from .weights import WeightsError

                raise WeightsError(f"{path}: no INT8 graph made from these weights (looked for {int8_path(path)} "
                                   f"and {int8_cache_path(sha)}); make one with `pfanet export --weights {path} "
                                   "--int8 --calibration TRAIN_LIST -o FILE.onnx`")
            else:
                self.backend = "onnxruntime"
                self.backend_reason += ", but no INT8 graph was made from these weights (`pfanet export --int8`): fp32"
        if self.backend == "onnxruntime":
            try:
                net = self._fp32_graph(path, sha, checkpoint)
            except Exception as e:  # noqa: BLE001 -- a read-only cache, a failed export or check: still predict
                log.warning("%s: running on PyTorch, not onnxruntime (%s: %s)", path, type(e).__name__, e)
                self.backend, self.backend_reason = "torch", f"onnxruntime failed ({type(e).__name__})"
        if net is not None:
            m = net.meta
            self.meta = {"config": m["config"], "input": m["weights_input"], "training": m["training"],
                         "weights_sha256": sha}
            return net, net.spec
        model, spec, meta = checkpoint()
        self.meta = dict(meta, weights_sha256=sha)
        return model, spec

    def _auto_backend(self) -> tuple[str, str]:
        """What "auto" wants here, and why (before looking for graphs)."""
        if self.device.type != "cpu":
            return "torch", f"{self.device.type}: PyTorch, channels_last + bf16 autocast"
        if not _has_onnxruntime():
            return "torch", "onnxruntime is not installed"
        flag = hardware.int8_instructions()
        if flag:
            return "int8", f"auto: the CPU has {flag}"
        return "onnxruntime", f"auto: fp32, the CPU has none of {', '.join(hardware.INT8_FLAGS)} (INT8 no faster)"

    def _fp32_graph(self, path: pathlib.Path, sha: str, checkpoint) -> torch.nn.Module:
        """The cached fp32 ONNX graph of the weights, exported and checked against PyTorch when first made (again
        when the cached file cannot be read)."""
        from .export import PARITY_SIZE, PARITY_TOLERANCE, OnnxNetwork, check_parity, export_onnx, plan_export
        from .weights import WeightsError

        graph = onnx_cache_dir() / f"{_content_key(path, sha)}.onnx"
        if graph.is_file():
            try:
                return OnnxNetwork(graph, self.device, optimized=optimized_path(graph))
            except WeightsError as e:
                log.warning("damaged cache entry, exported again: %s", e)
                graph.unlink(missing_ok=True)
        model, spec, meta = checkpoint()
        plan = plan_export(model, spec)
        graph.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=graph.parent, prefix=f".{graph.stem}.", suffix=".onnx")
        os.close(fd)
        try:
            export_onnx(plan, tmp, dict(meta, weights_sha256=sha))
            diff = check_parity(plan, tmp, n=1, size=PARITY_SIZE)
            if not diff <= PARITY_TOLERANCE:  # NaN fails too
                raise ValueError(f"the exported graph differs from PyTorch by {diff:.2e} (> {PARITY_TOLERANCE:g})"
                                 f" on a {PARITY_SIZE}x{PARITY_SIZE} image; not cached")
            os.replace(tmp, graph)
        finally:
            pathlib.Path(tmp).unlink(missing_ok=True)
        return OnnxNetwork(graph, self.device, optimized=optimized_path(graph))

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Network logits for a preprocessed batch (N, 3, size, size); one caller at a time. With `flip`, the
        logits of the mean of the two probability maps (the image's and its mirror's, mirrored back)."""
        if not self.flip:
            return self._forward(x)
        z = self._forward(torch.cat([x, x.flip(-1)]))
        p = (torch.sigmoid(z[: len(x)]) + torch.sigmoid(z[len(x) :]).flip(-1)) / 2
        return torch.logit(p, eps=1e-7)  # postprocess's sigmoid gives the mean back

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        fast = torch.autocast("cuda", dtype=torch.bfloat16) if self.gpu_fast else contextlib.nullcontext()
        with self._lock, fast:
            if self.gpu_fast:
                x = x.contiguous(memory_format=torch.channels_last)
            training = self.model.training  # a caller's model may be training: eval for this pass only
            self.model.eval()
            try:
                return self.model(x).float().cpu()
            finally:
                self.model.train(training)

    def predict(self, image: ImageInput) -> np.ndarray:
        """One image -> (H, W) uint8 saliency map at the image's original size."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[ImageInput]) -> list[np.ndarray]:
        """Images -> maps, run in batches of `batch_size`."""
        out = []
        for start in range(0, len(images), self.batch_size):
            rgbs = [as_rgb(im) for im in images[start : start + self.batch_size]]
            out.extend(self.predict_rgb(rgbs))
        return out

    def predict_rgb(self, rgbs: Iterable[np.ndarray]) -> list[np.ndarray]:
        """Decoded (H, W, 3) uint8 RGB images -> maps (one forward pass for all of them)."""
        rgbs = list(rgbs)
        if not rgbs:
            return []
        # On the onnxruntime paths PyTorch only pre- and post-processes, on one thread: its OpenMP workers otherwise
        # take the cores from onnxruntime's (24 photos: 20.3 s -> 16.3 s, docs/PERFORMANCE.md).
        one_thread = functools.partial(_torch_threads, 1) if self.backend != "torch" else contextlib.nullcontext
        with one_thread():
            x = torch.stack([preprocess(im, self.spec) for im in rgbs])
        logits = self.logits(x)
        with one_thread():
            return [postprocess(z, *im.shape[:2], self.spec.pad) for z, im in zip(logits, rgbs)]

    def outputs(self, image: ImageInput, kinds: Sequence[str] = ("map",), threshold: float | None = None
                ) -> dict[str, np.ndarray]:
        """One image -> the requested renderings (see `pfanet.outputs.OUTPUT_KINDS`), e.g. {"cutout": RGBA array}.

        `threshold` (0..255) binarises the mask; None is the adaptive threshold.
        """
        from .outputs import render

        rgb = as_rgb(image)
        return render(rgb, self.predict_rgb([rgb])[0], kinds, threshold)


@contextlib.contextmanager
def _torch_threads(n: int):
    """PyTorch's intra-op threads set to n inside the block."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


def onnx_cache_dir() -> pathlib.Path:
    """Where the onnxruntime backend keeps the graphs it exports: $PFANET_CACHE, else $XDG_CACHE_HOME/pfanet (or
    ~/.cache/pfanet), subfolder onnx."""
    root = os.environ.get("PFANET_CACHE") or pathlib.Path(os.environ.get("XDG_CACHE_HOME") or
                                                          pathlib.Path.home() / ".cache") / "pfanet"
    return pathlib.Path(root) / "onnx"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex): what ties a graph to the weights it was made from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_key(path: pathlib.Path, sha: str | None = None) -> str:
    """The weights' bytes (`sha`: their SHA-256, when known) and the versions that shape the exported graph: a
    changed file is exported again."""
    import onnxruntime

    from . import __version__

    versions = f"{__version__} {torch.__version__} {onnxruntime.__version__}"
    return hashlib.sha256(f"{sha or file_sha256(path)} {versions}".encode()).hexdigest()[:32]


def int8_path(weights: str | os.PathLike) -> pathlib.Path:
    """Where an INT8 graph shipped with a weights file lies: beside it, model.safetensors -> model.int8.onnx."""
    return pathlib.Path(weights).with_suffix(".int8.onnx")


def int8_cache_path(sha: str) -> pathlib.Path:
    """The cache entry `pfanet export --int8` leaves for the weights with SHA-256 `sha`."""
    return onnx_cache_dir() / f"{sha}.int8.onnx"


def optimized_path(graph: pathlib.Path) -> pathlib.Path:
    """Where onnxruntime's optimised form of `graph` is kept (`OnnxNetwork(optimized=...)`): named by the graph file
    (path, size, time) and by what the optimisation depends on (onnxruntime's version, the CPU's flags)."""
    import onnxruntime

    stat = graph.stat()
    made_for = (f"{graph.resolve()} {stat.st_size} {stat.st_mtime_ns} {onnxruntime.__version__} "
                f"{sorted(hardware.cpu_flags())}")
    return onnx_cache_dir() / "optimized" / f"{hashlib.sha256(made_for.encode()).hexdigest()[:32]}.onnx"


def find_int8_graph(path: pathlib.Path, sha: str, device: torch.device | str = "cpu") -> torch.nn.Module | None:
    """An INT8 graph made from exactly these weights (SHA-256 `sha`, stored in the graph's metadata), at their input
    convention: the one beside them, else the cached one. Stale or foreign graphs are skipped with a warning."""
    from .export import OnnxNetwork
    from .weights import WeightsError

    for graph in (int8_path(path), int8_cache_path(sha)):
        if not graph.is_file():
            continue
        try:
            net = OnnxNetwork(graph, device, optimized=optimized_path(graph))
        except WeightsError as e:
            log.warning("%s: INT8 graph not used (%s)", graph, e)
            continue
        meta = net.meta
        made_from = meta.get("weights_sha256")
        if made_from != sha:
            log.warning("%s: INT8 graph not used: made from other weights (SHA-256 %s, %s has %s); a stale graph",
                        graph, (made_from or "not recorded")[:16], path.name, sha[:16])
        elif "int8" not in meta or meta["output"] != "logits" or meta["input"] != meta.get("weights_input"):
            log.warning("%s: INT8 graph not used: not an INT8 logits graph at the weights' input convention", graph)
        else:
            return net
    return None


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
