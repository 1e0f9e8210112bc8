"""PFANet (Zhao & Wu, CVPR 2019), as the official Keras code builds it. Reads top to bottom like the paper's Fig. 2:

    VGG16 backbone -> C1..C5
    high level:  CPFE(C3), CPFE(C4) x2, CPFE(C5) x4 -> concat -> channel attention -> C345 conv -> x4
    low level:   C1 conv, C2 conv x2 -> concat -> C12 conv -> x spatial attention(C345)
    fusion:      concat [C12, C345] -> 3x3 conv -> one channel of logits (no sigmoid)

Layer names follow the paper; the official Keras names appear only in `pfanet.weights`.
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F
from torch import nn

NORM_MODES = ("per-image", "batch")
KERAS_BN_EPS = 1e-3  # Keras BatchNormalization default; PyTorch's 1e-5 would shift outputs of official weights


@dataclasses.dataclass(frozen=True)
class PFANetConfig:
    """Architecture switches. Defaults build the official network.

    Attributes:
        with_cpfe: context-aware pyramid feature extraction on C3/C4/C5; off = the raw VGG features (Table 3 "HL").
        with_ca: channel-wise attention on the high-level features.
        with_sa: spatial attention (from the high-level features) on the low-level features.
        with_low_level: the C1/C2 path; off = predict from the high-level features alone.
        dropout: Dropout(0.3) after pools 1-4 and after block5_conv3 (active in training only).
        norm: "per-image" normalises each image by its own per-channel statistics over HxW, in training and at
            inference: what the official always-training BatchNorm does at batch 1, which released weights need.
            "batch" is standard BatchNorm with running statistics.
        c345_kernel: kernel size of the conv after channel attention (C345): 1 in the official code, 3 in the
            popular PyTorch port (docs/WEIGHTS.md), whose checkpoints need it.
        bn_eps: the BatchNorm epsilon: Keras' 1e-3 for official weights, PyTorch's 1e-5 for the port's.
    """

    with_cpfe: bool = True
    with_ca: bool = True
    with_sa: bool = True
    with_low_level: bool = True
    dropout: bool = True
    norm: str = "per-image"
    c345_kernel: int = 1
    bn_eps: float = KERAS_BN_EPS

    def __post_init__(self):
        if self.norm not in NORM_MODES:
            raise ValueError(f"norm must be one of {NORM_MODES}, got {self.norm!r}")
        if self.c345_kernel not in (1, 3):
            raise ValueError(f"c345_kernel must be 1 or 3, got {self.c345_kernel!r}")
        if not self.bn_eps > 0:
            raise ValueError(f"bn_eps must be positive, got {self.bn_eps!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> PFANetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PFANet config keys: {sorted(unknown)}")
        return cls(**d)


class Norm(nn.BatchNorm2d):
    """BatchNorm (Keras eps 1e-3 unless told otherwise) followed by ReLU, in one of the two normalisation modes.

    Both modes keep the same parameters and buffers, so a checkpoint loads in either. Per-image training never
    updates the running statistics, though: weights trained that way give meaningful "batch" outputs only in
    training mode (batch statistics), not in eval mode.
    """

    def __init__(self, channels: int, mode: str, eps: float = KERAS_BN_EPS):
        super().__init__(channels, eps=eps, momentum=0.01)  # Keras momentum 0.99 == torch 0.01
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "per-image":
            x = F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        else:
            x = super().forward(x)
        return F.relu(x)


def upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The official BilinearUpsampling layer: bilinear with align_corners=True."""
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=True)


# (name, in, out) of the 13 VGG16 convs; a 2x2 max-pool follows the last conv of blocks 1-4.
VGG16_CONVS = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64),
    ("conv2_1", 64, 128), ("conv2_2", 128, 128),
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
    ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
    ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512),
)
VGG16_TAPS = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")  # C1..C5


class VGG16Backbone(nn.Module):
    """VGG16 conv layers; returns the activations before each pool, C1..C5 (strides 1, 2, 4, 8, 16)."""

    def __init__(self, dropout: bool):
        super().__init__()
        self.convs = nn.ModuleDict({name: nn.Conv2d(cin, cout, 3, padding=1) for name, cin, cout in VGG16_CONVS})
        self.dropout = nn.Dropout(0.3) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for name, conv in self.convs.items():
            x = F.relu(conv(x))
            if name in VGG16_TAPS:
                if name == "conv5_3":
                    x = self.dropout(x)  # official: C5 is taken after the dropout, there is no fifth pool
                taps.append(x)
                if name != "conv5_3":
                    x = self.dropout(F.max_pool2d(x, 2))
        return taps


class CPFE(nn.Module):
    """Context-aware pyramid feature extraction: 1x1 and 3x3 dilated (3, 5, 7) convs, 32 channels each, no bias."""

    dilations = (1, 3, 5, 7)

    def __init__(self, in_channels: int, norm: str, eps: float = KERAS_BN_EPS):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, 32, 1 if d == 1 else 3, padding=0 if d == 1 else d, dilation=d, bias=False)
            for d in self.dilations
        )
        self.bn = Norm(32 * len(self.dilations), norm, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([b(x) for b in self.branches], dim=1))


class ChannelAttention(nn.Module):
    """Channel-wise attention: GAP -> FC(C/4) ReLU -> FC(C) sigmoid, weights multiplied onto the features.

    The weights of the last call are kept in `weights` for the loss's activity regulariser (official code).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // 4)
        self.fc2 = nn.Linear(channels // 4, channels)
        self.weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        self.weights = w
        return x * w[:, :, None, None]


class SpatialAttention(nn.Module):
    """Spatial attention from the high-level features: two separable k x 1 / 1 x k branches, added, sigmoid.

    Each branch ends in BN+ReLU (official code), so the attention lies in [0.5, 1).
    """

    def __init__(self, channels: int, norm: str, k: int = 9, eps: float = KERAS_BN_EPS):
        super().__init__()
        p = k // 2
        self.conv1_1 = nn.Conv2d(channels, channels // 2, (1, k), padding=(0, p))
        self.bn1_1 = Norm(channels // 2, norm, eps)
        self.conv1_2 = nn.Conv2d(channels // 2, 1, (k, 1), padding=(p, 0))
        self.bn1_2 = Norm(1, norm, eps)
        self.conv2_1 = nn.Conv2d(channels, channels // 2, (k, 1), padding=(p, 0))
        self.bn2_1 = Norm(channels // 2, norm, eps)
        self.conv2_2 = nn.Conv2d(channels // 2, 1, (1, k), padding=(0, p))
        self.bn2_2 = Norm(1, norm, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.bn1_2(self.conv1_2(self.bn1_1(self.conv1_1(x))))
        b2 = self.bn2_2(self.conv2_2(self.bn2_1(self.conv2_1(x))))
        return torch.sigmoid(b1 + b2)


class PFANet(nn.Module):
    """Pyramid Feature Attention Network. Input: (N, 3, H, W), H and W multiples of 32. Output: (N, 1, H, W) logits."""

    stride = 32

    def __init__(self, config: PFANetConfig | None = None):
        super().__init__()
        self.config = cfg = config or PFANetConfig()
        self.backbone = VGG16Backbone(cfg.dropout)

        # High-level path
        if cfg.with_cpfe:
            self.cpfe3, self.cpfe4, self.cpfe5 = (CPFE(c, cfg.norm, cfg.bn_eps) for c in (256, 512, 512))
            high_channels = 3 * 128
        else:
            high_channels = 256 + 512 + 512
        self.channel_attention = ChannelAttention(high_channels) if cfg.with_ca else None
        self.c345_conv = nn.Conv2d(high_channels, 64, cfg.c345_kernel, padding=cfg.c345_kernel // 2)
        self.c345_bn = Norm(64, cfg.norm, cfg.bn_eps)

        # Low-level path, weighted by spatial attention computed from the high level
        if cfg.with_low_level:
            self.c1_conv = nn.Conv2d(64, 64, 3, padding=1)
            self.c1_bn = Norm(64, cfg.norm, cfg.bn_eps)
            self.c2_conv = nn.Conv2d(128, 64, 3, padding=1)
            self.c2_bn = Norm(64, cfg.norm, cfg.bn_eps)
            self.c12_conv = nn.Conv2d(128, 64, 3, padding=1)
            self.c12_bn = Norm(64, cfg.norm, cfg.bn_eps)
        # Spatial attention only has something to weight when the low-level path exists.
        self.spatial_attention = (SpatialAttention(64, cfg.norm, eps=cfg.bn_eps) if cfg.with_sa and cfg.with_low_level
                                  else None)

        self.fusion = nn.Conv2d(128 if cfg.with_low_level else 64, 1, 3, padding=1)  # Keras name "sa"

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"PFANet expects an (N, 3, H, W) tensor, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(
                f"PFANet input height and width must be multiples of {self.stride}, got {h}x{w} "
                f"(e.g. {max(32, round(h / 32) * 32)}x{max(32, round(w / 32) * 32)})"
            )

    def forward_high_level(self, c3, c4, c5) -> torch.Tensor:
        if self.config.with_cpfe:
            c3, c4, c5 = self.cpfe3(c3), self.cpfe4(c4), self.cpfe5(c5)
        c345 = torch.cat([c3, upsample(c4, 2), upsample(c5, 4)], dim=1)
        if self.channel_attention is not None:
            c345 = self.channel_attention(c345)
        return upsample(self.c345_bn(self.c345_conv(c345)), 4)

    def forward_low_level(self, c1, c2, c345) -> torch.Tensor:
        c1 = self.c1_bn(self.c1_conv(c1))
        c2 = upsample(self.c2_bn(self.c2_conv(c2)), 2)
        c12 = self.c12_bn(self.c12_conv(torch.cat([c1, c2], dim=1)))
        if self.spatial_attention is not None:
            c12 = c12 * self.spatial_attention(c345)
        return c12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        c1, c2, c3, c4, c5 = self.backbone(x)
        c345 = self.forward_high_level(c3, c4, c5)
        if self.config.with_low_level:
            fused = torch.cat([self.forward_low_level(c1, c2, c345), c345], dim=1)
        else:
            fused = c345
        return self.fusion(fused)

    def channel_attention_weights(self) -> torch.Tensor | None:
        """The channel-attention weights of the last forward pass (for the activity regulariser), or None."""
        return None if self.channel_attention is None else self.channel_attention.weights
