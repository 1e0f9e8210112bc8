"""Evaluation of saliency maps against ground-truth masks with the community's reference metrics (pysodmetrics)."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from .io import load_mask


def score_pairs(predictor, pairs, metrics=("mae", "maxF"), progress: bool = False) -> dict[str, float]:
    """Run `predictor` on (image, mask) pairs and score the maps at the masks' size."""
    import py_sod_metrics as sod

    mae, fm = sod.MAE(), sod.Fmeasure()
    for img_path, mask_path in tqdm(pairs, disable=not progress, desc="scoring"):
        mask = load_mask(mask_path)
        pred = predictor.predict(img_path)
        mae.step(pred=pred, gt=mask)
        fm.step(pred=pred, gt=mask)
    f = fm.get_results()["fm"]
    return {"mae": float(mae.get_results()["mae"]), "maxF": float(np.max(f["curve"])), "n": len(pairs)}
