"""Guard for the shipped default model: on ECSSD val images it must be far better than a trivial centred Gaussian
prior, so a broken or missing default model fails CI."""

from __future__ import annotations

import numpy as np
import pytest

from pfanet.io import load_image, load_mask
from pfanet.predictor import DEFAULT_WEIGHTS, Predictor


def gaussian_prior(h: int, w: int) -> np.ndarray:
    """A centred Gaussian (sigma = a quarter of each side): the classic center-bias baseline, as uint8."""
    y, x = np.mgrid[0:h, 0:w]
    g = np.exp(-(((y - (h - 1) / 2) / (h / 4)) ** 2 + ((x - (w - 1) / 2) / (w / 4)) ** 2) / 2)
    return np.round(g / g.max() * 255).astype(np.uint8)


def scores(maps, masks):
    import py_sod_metrics as sod

    mae, fm = sod.MAE(), sod.FmeasureV2({"fm": sod.FmeasureHandler(with_dynamic=True, with_adaptive=False, beta=0.3)})
    for m, g in zip(maps, masks):
        mae.step(pred=m, gt=g)
        fm.step(pred=m, gt=g)
    return mae.get_results()["mae"], float(np.max(fm.get_results()["fm"]["dynamic"]))


def test_default_weights_are_shipped():
    assert DEFAULT_WEIGHTS.is_file(), f"the default model {DEFAULT_WEIGHTS} is missing"


def test_default_model_beats_center_prior(ecssd_val_pairs):
    if not DEFAULT_WEIGHTS.is_file():
        pytest.fail(f"the default model {DEFAULT_WEIGHTS} is missing")
    pairs = ecssd_val_pairs(12)
    predictor = Predictor(device="cpu", batch_size=4)
    maps = predictor.predict_batch([p for p, _ in pairs])
    masks = [load_mask(m) for _, m in pairs]
    prior = [gaussian_prior(*g.shape) for g in masks]
    assert all(m.shape == g.shape for m, g in zip(maps, masks))
    assert all(load_image(p).shape[:2] == m.shape for (p, _), m in zip(pairs, maps))
    model_mae, model_f = scores(maps, masks)
    prior_mae, prior_f = scores(prior, masks)
    print(f"model MAE {model_mae:.4f} maxF {model_f:.4f}; prior MAE {prior_mae:.4f} maxF {prior_f:.4f}")
    assert model_mae < 0.75 * prior_mae
    assert model_f > prior_f + 0.1
