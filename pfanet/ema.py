"""An exponential moving average of a network's weights, the copy that is validated and shipped (recipe `ema`).

After every optimizer step, ema = decay * ema + (1 - decay) * weights, for the parameters and for BatchNorm's
running statistics alike (the average network then carries statistics of about the same age as its weights). The
average follows the weights over the last ~1 / (1 - decay) steps and smooths the step-to-step noise of a constant or
slowly decaying learning rate. Measured from the shipped model, 4,000 DUTS-TR images: DUTS-TR val (200) MAE 0.0997 ->
0.0933 and max F 0.8685 -> 0.8725 at decay 0.99, with no change to training itself (docs/TRAINING.md).
"""

from __future__ import annotations

import copy

import torch


class ModelEMA:
    """`module` is the averaged network (eval mode, no gradients), built as a copy of `model`."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = model.state_dict()
        for name, avg in self.module.state_dict().items():
            new = current[name].detach()
            if avg.is_floating_point():
                avg.lerp_(new.to(avg.dtype), 1 - self.decay)
            else:
                avg.copy_(new)  # BatchNorm's batch counter

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
