"""Predictor: load weights once, pre-process, run batches, post-process to maps at the original size.

The CLI, the server, the exporters' parity checks, validation during training and distributed jobs all go through
this class, so there is one copy of the pipeline.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import threading
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .io import load_image, to_rgb
from .model import PFANet
from .transforms import InputSpec, postprocess, preprocess

DEFAULT_WEIGHTS = pathlib.Path(__file__).parent / "weights" / "pfanet_ecssd.safetensors"
# "auto" picks the fastest faithful path measured (docs/PERFORMANCE.md): ONNX Runtime fp32 on the CPU, PyTorch with
# channels_last + bf16 autocast on a GPU. "torch" is plain PyTorch fp32 (the reference every path is checked against).
BACKENDS = ("auto", "torch", "onnxruntime")

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
        model: an already built model (used as is, e.g. during training); needs `spec`.
        spec: the input convention of `model`.
        backend: "torch" (default here: plain PyTorch), "onnxruntime" (the weights exported once to an ONNX graph,
            cached by content under `onnx_cache_dir()`), or "auto" (what `pfanet predict` and `pfanet serve` use:
            onnxruntime on the CPU, PyTorch with channels_last and bf16 autocast on a GPU). Weights that are already
            .onnx always run on onnxruntime; a model passed in memory always on PyTorch.
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: str | None = None, batch_size: int = 4,
                 model: PFANet | None = None, spec: InputSpec | None = None, backend: str = "torch"):
        from .weights import load_checkpoint  # here to keep `import pfanet.predictor` light

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:
            if weights is None and not DEFAULT_WEIGHTS.is_file():
                from .weights import WeightsError

                raise WeightsError(f"no default model: {DEFAULT_WEIGHTS} is missing (not installed with this copy "
                                   "of pfanet); pass a weights file (--weights FILE: a .safetensors from `pfanet "
                                   "train` or `pfanet convert`, or an official .h5)")
            path = pathlib.Path(weights) if weights is not None else DEFAULT_WEIGHTS
            if path.suffix.lower() == ".onnx":  # an exported graph: onnxruntime behind the same `logits` hook
                from .export import load_onnx

                model, spec, self.meta = load_onnx(path, self.device)
                self.backend = "onnxruntime"
            else:
                model, spec, self.meta = load_checkpoint(path)
                model = self._select_backend(model, spec, path, backend)
            self.source = str(path)
        else:
            self.meta, self.source, self.backend = {}, "a model passed in memory", "torch"
        if spec is None:
            raise ValueError("a model passed directly needs its InputSpec")
        self.model, self.spec, self.batch_size = model.to(self.device).eval(), spec, batch_size
        # On a GPU the fast path is NHWC convolutions in bf16; the logits come back as float32 all the same.
        self.gpu_fast = backend == "auto" and self.backend == "torch" and self.device.type == "cuda"
        if self.gpu_fast:
            self.model.to(memory_format=torch.channels_last)
        self._lock = threading.Lock()

    def _select_backend(self, model: PFANet, spec: InputSpec, path: pathlib.Path, backend: str) -> torch.nn.Module:
        """The network to run for `backend`: the PyTorch model, or its ONNX Runtime twin on the CPU."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            backend = "onnxruntime" if self.device.type == "cpu" and _has_onnxruntime() else "torch"
        self.backend = backend
        if backend == "torch":
            return model
        from .export import OnnxNetwork, export_onnx, plan_export

        graph = onnx_cache_dir() / f"{_content_key(path)}.onnx"
        try:
            if not graph.is_file():
                graph.parent.mkdir(parents=True, exist_ok=True)
                export_onnx(plan_export(model, spec), graph, self.meta)
            return OnnxNetwork(graph, self.device)
        except Exception as e:  # noqa: BLE001 -- a read-only cache, a failed export...: still predict, with PyTorch
            log.warning("%s: running on PyTorch, not onnxruntime (%s: %s)", path, type(e).__name__, e)
            self.backend = "torch"
            return model

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Network logits for a preprocessed batch (N, 3, size, size); one caller at a time."""
        x = x.to(self.device)
        fast = torch.autocast("cuda", dtype=torch.bfloat16) if self.gpu_fast else contextlib.nullcontext()
        with self._lock, fast:
            if self.gpu_fast:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x).float().cpu()

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
        x = torch.stack([preprocess(im, self.spec) for im in rgbs])
        logits = self.logits(x)
        return [postprocess(z, *im.shape[:2]) for z, im in zip(logits, rgbs)]

    def outputs(self, image: ImageInput, kinds: Sequence[str] = ("map",), threshold: float | None = None
                ) -> dict[str, np.ndarray]:
        """One image -> the requested renderings (see `pfanet.outputs.OUTPUT_KINDS`), e.g. {"cutout": RGBA array}.

        `threshold` (0..255) binarises the mask; None is the adaptive threshold.
        """
        from .outputs import render

        rgb = as_rgb(image)
        return render(rgb, self.predict_rgb([rgb])[0], kinds, threshold)


def onnx_cache_dir() -> pathlib.Path:
    """Where the onnxruntime backend keeps the graphs it exports: $PFANET_CACHE, else $XDG_CACHE_HOME/pfanet (or
    ~/.cache/pfanet), subfolder onnx."""
    root = os.environ.get("PFANET_CACHE") or pathlib.Path(os.environ.get("XDG_CACHE_HOME") or
                                                          pathlib.Path.home() / ".cache") / "pfanet"
    return pathlib.Path(root) / "onnx"


def _content_key(path: pathlib.Path) -> str:
    """The weights' bytes and the versions that shape the exported graph: a changed file is exported again."""
    import onnxruntime

    from . import __version__

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"{__version__} {torch.__version__} {onnxruntime.__version__}".encode())
    return digest.hexdigest()[:32]


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
