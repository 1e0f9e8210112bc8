"""Fidelity with the official Keras model: the official network rebuilt in tf_keras (tests/keras_official.py) with
random weights, saved the way Keras 2 saves them, loaded into our PFANet; and the same network built and saved by
Keras 3 (.weights.h5, .keras), where Keras 3 is installed (TensorFlow >= 2.16 brings it).

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
from pfanet.transforms import OFFICIAL_INPUT
from pfanet.weights import load_checkpoint, load_official_h5

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


# ---------------------------------------------------------------------------------------------------------------
# The official network saved by Keras 3


@pytest.fixture(scope="module")
def keras3_official(tmp_path_factory):
    """(Keras-3 model, its save_weights .weights.h5, its model.save .keras, {layer: arrays} as saved), random weights
    saved before any call (a call moves the always-training BatchNorm's moving statistics)."""
    k3 = pytest.importorskip("keras")
    if int(k3.__version__.split(".")[0]) < 3:
        pytest.skip(f"Keras 3 is not installed (keras {k3.__version__})")
    folder = tmp_path_factory.mktemp("keras3")
    k3.backend.clear_session()
    model = build_official(SIZE, keras=k3)
    randomise(model, seed=3, logit_scale=2.0)
    model.save_weights(str(folder / "PFA_00050.weights.h5"))
    model.save(str(folder / "PFA_00050.keras"))
    saved = {layer.name: [np.asarray(w) for w in layer.weights] for layer in model.layers if layer.weights}
    return model, folder / "PFA_00050.weights.h5", folder / "PFA_00050.keras", saved


def test_keras3_files_are_the_keras3_layout(keras3_official):
    import h5py

    _, weights, _, _ = keras3_official
    with h5py.File(weights, "r") as f:
        assert "layer_names" not in f.attrs and "layers" in f  # not the Keras-2 layout
        names = {g["vars"].attrs.get("name") for g in f["layers"].values() if "vars" in g and len(g["vars"])}
        assert {"C3_cfe_BN", "C345_conv", "sa", "block5_conv3"} <= names


def test_keras3_files_match_the_keras3_models_logits(keras3_official):
    model, weights, archive, _ = keras3_official
    rng = np.random.default_rng(2)
    x = (rng.uniform(0, 255, (1, SIZE, SIZE, 3)) - OFFICIAL_MEANS).astype(np.float32)
    want = np.asarray(model(x, training=False))[..., 0]
    assert want.std() > 0.5
    states = []
    for path in (weights, archive):
        ours, spec, meta = load_checkpoint(path)
        assert spec == OFFICIAL_INPUT and meta["format"] == "keras-official"
        with torch.no_grad():
            got = ours(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()[:, 0]
        diff = np.abs(got - want).max()
        print(f"\n{path.name}: max |dlogit| vs Keras 3 = {diff:.3g}")
        assert diff <= LOGIT_TOLERANCE
        states.append(ours.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_keras3_and_keras2_files_of_the_same_weights_load_the_same(keras3_official, tmp_path):
    """The Keras-3 model's weights put into the tf_keras network (layer by layer, by name; the two unnamed Dense by
    shape) and saved as a Keras-2 .h5: both files load to identical tensors."""
    _, weights, _, saved = keras3_official
    keras.backend.clear_session()
    k2 = build_official(SIZE)
    dense3 = {tuple(a.shape for a in arrays): arrays for name, arrays in saved.items() if name.startswith("dense")}
    for layer in k2.layers:
        if layer.weights:
            shapes = tuple(tuple(w.shape) for w in layer.weights)
            layer.set_weights(dense3[shapes] if layer.name.startswith("dense") else saved[layer.name])
    k2.save_weights(str(tmp_path / "PFA_00050.h5"))
    a, b = load_official_h5(tmp_path / "PFA_00050.h5")[0].state_dict(), load_official_h5(weights)[0].state_dict()
    for k, v in a.items():
        assert torch.equal(b[k], v), k


def test_a_keras3_archive_without_layer_names_is_read_through_its_config(keras3_official, tmp_path):
    """Keras 3 versions before the vars groups carried their layer's name: the archive's config.json says which
    group (conv2d, conv2d_1, ...) is which layer."""
    import io
    import zipfile

    import h5py

    _, _, archive, _ = keras3_official
    with zipfile.ZipFile(archive) as z:
        files = {name: z.read(name) for name in z.namelist()}
    weights = io.BytesIO(files["model.weights.h5"])
    with h5py.File(weights, "r+") as f:
        for group in f["layers"].values():
            if "vars" in group:
                group["vars"].attrs.pop("name", None)
    files["model.weights.h5"] = weights.getvalue()
    unnamed = tmp_path / "unnamed.keras"
    with zipfile.ZipFile(unnamed, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    a, b = load_checkpoint(archive)[0].state_dict(), load_checkpoint(unnamed)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
