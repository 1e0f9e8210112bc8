"""A run's parts built from its recipe alone (no data, no run folder): the network, the optimizer, and the one seed
derivation every per-epoch random stream of a run comes from."""

from __future__ import annotations

import dataclasses

import torch

from ..model import PFANet, PFANetConfig
from ..recipes import Recipe
from ..transforms import InputSpec
from ..weights import load_backbone, load_checkpoint, load_state


def epoch_seed(seed: int, epoch: int, rank: int = 0, offset: int = 0) -> int:
    """The seed of one epoch's random stream.

    Rank 0's is the epoch's sample order and its DataLoader generator, the same on every process; each process's
    own is its dropout (the global generator), and `offset` the step a run was resumed at when another number of
    processes saved it (their generator states do not carry over). Runs under way depend on these numbers: a run
    resumed after a change to this formula would not continue the run it resumes.
    """
    return seed * 100_003 + epoch + rank * 1_000_003 + offset


def freeze_blocks(model: PFANet, n: int) -> None:
    """Keep the convolutions of VGG blocks 1..n fixed."""
    for name, conv in model.backbone.convs.items():
        if int(name[4]) <= n:  # "conv3_1" -> block 3
            conv.requires_grad_(False)


def build_model(recipe: Recipe, device: str | torch.device = "cpu",
                channels_last: bool = False) -> tuple[PFANet, InputSpec]:
    """The recipe's network, ready to train, and its input convention at the first epoch's size.

    With `recipe.init` (fine-tuning) every layer comes from that trained PFANet file, whose network variant (e.g.
    the PyTorch port's 3x3 C345 conv) and input convention are kept, with the recipe's dropout and norm; otherwise a
    new network gets the `recipe.backbone` VGG16 and that backbone's convention. Then VGG blocks 1..freeze_blocks are
    frozen and BatchNorm takes the recipe's running-statistics rate. A new network's initialisation draws from the
    global generator: seed it first for a reproducible start.
    """
    if recipe.init:
        start, spec, _ = load_checkpoint(recipe.init)
        model = PFANet(dataclasses.replace(start.config, dropout=recipe.dropout, norm=recipe.norm))
        load_state(model, start.state_dict(), recipe.init)
    else:
        model = PFANet(PFANetConfig(dropout=recipe.dropout, norm=recipe.norm))
        spec = load_backbone(model, recipe.backbone)
    freeze_blocks(model, recipe.freeze_blocks)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = recipe.bn_momentum
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, dataclasses.replace(spec, size=recipe.size_at(0))


def make_optimizer(model: PFANet, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters. Weight decay goes to convolution and dense weights only,
    unless `decay_norm_bias`: decaying biases and norm scales pulls them to zero for no regularising gain."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 or recipe.decay_norm_bias else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr(0))
    return torch.optim.SGD(groups, lr=recipe.lr(0), momentum=recipe.momentum)
