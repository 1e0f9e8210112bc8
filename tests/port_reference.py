"""The PyTorch port of PFANet (sairajk/PyTorch-Pyramid-Feature-Attention-Network-for-Saliency-Detection), rebuilt
independently in plain PyTorch for the tests, as tests/keras_official.py rebuilds the official Keras network.

Written from the port's published architecture (docs/WEIGHTS.md lists what was read and where), not from its code:
- module names and shapes as its checkpoints hold them (`SODModel.state_dict()`): the torchvision VGG16 `features`
  as `vgg16.N`, `cpfe_conv{3,4,5}_3` (conv_1_1, conv_dil_3/5/7 without bias, bn), `cha_att` (linear_1,
  linear_2), `hl_conv1` (3x3, 384 -> 64) + `hl_bn1`, `ll_conv_1..3` + `ll_bn_1..3`, `spa_att` (grp1_conv1k,
  grp1_bn1, grp1_convk1, grp1_bn2, grp2_convk1, grp2_bn1, grp2_conv1k, grp2_bn2; k = 9), `ff_conv_1`;
- its forward pass: the VGG taps after the ReLUs of conv1_2 .. conv5_3, bilinear upsampling with
  align_corners=True, PyTorch BatchNorm (eps 1e-5) in eval mode, a sigmoid at the end;
- its inference pipeline (InfDataloader): RGB uint8, cv2.copyMakeBorder with black, (side - h) // 2 on each side,
  cv2.resize to 256 x 256 with INTER_AREA, / 255, ImageNet mean/std.

Nothing here imports pfanet: the tests compare pfanet against this.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIZE = 256
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
VGG16_LAYOUT = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512, "pool")
VGG16_TAPS = (3, 8, 15, 22, 29)  # the ReLUs after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3 in `features`


def vgg16_features() -> nn.Sequential:
    """torchvision's vgg16().features, index for index: conv, ReLU, ..., max-pool."""
    layers, cin = [], 3
    for item in VGG16_LAYOUT:
        if item == "pool":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU()]
            cin = item
    return nn.Sequential(*layers)


def up(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=True)


class PortCPFE(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.conv_1_1 = nn.Conv2d(cin, 32, 1, bias=False)
        for rate in (3, 5, 7):
            setattr(self, f"conv_dil_{rate}", nn.Conv2d(cin, 32, 3, padding=rate, dilation=rate, bias=False))
        self.bn = nn.BatchNorm2d(128)

    def forward(self, x):
        parts = [self.conv_1_1(x)] + [getattr(self, f"conv_dil_{r}")(x) for r in (3, 5, 7)]
        return F.relu(self.bn(torch.cat(parts, 1)))


class PortChannelAttention(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.linear_1 = nn.Linear(c, c // 4)
        self.linear_2 = nn.Linear(c // 4, c)

    def forward(self, x):
        return torch.sigmoid(self.linear_2(F.relu(self.linear_1(x.mean((2, 3))))))[:, :, None, None]


class PortSpatialAttention(nn.Module):
    def __init__(self, c: int, k: int = 9):
        super().__init__()
        half = c // 2
        self.grp1_conv1k = nn.Conv2d(c, half, (1, k), padding=(0, k // 2))
        self.grp1_bn1 = nn.BatchNorm2d(half)
        self.grp1_convk1 = nn.Conv2d(half, 1, (k, 1), padding=(k // 2, 0))
        self.grp1_bn2 = nn.BatchNorm2d(1)
        self.grp2_convk1 = nn.Conv2d(c, half, (k, 1), padding=(k // 2, 0))
        self.grp2_bn1 = nn.BatchNorm2d(half)
        self.grp2_conv1k = nn.Conv2d(half, 1, (1, k), padding=(0, k // 2))
        self.grp2_bn2 = nn.BatchNorm2d(1)

    def forward(self, x):
        a = F.relu(self.grp1_bn2(self.grp1_convk1(F.relu(self.grp1_bn1(self.grp1_conv1k(x))))))
        b = F.relu(self.grp2_bn2(self.grp2_conv1k(F.relu(self.grp2_bn1(self.grp2_convk1(x))))))
        return torch.sigmoid(a + b)


class PortSODModel(nn.Module):
    """The port's SODModel; `forward` returns logits (the port applies the sigmoid inside: `probabilities`)."""

    def __init__(self):
        super().__init__()
        self.vgg16 = vgg16_features()
        self.cpfe_conv3_3, self.cpfe_conv4_3, self.cpfe_conv5_3 = PortCPFE(256), PortCPFE(512), PortCPFE(512)
        self.cha_att = PortChannelAttention(384)
        self.hl_conv1 = nn.Conv2d(384, 64, 3, padding=1)
        self.hl_bn1 = nn.BatchNorm2d(64)
        self.ll_conv_1 = nn.Conv2d(64, 64, 3, padding=1)
        self.ll_bn_1 = nn.BatchNorm2d(64)
        self.ll_conv_2 = nn.Conv2d(128, 64, 3, padding=1)
        self.ll_bn_2 = nn.BatchNorm2d(64)
        self.ll_conv_3 = nn.Conv2d(128, 64, 3, padding=1)
        self.ll_bn_3 = nn.BatchNorm2d(64)
        self.spa_att = PortSpatialAttention(64)
        self.ff_conv_1 = nn.Conv2d(128, 1, 3, padding=1)

    def forward(self, x):
        taps = []
        for i, layer in enumerate(self.vgg16):
            x = layer(x)
            if i in VGG16_TAPS:
                taps.append(x)
        c1, c2, c3, c4, c5 = taps
        high = torch.cat([self.cpfe_conv3_3(c3), up(self.cpfe_conv4_3(c4), 2), up(self.cpfe_conv5_3(c5), 4)], 1)
        high = high * self.cha_att(high)
        high = up(F.relu(self.hl_bn1(self.hl_conv1(high))), 4)
        low1 = F.relu(self.ll_bn_1(self.ll_conv_1(c1)))
        low2 = up(F.relu(self.ll_bn_2(self.ll_conv_2(c2))), 2)
        low = F.relu(self.ll_bn_3(self.ll_conv_3(torch.cat([low1, low2], 1))))
        low = low * self.spa_att(high)
        return self.ff_conv_1(torch.cat([low, high], 1))

    def probabilities(self, x):
        return torch.sigmoid(self(x))


def randomise(model: nn.Module, seed: int = 0, logit_scale: float = 1.0) -> None:
    """He-normal weights, random biases, and BatchNorm weights and running statistics far from their defaults
    (gamma 1, beta 0, mean 0, variance 1, count 0), so that a tensor loaded into the wrong place, or a statistic
    ignored, changes the output. `logit_scale` multiplies the last conv."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.copy_(normal(module.weight.shape, (2 / fan_in) ** 0.5))
                if module.bias is not None:
                    module.bias.copy_(normal(module.bias.shape, 0.1))
            elif isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=g))
                module.bias.copy_(normal(c, 0.3))
                module.running_mean.copy_(normal(c, 0.3))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                module.num_batches_tracked.fill_(1234)
        model.ff_conv_1.weight *= logit_scale


def port_input(rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The port's InfDataloader on an (H, W, 3) uint8 RGB image: (1, 3, 256, 256) input and the padded box
    (padded height, padded width, top, left)."""
    import cv2

    h, w = rgb.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = cv2.copyMakeBorder(rgb, top, top, left, left, cv2.BORDER_CONSTANT, value=[0, 0, 0])
    small = cv2.resize(padded, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    x = (small.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None], (*padded.shape[:2], top, left)


def port_map(model: PortSODModel, rgb: np.ndarray) -> np.ndarray:
    """The port's map of an image, taken back to the image: the 256 x 256 probabilities resized (bilinear) to the
    padded image, the padding cropped, x 255 rounded to uint8."""
    import cv2

    x, (ph, pw, top, left) = port_input(rgb)
    with torch.no_grad():
        p = model.probabilities(x)[0, 0].numpy()
    p = cv2.resize(p, (pw, ph), interpolation=cv2.INTER_LINEAR)
    h, w = rgb.shape[:2]
    return np.round(p[top : top + h, left : left + w] * 255).astype(np.uint8)
