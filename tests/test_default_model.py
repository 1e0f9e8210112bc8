"""Guard for the shipped default model: on DUTS-TR val pairs it must score at least half-way from the model it
replaced to itself, so a broken, missing or older default model fails CI; and it must beat a centred Gaussian
prior on ECSSD val.

PFANET_GUARD_WEIGHTS=FILE runs the guard on another file instead (e.g. the model it replaced, which must fail).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from pfanet.io import load_image, load_mask
from pfanet.predictor import DEFAULT_WEIGHTS, Predictor

DUTS_VAL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "duts-tr" / "val.txt"
GUARD_PAIRS = 24  # evenly spaced over DUTS-TR val.txt
# On those 24 pairs, each at its own size (`python tools/guard_figures.py FILE...` prints them): the shipped model
# and the one it replaced; the thresholds are half-way between the two.
SHIPPED = {"mae": 0.0662, "maxF": 0.8834}  # pfanet_duts.safetensors (cpu-duts-iou at 80,384 images, 224, precise BN)
REPLACED = {"mae": 0.0734, "maxF": 0.8663}  # pfanet_duts.safetensors of commit a01fd89 (cpu-duts-iou at 20,000, 192)
# Before it, commit a8cbf06's (cpu-duts-192 end, 192x192): MAE 0.0916, max F 0.8620.
# Before it, commit 48dda1d's (cpu-duts end, 160x160): MAE 0.0987, max F 0.8498.
# Before it, commit aea296f's (cpu-duts, 19,200 images): MAE 0.1022, max F 0.8397.
# Before it, commit 7788aec's (cpu-duts, 12,800 images): MAE 0.1189, max F 0.8234.
# Before it, commit 5a98c07's (cpu-duts, 6,400 images): MAE 0.1371, max F 0.8121.
# The first model, pfanet_ecssd.safetensors of commit c029a8f (ECSSD train): MAE 0.1899, max F 0.7597.
MAX_MAE = (SHIPPED["mae"] + REPLACED["mae"]) / 2
MIN_MAXF = (SHIPPED["maxF"] + REPLACED["maxF"]) / 2


def guard_weights() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PFANET_GUARD_WEIGHTS", DEFAULT_WEIGHTS))


def gaussian_prior(h: int, w: int) -> np.ndarray:
    """A centred Gaussian (sigma = a quarter of each side): the classic center-bias baseline, as uint8."""
    y, x = np.mgrid[0:h, 0:w]
    g = np.exp(-(((y - (h - 1) / 2) / (h / 4)) ** 2 + ((x - (w - 1) / 2) / (w / 4)) ** 2) / 2)
    return np.round(g / g.max() * 255).astype(np.uint8)


def scores(maps, masks):
    import py_sod_metrics as sod

    mae, fm = sod.MAE(), sod.FmeasureV2({"fm": sod.FmeasureHandler(with_dynamic=True, with_adaptive=False, beta=0.3)})
    for m, g in zip(maps, masks, strict=True):
        mae.step(pred=m, gt=g)
        fm.step(pred=m, gt=g)
    return mae.get_results()["mae"], float(np.max(fm.get_results()["fm"]["dynamic"]))


def guard_pairs():
    from pfanet.data import read_pairs
    from pfanet.train import evenly_spaced

    if not DUTS_VAL.is_file():
        pytest.skip(f"DUTS-TR not found at {DUTS_VAL}")
    return evenly_spaced(read_pairs(DUTS_VAL), GUARD_PAIRS)


def test_default_weights_are_shipped():
    assert DEFAULT_WEIGHTS.is_file(), f"the default model {DEFAULT_WEIGHTS} is missing"


def test_default_model_has_replaced_the_old_one():
    from pfanet.evaluate import score_pairs

    found = score_pairs(Predictor(guard_weights(), device="cpu", batch_size=4, backend="torch"), guard_pairs())
    mae, max_f = found["mae"], found["maxF"]
    print(f"{guard_weights().name}: MAE {mae:.4f} max F {max_f:.4f} (thresholds {MAX_MAE:.4f} / {MIN_MAXF:.4f})")
    assert mae < MAX_MAE and max_f > MIN_MAXF


def test_default_model_beats_center_prior(ecssd_val_pairs):
    pairs = ecssd_val_pairs(12)
    predictor = Predictor(guard_weights(), device="cpu", batch_size=4, backend="torch")
    maps = predictor.predict_batch([p for p, _ in pairs])
    masks = [load_mask(m) for _, m in pairs]
    prior = [gaussian_prior(*g.shape) for g in masks]
    assert all(m.shape == g.shape for m, g in zip(maps, masks, strict=True))
    assert all(load_image(p).shape[:2] == m.shape for (p, _), m in zip(pairs, maps, strict=True))
    model_mae, model_f = scores(maps, masks)
    prior_mae, prior_f = scores(prior, masks)
    print(f"model MAE {model_mae:.4f} maxF {model_f:.4f}; prior MAE {prior_mae:.4f} maxF {prior_f:.4f}")
    assert model_mae < 0.75 * prior_mae
    assert model_f > prior_f + 0.1
