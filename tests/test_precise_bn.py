"""Precise BN (pfanet.precise_bn) and how tools/select_model.py picks a checkpoint's prediction settings."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

from pfanet.model import PFANet, PFANetConfig
from pfanet.precise_bn import recompute_bn_statistics
from pfanet.transforms import InputSpec

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
from select_model import choose


def test_running_statistics_become_the_mean_of_the_batch_statistics(ecssd_pairs):
    torch.manual_seed(0)
    model = PFANet(PFANetConfig(norm="batch", dropout=True))
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    inputs = []
    norm.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach().clone()))
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    used = recompute_bn_statistics(model, InputSpec(size=64), ecssd_pairs(5), batch_size=2)
    assert used == 4 and len(inputs) == 2  # two batches of two; the last single image is left out
    # PyTorch's own BatchNorm would give the same; worked out here from what the layer saw, batch by batch
    want_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
    want_var = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for x in inputs]).mean(0)
    torch.testing.assert_close(norm.running_mean, want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_var, want_var, rtol=1e-5, atol=1e-6)
    assert not model.training and not any(m.training for m in model.modules())
    assert [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)] == momenta
    # dropout stayed off while the statistics were gathered: the same images give the same statistics again
    before = norm.running_mean.clone()
    recompute_bn_statistics(model, InputSpec(size=64), ecssd_pairs(5), batch_size=2)
    torch.testing.assert_close(norm.running_mean, before)


def test_per_image_networks_have_no_statistics_to_recompute(ecssd_pairs):
    with pytest.raises(ValueError, match="norm 'batch'"):
        recompute_bn_statistics(PFANet(PFANetConfig(norm="per-image")), InputSpec(size=64), ecssd_pairs(2))


def row(size, bn, mae, maxf):
    return {"size": size, "precise_bn": bn, "duts_mae": mae, "duts_maxF": maxf}


def test_a_variant_replaces_the_checkpoint_only_when_no_worse_in_both_and_better_in_one():
    base = row(192, 0, 0.097, 0.869)
    assert choose([base, row(224, 0, 0.093, 0.868)]) == base  # better MAE, worse max F
    assert choose([base, row(224, 0, 0.097, 0.869)]) == base  # equal: no reason to change
    lower = row(192, 400, 0.095, 0.869)
    assert choose([base, lower, row(224, 400, 0.096, 0.871)]) == lower  # of the better ones, the lowest MAE
