"""Edge preservation loss and the channel-attention regulariser against values worked out by hand (math / numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pfanet.loss import (
    activity_regulariser,
    edge_hold_loss,
    edge_loss,
    iou_loss,
    laplace_edges,
    saliency_loss,
    training_loss,
)
from pfanet.model import PFANet, PFANetConfig
from pfanet.transforms import edge_map

t = math.tanh


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def as_map(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)[None, None]


# ---------------------------------------------------------------------------------------------------------------
# Laplace edges, zero padding: value = 8 * centre - sum of the 8 neighbours (outside the map counts as 0)


def test_laplace_edges_of_a_constant_map_show_the_zero_padding():
    # 3x3 of ones: a corner has 3 neighbours inside (8 - 3 = 5), a side 5 (8 - 5 = 3), the centre 8 (0)
    want = [[t(5), t(3), t(5)], [t(3), 0, t(3)], [t(5), t(3), t(5)]]
    for mode in ("relu", "abs"):
        torch.testing.assert_close(laplace_edges(as_map([[1, 1, 1]] * 3), mode)[0, 0], torch.tensor(want).double())


def test_laplace_edges_of_a_dot_relu_vs_abs():
    dot = as_map([[0, 0, 0], [0, 1, 0], [0, 0, 0]])  # centre 8, each neighbour -1
    relu = [[0, 0, 0], [0, t(8), 0], [0, 0, 0]]
    absolute = [[t(1), t(1), t(1)], [t(1), t(8), t(1)], [t(1), t(1), t(1)]]
    torch.testing.assert_close(laplace_edges(dot, "relu")[0, 0], torch.tensor(relu).double())
    torch.testing.assert_close(laplace_edges(dot, "abs")[0, 0], torch.tensor(absolute).double())


def test_laplace_edges_of_a_step():
    step = as_map([[0, 0, 1, 1]] * 4)
    # worked out pixel by pixel: row 0 is [0, -2, 5, 5], rows 1-2 are [0, -3, 3, 3], row 3 is [0, -2, 5, 5]
    relu = [[0, 0, t(5), t(5)], [0, 0, t(3), t(3)], [0, 0, t(3), t(3)], [0, 0, t(5), t(5)]]
    absolute = [[0, t(2), t(5), t(5)], [0, t(3), t(3), t(3)], [0, t(3), t(3), t(3)], [0, t(2), t(5), t(5)]]
    torch.testing.assert_close(laplace_edges(step, "relu")[0, 0], torch.tensor(relu).double())
    torch.testing.assert_close(laplace_edges(step, "abs")[0, 0], torch.tensor(absolute).double())


def test_display_edge_map_mirrors_the_border_and_truncates_like_the_official_demo():
    # The demo's cv2.filter2D mirrors the border (BORDER_REFLECT_101): a uniform map has no edges at all, where the
    # loss's zero padding would draw a frame (8 - 3 = 5 at a corner).
    assert not edge_map(np.full((2, 3), 255, np.uint8)).any()
    # A dot of 10: 8 * 10 / 255 at the centre, negative around it; tanh(80 / 255) * 255 = 77.51 is cast to 77
    dot = np.zeros((3, 3), np.uint8)
    dot[1, 1] = 10
    want = np.zeros((3, 3), np.uint8)
    want[1, 1] = 77
    assert math.floor(t(80 / 255) * 255) == 77
    np.testing.assert_array_equal(edge_map(dot), want)


def test_unknown_edge_mode_is_an_error():
    with pytest.raises(ValueError, match="edge mode"):
        laplace_edges(as_map([[0.0]]), "sobel")


# ---------------------------------------------------------------------------------------------------------------
# L_S: weighted BCE with logits, -(1.12 y log s(z) + (1 - y) log(1 - s(z))), -log s(z) = softplus(-z)

Z = [[2.0, -1.0], [0.0, 3.0]]
Y = [[1.0, 0.0], [1.0, 0.5]]


def saliency_by_hand(pos_weight: float) -> float:
    terms = [
        pos_weight * softplus(-2.0),  # y = 1, z = 2
        softplus(-1.0),  # y = 0, z = -1: -log(1 - s(-1)) = softplus(-1)
        pos_weight * math.log(2.0),  # y = 1, z = 0
        0.5 * pos_weight * softplus(-3.0) + 0.5 * softplus(3.0),  # y = 0.5, z = 3
    ]
    return sum(terms) / 4


def test_saliency_loss_with_pos_weight_1_12():
    got = saliency_loss(as_map(Z), as_map(Y))
    assert got.item() == pytest.approx(saliency_by_hand(1.12), rel=1e-12)
    assert saliency_loss(as_map(Z), as_map(Y), pos_weight=1.0).item() == pytest.approx(saliency_by_hand(1.0), rel=1e-12)


def test_saliency_loss_in_float32():
    got = saliency_loss(as_map(Z).float(), as_map(Y).float())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(saliency_by_hand(1.12), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# L_B: BCE(edge(y), q) with q = clip(edge(sigmoid(z)), 1e-7, 1 - 1e-7), i.e. -(e log q + (1 - e) log(1 - q))

EPS = 1e-7


def bce(e: float, q: float) -> float:
    return -(e * math.log(q) + (1 - e) * math.log(1 - q))


def edge_by_hand_flat_prediction(mode: str) -> float:
    """Logits 0 everywhere on 3x3 (p = 0.5), target a dot in the centre.

    Prediction edges: 8 * 0.5 - 0.5 * (inside neighbours) -> corners 2.5, sides 1.5, centre 0, which is
    clipped to 1e-7 (without the clip, log(0) would be infinite). Target edges: centre tanh(8), neighbours
    0 (relu) or tanh(1) (abs).
    """
    e_side = 0.0 if mode == "relu" else t(1)
    total = 4 * bce(e_side, t(2.5)) + 4 * bce(e_side, t(1.5)) + bce(t(8), EPS)
    return total / 9


@pytest.mark.parametrize("mode", ["relu", "abs"])
def test_edge_loss_clips_before_logits(mode):
    z = as_map([[0.0] * 3] * 3)
    y = as_map([[0, 0, 0], [0, 1, 0], [0, 0, 0]])
    got = edge_loss(z, y, mode).item()
    assert got == pytest.approx(edge_by_hand_flat_prediction(mode), rel=1e-9)
    assert got > 16.1 / 9  # the clipped centre alone: tanh(8) * -log(1e-7) = 16.118...
    assert edge_loss(z.float(), y.float(), mode).item() == pytest.approx(edge_by_hand_flat_prediction(mode), rel=1e-5)


def test_edge_loss_gradient_is_finite_where_the_prediction_is_clipped():
    z = as_map([[0.0] * 3] * 3).requires_grad_()
    edge_loss(z, as_map([[0, 0, 0], [0, 1, 0], [0, 0, 0]])).backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("alpha", [0.7, 0.5, 0.0])
def test_edge_hold_loss_is_alpha_weighted(alpha):
    # 2x2 maps of Z / Y: prediction edges worked out with 8 * p - sum of the 3 inside neighbours
    s = [1 / (1 + math.exp(-v)) for v in (2.0, -1.0, 0.0, 3.0)]
    y = [1.0, 0.0, 1.0, 0.5]
    pred_edges = [max(0.0, t(8 * s[i] - (sum(s) - s[i]))) for i in range(4)]
    true_edges = [max(0.0, t(8 * y[i] - (sum(y) - y[i]))) for i in range(4)]
    l_b = sum(bce(e, min(max(q, EPS), 1 - EPS)) for e, q in zip(true_edges, pred_edges, strict=True)) / 4
    l_s = saliency_by_hand(1.12)
    got = edge_hold_loss(as_map(Z), as_map(Y), alpha=alpha).item()
    assert got == pytest.approx(alpha * l_s + (1 - alpha) * l_b, rel=1e-9)


def test_alpha_1_is_plain_weighted_bce():
    assert edge_hold_loss(as_map(Z), as_map(Y), alpha=1.0).item() == pytest.approx(saliency_by_hand(1.12), rel=1e-12)


def numpy_edge_hold_loss(z: np.ndarray, y: np.ndarray, alpha: float) -> float:
    """An independent float64 numpy version of the official EdgeHoldLoss for (N, H, W) maps."""

    def edges(m):
        p = np.pad(m, ((0, 0), (1, 1), (1, 1)))
        h, w = m.shape[1:]
        neighbours = sum(p[:, 1 + di : 1 + di + h, 1 + dj : 1 + dj + w]
                         for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0))
        return np.maximum(np.tanh(8 * m - neighbours), 0)

    s = 1 / (1 + np.exp(-z))
    l_s = np.mean(-(1.12 * y * np.log(s) + (1 - y) * np.log(1 - s)))
    e, q = edges(y), np.clip(edges(s), EPS, 1 - EPS)
    l_b = np.mean(-(e * np.log(q) + (1 - e) * np.log(1 - q)))
    return alpha * l_s + (1 - alpha) * l_b


def test_edge_hold_loss_on_a_random_batch_matches_numpy():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (2, 6, 5))
    y = (rng.random((2, 6, 5)) > 0.6).astype(np.float64)
    got = edge_hold_loss(torch.from_numpy(z)[:, None], torch.from_numpy(y)[:, None], alpha=0.7).item()
    assert got == pytest.approx(numpy_edge_hold_loss(z, y, 0.7), rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# The IoU terms (a recipe option, not the paper's): BASNet's soft IoU and F3Net's structure loss, against numpy


def numpy_iou(s: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    inter = (s * y * w).sum(axis=(1, 2))
    union = ((s + y) * w).sum(axis=(1, 2)) - inter
    return float(np.mean(1 - (inter + 1) / (union + 1)))


def numpy_boundary_weights(y: np.ndarray) -> np.ndarray:
    """1 + 5 |mean of the 31x31 window around each pixel (zeros outside, divided by 961) - y|."""
    p = np.pad(y, ((0, 0), (15, 15), (15, 15)))
    h, w = y.shape[1:]
    local = np.stack([p[:, i : i + 31, j : j + 31].sum(axis=(1, 2)) / 961 for i in range(h) for j in range(w)], 1)
    return 1 + 5 * np.abs(local.reshape(y.shape) - y)


@pytest.fixture
def random_batch():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (2, 9, 7))
    y = (rng.random((2, 9, 7)) > 0.6).astype(np.float64)
    return z, y, torch.from_numpy(z)[:, None], torch.from_numpy(y)[:, None]


def test_soft_iou_adds_one_minus_iou_per_image(random_batch):
    z, y, zt, yt = random_batch
    s = 1 / (1 + np.exp(-z))
    want = numpy_edge_hold_loss(z, y, 0.7) + numpy_iou(s, y, np.ones_like(y))
    assert training_loss(zt, yt, 0.7, iou="soft").item() == pytest.approx(want, rel=1e-9)
    assert training_loss(zt, yt, 0.7, iou="none").item() == pytest.approx(numpy_edge_hold_loss(z, y, 0.7), rel=1e-9)


def test_structure_loss_weights_pixels_near_the_boundary(random_batch):
    z, y, zt, yt = random_batch
    s, w = 1 / (1 + np.exp(-z)), numpy_boundary_weights(y)
    bce = -(1.12 * y * np.log(s) + (1 - y) * np.log(1 - s))
    weighted_bce = np.mean((bce * w).sum(axis=(1, 2)) / w.sum(axis=(1, 2)))
    edge_only = numpy_edge_hold_loss(z, y, 0.0)
    want = 0.7 * weighted_bce + 0.3 * edge_only + numpy_iou(s, y, w)
    assert training_loss(zt, yt, 0.7, iou="structure").item() == pytest.approx(want, rel=1e-9)


def test_iou_of_a_perfect_and_an_empty_prediction():
    y = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    y[..., 2:6, 2:6] = 1
    assert iou_loss(torch.where(y > 0, 40.0, -40.0), y).item() == pytest.approx(0, abs=1e-9)
    assert iou_loss(torch.full_like(y, -40.0), y).item() == pytest.approx(16 / 17, rel=1e-9)  # 1 - 1/17
    assert iou_loss(torch.full_like(y, -40.0), torch.zeros_like(y)).item() == pytest.approx(0, abs=1e-9)


def test_unknown_iou_mode_is_an_error():
    with pytest.raises(ValueError, match="iou must be one of"):
        training_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), iou="dice")


# ---------------------------------------------------------------------------------------------------------------
# Channel-attention activity regulariser: the mean of the Dense(384, sigmoid) output


def test_activity_regulariser_is_the_mean_of_the_attention_weights():
    assert activity_regulariser(torch.tensor([[0.2, 0.4], [0.6, 0.8]])).item() == pytest.approx(0.5)
    assert activity_regulariser(None) == 0.0


def test_activity_regulariser_from_the_model():
    model = PFANet(PFANetConfig(dropout=False)).eval()
    bias = torch.linspace(-3, 1, 384)
    with torch.no_grad():  # zero fc2 weights: the attention is sigmoid(bias) whatever the input
        model.channel_attention.fc2.weight.zero_()
        model.channel_attention.fc2.bias.copy_(bias)
        model(torch.randn(2, 3, 64, 64))
    weights = model.channel_attention_weights()
    assert weights.shape == (2, 384)
    want = sum(1 / (1 + math.exp(-b)) for b in bias.tolist()) / 384
    assert activity_regulariser(weights).item() == pytest.approx(want, rel=1e-6)
    assert PFANet(PFANetConfig(with_ca=False)).channel_attention_weights() is None
