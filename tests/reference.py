"""Independent reference computations the tests compare pfanet against (plain numpy, written out as the official
code does them, sharing nothing with the implementation under test)."""

from __future__ import annotations

import numpy as np


def pad_to_square(x: np.ndarray) -> np.ndarray:
    """(..., H, W) -> zero-padded to a centred (..., S, S), S = max(H, W); the smaller half of an odd margin goes
    top/left, as in the official code."""
    h, w = x.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    out = np.zeros(x.shape[:-2] + (side, side), x.dtype)
    out[..., top : top + h, left : left + w] = x
    return out


def laplace_edges(saliency: np.ndarray) -> np.ndarray:
    """The official demo's edge display, written out with numpy shifts: relu(tanh(Laplace(map / 255))) x 255
    truncated to uint8, the border mirrored without repeating the edge pixel (OpenCV's default BORDER_REFLECT_101)."""
    x = np.pad(saliency.astype(np.float64) / 255, 1, mode="reflect")
    h, w = saliency.shape
    centre = x[1 : h + 1, 1 : w + 1]
    neighbours = sum(x[1 + dy : h + 1 + dy, 1 + dx : w + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) - centre
    return np.floor(np.maximum(np.tanh(8 * centre - neighbours), 0) * 255)
