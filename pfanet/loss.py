"""Edge preservation loss (paper Sec. 3.4, official EdgeHoldLoss).

total = alpha * L_S + (1 - alpha) * L_B, where
    L_S = mean BCE-with-logits(z, y), salient pixels weighted by pos_weight (1.12 = 0.528 / 0.472, paper Eq. 7)
    L_B = mean BCE(edge(y), edge(sigmoid(z))), edge(m) = relu(tanh(laplace(m))) (official; the paper's Eq. 9 uses abs)
and the channel-attention activity regulariser (mean of the attention weights) is added by the trainer.

Not in the paper, a recipe option (`iou`; the `paper` and `official` recipes keep the loss above): an IoU term added
to it, which scores each image's map as a whole, so a grey background costs as much as a missed object part (the
BCE terms average it away over the many background pixels):
    "soft":      1 - soft IoU(sigmoid(z), y) per image (BASNet, Qin et al. 2019);
    "structure": F3Net's structure loss (Wei et al. 2020): L_S with each pixel weighted by
                 w = 1 + 5 |avgpool31(y) - y| (pixels near the object's boundary count up to 6x), plus 1 - IoU
                 weighted by the same w.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POS_WEIGHT = 1.12
CLIP_EPS = 1e-7  # Keras backend epsilon, used by the official code to clip before turning back into logits
EDGE_MODES = ("relu", "abs")
IOU_MODES = ("none", "soft", "structure")

_LAPLACE = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]])


def laplace_edges(m: torch.Tensor, mode: str = "relu") -> torch.Tensor:
    """Edges of a map in [0, 1]: relu(tanh(Laplace(m))) (official) or abs(tanh(Laplace(m))) (paper Eq. 9).

    m: (N, 1, H, W); zero padding, as the official conv2d with padding 'same'.
    """
    if mode not in EDGE_MODES:
        raise ValueError(f"edge mode must be one of {EDGE_MODES}, got {mode!r}")
    k = _LAPLACE.to(dtype=m.dtype, device=m.device)[None, None]
    t = torch.tanh(F.conv2d(m, k, padding=1))
    return F.relu(t) if mode == "relu" else t.abs()


def saliency_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = POS_WEIGHT) -> torch.Tensor:
    """L_S: weighted BCE with logits, averaged over all pixels."""
    pw = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)


def edge_loss(logits: torch.Tensor, target: torch.Tensor, edge_mode: str = "relu") -> torch.Tensor:
    """L_B: BCE between the target's edges and the prediction's edges, the latter clipped and turned into logits."""
    pred_edge = laplace_edges(torch.sigmoid(logits), edge_mode).clamp(CLIP_EPS, 1 - CLIP_EPS)
    return F.binary_cross_entropy_with_logits(torch.logit(pred_edge), laplace_edges(target, edge_mode))


def edge_hold_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.7,
    pos_weight: float = POS_WEIGHT,
    edge_mode: str = "relu",
) -> torch.Tensor:
    """alpha * L_S + (1 - alpha) * L_B. alpha = 1 is plain weighted BCE (the paper's stage 1)."""
    loss = alpha * saliency_loss(logits, target, pos_weight)
    if alpha < 1:
        loss = loss + (1 - alpha) * edge_loss(logits, target, edge_mode)
    return loss


def boundary_weights(target: torch.Tensor) -> torch.Tensor:
    """F3Net's pixel weights 1 + 5 |avgpool31(y) - y|: up to 6 near boundaries, 1 inside flat regions."""
    local = F.avg_pool2d(target, kernel_size=31, stride=1, padding=15, count_include_pad=True)
    return 1 + 5 * (local - target).abs()


def iou_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """1 - soft IoU of each image's map and target (pixels weighted by `weights`), averaged over the batch.

    The +1 in numerator and denominator keeps an empty target with an empty prediction at loss 0, not 0/0."""
    p = torch.sigmoid(logits)
    w = torch.ones_like(target) if weights is None else weights
    inter = (p * target * w).sum(dim=(2, 3))
    union = ((p + target) * w).sum(dim=(2, 3)) - inter
    return (1 - (inter + 1) / (union + 1)).mean()


def training_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.7,
    iou: str = "none",
    edge_mode: str = "relu",
) -> torch.Tensor:
    """The edge preservation loss, plus the recipe's IoU term (module docstring)."""
    if iou not in IOU_MODES:
        raise ValueError(f"iou must be one of {IOU_MODES}, got {iou!r}")
    if iou != "structure":
        loss = edge_hold_loss(logits, target, alpha, edge_mode=edge_mode)
        return loss if iou == "none" else loss + iou_loss(logits, target)
    w = boundary_weights(target)
    pw = torch.tensor(POS_WEIGHT, dtype=logits.dtype, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction="none")
    loss = alpha * (bce * w).sum(dim=(2, 3)).div(w.sum(dim=(2, 3))).mean()
    if alpha < 1:
        loss = loss + (1 - alpha) * edge_loss(logits, target, edge_mode)
    return loss + iou_loss(logits, target, w)


def activity_regulariser(ca_weights: torch.Tensor | None) -> torch.Tensor | float:
    """The official Dense(384, sigmoid) activity regulariser: the mean of the channel-attention weights."""
    return 0.0 if ca_weights is None else ca_weights.mean()
