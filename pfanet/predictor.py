"""Predictor: load weights once, pre-process, run batches, post-process to maps at the original size.

The CLI, the server, the exporters' parity checks, validation during training and distributed jobs all go through
this class, so there is one copy of the pipeline.
"""

from __future__ import annotations

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
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: str | None = None, batch_size: int = 4,
                 model: PFANet | None = None, spec: InputSpec | None = None):
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
            else:
                model, spec, self.meta = load_checkpoint(path)
            self.source = str(path)
        else:
            self.meta, self.source = {}, "a model passed in memory"
        if spec is None:
            raise ValueError("a model passed directly needs its InputSpec")
        self.model, self.spec, self.batch_size = model.to(self.device).eval(), spec, batch_size
        self._lock = threading.Lock()

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Network logits for a preprocessed batch (N, 3, size, size); one caller at a time."""
        with self._lock:
            return self.model(x.to(self.device)).float().cpu()

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
