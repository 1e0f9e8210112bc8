"""One optimizer step of a network on a batch: the forward pass (bf16 autocast, channels_last), the recipe's loss,
the check that it is finite on every process, backward, the optimizer, the moving average."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from ..ema import ModelEMA
from ..loss import activity_regulariser, training_loss
from ..model import PFANet
from ..recipes import Recipe
from .distributed import DistributedEnv


class TrainingStopped(RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


class TrainStep:
    """`step(x, y, alpha)` -> (the loss, the mean over processes; the number of images, all processes).

    Args:
        model: the network being trained (its channel attention carries the recipe's activity regulariser).
        optimizer: over the model's trainable parameters.
        recipe: the loss's IoU term, edge mode and regulariser.
        net: what the forward pass runs: the model, or a DistributedDataParallel / torch.compile wrapper of it.
        env: the processes the loss is averaged over (default: this one alone).
        ema: a moving average updated after each step.
        loss_fn: training_loss's signature (logits, target, alpha, iou, edge_mode); replaced in tests.
    """

    def __init__(self, model: PFANet, optimizer: torch.optim.Optimizer, recipe: Recipe, *,
                 net: torch.nn.Module | None = None, env: DistributedEnv | None = None, bf16: bool = False,
                 channels_last: bool = False, ema: ModelEMA | None = None, loss_fn: Callable = training_loss):
        self.model, self.optimizer, self.recipe = model, optimizer, recipe
        self.net = model if net is None else net
        self.env = env or DistributedEnv()
        self.bf16, self.channels_last, self.ema, self.loss_fn = bf16, channels_last, ema, loss_fn

    def loss(self, x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
        device = self.env.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            logits = self.net(x)
        # the loss in float32 whatever the forward pass ran in
        loss = self.loss_fn(logits.float(), y, alpha, self.recipe.iou, self.recipe.edge_mode)
        if self.recipe.ca_regulariser:
            loss = loss + activity_regulariser(self.model.channel_attention_weights())
        return loss

    def __call__(self, x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[float, int]:
        """A NaN/Inf loss on any process raises TrainingStopped on all of them before the weights change."""
        loss = self.loss(x, y, alpha)
        total, images = self.env.sum(loss.item(), len(x))
        value = total / self.env.world
        if not math.isfinite(value):
            raise TrainingStopped(f"the loss became {value}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return value, int(images)
