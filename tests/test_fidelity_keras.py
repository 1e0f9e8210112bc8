"""Fidelity with the official Keras model: the official network rebuilt in tf_keras (tests/keras_official.py) with
random weights, saved the way Keras 2 saves them, loaded into our PFANet.

Skipped where TensorFlow and tf_keras are not installed (they are not pfanet dependencies); docs/FIDELITY.md says how
to run it and what it measured. Set PFANET_FIDELITY_IMAGES to change how many ECSSD val images the pipeline check uses.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("tf_keras")

from keras_official import build_official, randomise

from pfanet.predictor import Predictor
from pfanet.weights import load_official_h5

SIZE = 256
LOGIT_TOLERANCE = 1e-3
# Caffe BGR means subtracted from RGB-ordered channels 0, 1, 2: the official code's convention
OFFICIAL_MEANS = np.array([103.939, 116.779, 123.68], np.float32)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(keras model, weights-only .h5, full-model .h5, weights-only .h5 written with the other Dense names)."""
    folder = tmp_path_factory.mktemp("keras")
    keras.backend.clear_session()
    keras.layers.Dense(1)  # take the first auto-name, so the attention's Dense layers are dense_1 / dense_2
    model = build_official(SIZE)
    dense = sorted(layer.name for layer in model.layers if layer.name.startswith("dense"))
    assert dense == ["dense_1", "dense_2"]
    randomise(model, seed=0, logit_scale=2.0)
    # Save before any forward pass: the always-training BatchNorm updates its moving statistics when called.
    model.save_weights(str(folder / "PFA_00050.h5"))
    model.save(str(folder / "PFA_full.h5"))

    keras.backend.clear_session()  # a fresh session: Keras names them dense / dense_1 this time
    other = build_official(SIZE)
    assert sorted(layer.name for layer in other.layers if layer.name.startswith("dense")) == ["dense", "dense_1"]
    other.set_weights(model.get_weights())
    other.save_weights(str(folder / "PFA_other_names.h5"))
    return model, folder / "PFA_00050.h5", folder / "PFA_full.h5", folder / "PFA_other_names.h5"


def test_keras_files_are_the_keras2_layout(official):
    import h5py

    _, weights, full, _ = official
    with h5py.File(weights, "r") as f:
        assert "layer_names" in f.attrs and "C3_cfe_BN" in f
        names = [n.decode() if isinstance(n, bytes) else n for n in f["C3_cfe_BN"].attrs["weight_names"]]
        assert names == [
            "C3_cfe_BN/gamma:0", "C3_cfe_BN/beta:0", "C3_cfe_BN/moving_mean:0", "C3_cfe_BN/moving_variance:0"]
    with h5py.File(full, "r") as f:
        assert "model_weights" in f and "layer_names" in f["model_weights"].attrs


def test_logits_match_the_official_keras_model(official):
    model, weights, _, _ = official
    ours, _ = load_official_h5(weights)
    ours.eval()
    rng = np.random.default_rng(1)
    x = (rng.uniform(0, 255, (1, SIZE, SIZE, 3)) - OFFICIAL_MEANS).astype(np.float32)  # NHWC, official convention
    want = model(x, training=False).numpy()[..., 0]
    with torch.no_grad():
        got = ours(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()[:, 0]
    diff = np.abs(got - want).max()
    print(f"\nlogits at {SIZE}x{SIZE}: max |dlogit| = {diff:.3g}, logit range [{want.min():.2f}, {want.max():.2f}],"
          f" std {want.std():.2f}")
    assert want.std() > 0.5  # a network whose output varies, not a constant
    assert diff <= LOGIT_TOLERANCE


def test_full_model_and_other_dense_names_load_the_same_weights(official):
    _, weights, full, other_names = official
    reference = load_official_h5(weights)[0].state_dict()
    for path in (full, other_names):
        state = load_official_h5(path)[0].state_dict()
        for k, v in reference.items():
            assert torch.equal(state[k], v), f"{path.name}: {k}"


def official_demo(model, path: str) -> np.ndarray:
    """The official demo pipeline with OpenCV: read BGR, reverse to RGB, subtract the means, zero-pad to a centred
    square, bilinear resize to 256, predict, sigmoid x 255 cast to uint8, resize back, crop the centre."""
    import cv2

    x = cv2.imread(path).astype(np.float32)
    h, w = x.shape[:2]
    x = x[..., ::-1] - OFFICIAL_MEANS
    side = max(h, w)
    square = np.zeros((side, side, 3))
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = x
    x = cv2.resize(square, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)[None]
    logits = model.predict(x, verbose=0)
    m = np.array(1 / (1 + np.exp(-logits)) * 255, dtype=np.uint8).squeeze()
    m = cv2.resize(m, (side, side))
    return m[top : top + h, left : left + w]


def test_predict_pipeline_matches_the_official_demo(official, ecssd_val_pairs):
    pytest.importorskip("cv2")
    model, weights, _, _ = official
    pairs = ecssd_val_pairs(int(os.environ.get("PFANET_FIDELITY_IMAGES", "20")))
    predictor = Predictor(weights, device="cpu")
    within, total, worst, mid = 0, 0, 0, 0
    for image, _ in pairs:
        want = official_demo(model, str(image)).astype(int)
        got = predictor.predict(image).astype(int)
        assert got.shape == want.shape, image
        d = np.abs(got - want)
        within += int((d <= 1).sum())
        total += d.size
        worst = max(worst, int(d.max()))
        mid += int(((want > 10) & (want < 245)).sum())
    fraction = within / total
    print(f"\npredict vs official demo on {len(pairs)} ECSSD val images: {100 * fraction:.4f} % of {total} pixels "
          f"within 1 gray level, max difference {worst}, {100 * mid / total:.1f} % of pixels in 11..244")
    assert mid / total > 0.2  # maps that use the gray range, so that the comparison means something
    assert fraction >= 0.999
