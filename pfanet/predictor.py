"""Predictor: load weights once, pre-process, run batches, post-process to maps at the original size.

The CLI, the server, the exporters' parity checks, validation during training and distributed jobs all go through
this class, so there is one copy of the pipeline. What runs the network (PyTorch, or an ONNX Runtime graph, fp32 or
INT8) is chosen by `pfanet.runtime`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pathlib
import threading
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from . import runtime
from .io import load_image, to_rgb
from .model import PFANet
from .transforms import InputSpec, postprocess, preprocess
from .weights import WeightsError

DEFAULT_WEIGHTS = pathlib.Path(__file__).parent / "weights" / "pfanet_duts.safetensors"
BACKENDS = runtime.BACKENDS  # "auto", "torch", "onnxruntime", "int8": see `Predictor`

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
            checked against PyTorch and cached by content under `runtime.onnx_cache_dir()`), "int8" (an INT8 graph
            made from these weights: `runtime.int8_path` beside them, or `runtime.int8_cache_path` left by `pfanet
            export --int8`; an error when there is none), or "auto" (what `pfanet predict` and `pfanet serve` use:
            on the CPU "int8" where the CPU has VNNI or AMX and such a graph exists, else "onnxruntime"; on a GPU
            PyTorch with channels_last and bf16 autocast). Weights that are already .onnx always run on onnxruntime;
            a model passed in memory always on PyTorch. `backend` and `backend_reason` say what was chosen and why
            (logged too). The choice is `pfanet.runtime.load_network`'s.
        flip: average each map with the map of the horizontally flipped image (test-time augmentation; the
            network runs on twice the images). On the model shipped 2026-11-30: ECSSD val max F 0.8407 -> 0.8523, DUTS-TR val
            (200) 0.8687 -> 0.8721, MAE about the same (docs/BENCHMARKS.md).
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: str | None = None, batch_size: int = 4,
                 model: PFANet | None = None, spec: InputSpec | None = None, backend: str = "torch",
                 flip: bool = False):
        self.batch_size, self.flip = batch_size, flip
        if model is None:
            self._load(weights, device, backend)
        else:
            self._adopt(model, spec, device)
        self._lock = threading.Lock()

    def _load(self, weights: str | os.PathLike | None, device: str | None, backend: str) -> None:
        """A weights file (None: the shipped model), on the network `backend` asks for (`pfanet.runtime`), in eval
        mode for good."""
        if weights is None and not DEFAULT_WEIGHTS.is_file():
            raise WeightsError(f"no default model: {DEFAULT_WEIGHTS} is missing (not installed with this copy of "
                               "pfanet); pass a weights file (--weights FILE: a .safetensors from `pfanet train` or "
                               "`pfanet convert`, or an official .h5)")
        path = pathlib.Path(weights) if weights is not None else DEFAULT_WEIGHTS
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net = runtime.load_network(path, self.device, backend)
        self.model, self.spec, self.meta = net.module.to(self.device).eval(), net.spec, net.meta
        self.backend, self.backend_reason, self.source = net.backend, net.reason, str(path)
        log.info("backend %s: %s", self.backend, self.backend_reason)
        # On a GPU the fast path is NHWC convolutions in bf16; the logits come back as float32 all the same.
        self.gpu_fast = backend == "auto" and self.backend == "torch" and self.device.type == "cuda"
        if self.gpu_fast:
            self.model.to(memory_format=torch.channels_last)

    def _adopt(self, model: PFANet, spec: InputSpec | None, device: str | None) -> None:
        """A model built by the caller (e.g. during training), run on PyTorch as it is: on its own device unless
        `device` is given, and left in its own mode between forward passes."""
        if spec is None:
            raise ValueError("a model passed directly needs its InputSpec")
        # where the caller's model is, not where a default would move it
        self.device = torch.device(device) if device is not None else next(model.parameters(), torch.empty(0)).device
        self.model, self.spec = model.to(self.device), spec
        self.meta, self.source = {}, "a model passed in memory"
        self.backend, self.backend_reason = "torch", "a model passed in memory"
        self.gpu_fast = False

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
