"""Precise BatchNorm statistics: re-estimate a trained network's running means and variances on training images.

During training the running statistics are an exponential average (momentum 0.1) over recent batches of a network
that kept changing, at training-time augmentation; prediction uses them as the population's. Re-estimating them with
the final weights, on plain (unaugmented) training images at the size the model will predict at, removes that lag
("precise BN", Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"). Only for networks normalised with
norm "batch"; per-image normalisation has no running statistics to fix.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from .data import load_pair
from .model import PFANet
from .transforms import InputSpec, preprocess


@torch.no_grad()
def recompute_bn_statistics(model: PFANet, spec: InputSpec, pairs, batch_size: int = 8,
                            progress: bool = False) -> int:
    """Replace every BatchNorm's running mean and variance by the average of the batch statistics over the images
    of `pairs` ((image, mask) paths; masks unused), at `spec`'s size and convention. Returns the images used.

    Each batch's mean and variance count equally (PyTorch's cumulative average, momentum None), as the batches of
    `batch_size` the network trained on. The model is left in eval mode, its momenta as they were."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not norms:
        raise ValueError("the model has no BatchNorm layers")
    if getattr(norms[0], "mode", "batch") != "batch":
        raise ValueError("precise BN re-estimates running statistics, which only norm 'batch' uses")
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in norms:
        m.train()  # BatchNorm alone in training mode: dropout stays off, the statistics update
    device = next(model.parameters()).device
    used = 0
    try:
        for start in tqdm(range(0, len(pairs), batch_size), desc="precise BN", disable=not progress):
            images = [load_pair(i, m)[0] for i, m in pairs[start : start + batch_size]]
            if len(images) < 2:  # a batch of one has no variance across images at 1x1 layers
                break
            model(torch.stack([preprocess(img, spec) for img in images]).to(device))
            used += len(images)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return used
