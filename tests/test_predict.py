"""Predictor API and `pfanet predict`: input kinds, batching, every output kind against independent computations,
thresholds, WebP, EXIF, odd image modes, bad files, resuming, stdin/stdout, name clashes.

A small random-weight model (input size 64) keeps this fast; its maps are not meaningful but vary over the image,
which is all these checks need.
"""

from __future__ import annotations

import io
import pathlib
import shutil
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from reference import laplace_edges

from pfanet import cli
from pfanet.predictor import Predictor
from pfanet.runtime import content_key
from pfanet.weights import WeightsError


@pytest.fixture(scope="module")
def predictor(weights):
    return Predictor(weights, device="cpu", batch_size=3, backend="auto")  # what `pfanet predict` runs


@pytest.fixture(scope="module")
def images(ecssd_pairs):
    return [img for img, _ in ecssd_pairs(5)]


def run(capsys, *args) -> tuple[int, str]:
    """`pfanet ARGS` in this process -> (exit status, stderr)."""
    capsys.readouterr()
    status = cli.main([str(a) for a in args])
    return status, capsys.readouterr().err


def rgb_of(path) -> np.ndarray:
    """Independent decode (PIL alone) of an ordinary RGB file."""
    return np.asarray(Image.open(path).convert("RGB"))


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def assert_close_maps(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to one gray level (float reductions may differ between batch shapes), almost everywhere exact."""
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999


# --- Predictor ------------------------------------------------------------------------------------------------------


def test_every_input_kind_gives_the_same_map_at_the_original_size(predictor, images):
    path = images[0]
    rgb = rgb_of(path)
    expected = predictor.predict(path)
    assert expected.dtype == np.uint8 and expected.shape == rgb.shape[:2]
    assert expected.std() > 1  # a map that varies, or the comparisons below prove little
    with open(path, "rb") as f:
        data = f.read()
    for image in (str(path), data, Image.open(path), rgb, np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])):
        np.testing.assert_array_equal(predictor.predict(image), expected)
    gray = rgb[:, :, 1]
    np.testing.assert_array_equal(predictor.predict(gray), predictor.predict(np.repeat(gray[:, :, None], 3, 2)))
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(rgb.astype(np.float32))


def test_batches_equal_one_by_one(predictor, images):
    batched = predictor.predict_batch(images)  # batch_size 3: a full batch and a partial one, of mixed sizes
    assert len(batched) == len(images)
    for path, m in zip(images, batched, strict=True):
        assert_close_maps(m, predictor.predict(path))


def test_flip_averages_the_probabilities_of_the_image_and_its_mirror(weights, images, capsys, tmp_path):
    rgb = rgb_of(images[0])
    h = min(rgb.shape[:2])
    square = np.ascontiguousarray(rgb[:h, :h])  # a square image: the padding cannot break the mirror symmetry
    plain = Predictor(weights, device="cpu", backend="torch")
    flipped = Predictor(weights, device="cpu", backend="torch", flip=True)
    # the mean of the two probability maps, worked out here from the plain predictor's logits
    from pfanet.transforms import postprocess, preprocess

    x = preprocess(square, plain.spec)[None]
    probs = (torch.sigmoid(plain.logits(x)) + torch.sigmoid(plain.logits(x.flip(-1))).flip(-1)) / 2
    want = postprocess(torch.logit(probs[0], eps=1e-7), h, h)
    got = flipped.predict(square)
    assert_close_maps(got, want)
    assert np.abs(got.astype(int) - plain.predict(square).astype(int)).max() > 2  # the average is not the plain map
    assert_close_maps(flipped.predict(square[:, ::-1].copy())[:, ::-1], got)  # a mirrored photo: the mirrored map
    status, err = run(capsys, "predict", images[0], "-o", tmp_path, "--weights", weights, "--backend", "torch",
                      "--flip", "--no-progress")
    assert status == 0, err
    assert_close_maps(read(tmp_path / f"{pathlib.Path(images[0]).stem}.png"), flipped.predict(images[0]))


def test_concurrent_callers_get_their_own_results(predictor, images):
    expected = [predictor.predict(p) for p in images]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = predictor.predict(images[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, m in enumerate(expected):
        assert_close_maps(results[i], m)


def test_missing_default_model_is_explained(monkeypatch, tmp_path, capsys, images):
    monkeypatch.setattr("pfanet.predictor.DEFAULT_WEIGHTS", tmp_path / "absent.safetensors")
    with pytest.raises(WeightsError, match="--weights"):
        Predictor()
    status, err = run(capsys, "predict", images[0], "-o", tmp_path / "out")
    assert status == 2 and "no default model" in err and "--weights" in err


def test_outputs_method_renders_what_is_asked(predictor, images):
    out = predictor.outputs(images[0], ["cutout", "mask"], threshold=100)
    assert list(out) == ["cutout", "mask"]
    np.testing.assert_array_equal(out["cutout"][:, :, 3], predictor.predict(images[0]))


# --- pfanet predict: outputs ----------------------------------------------------------------------------------------


def test_every_output_kind(capsys, tmp_path, weights, predictor, images):
    status, err = run(capsys, "predict", *images[:2], "--weights", weights, "-o", tmp_path,
                      "--outputs", "map,mask,edge,cutout,overlay", "--no-progress")
    assert status == 0, err
    assert "2 written" in err
    names = {p.name for p in tmp_path.iterdir()}
    for path in images[:2]:
        stem = path.stem
        assert {f"{stem}.png", f"{stem}_mask.png", f"{stem}_edge.png", f"{stem}_cutout.png",
                f"{stem}_overlay.png"} <= names
        rgb = rgb_of(path)
        saliency = read(tmp_path / f"{stem}.png")
        np.testing.assert_array_equal(saliency, predictor.predict(path))

        mask = read(tmp_path / f"{stem}_mask.png")
        threshold = min(2 * saliency.mean(), 255)  # adaptive: twice the mean
        np.testing.assert_array_equal(mask, np.where(saliency >= threshold, 255, 0))
        assert 0 < (mask == 255).mean() < 1

        edge = read(tmp_path / f"{stem}_edge.png")
        assert np.abs(edge.astype(int) - laplace_edges(saliency)).max() <= 1 and edge.max() > 0

        cut = Image.open(tmp_path / f"{stem}_cutout.png")
        assert cut.mode == "RGBA" and cut.size == (rgb.shape[1], rgb.shape[0])
        np.testing.assert_array_equal(np.asarray(cut)[:, :, :3], rgb)
        np.testing.assert_array_equal(np.asarray(cut)[:, :, 3], saliency)

        over = read(tmp_path / f"{stem}_overlay.png").astype(int)
        assert over.shape == rgb.shape
        high = saliency > np.percentile(saliency, 90)
        # tinted red in proportion to the map: red gains, green and blue lose, where the map is high
        assert (over[high, 0] - rgb[high, 0]).mean() > 0 > (over[high, 1] - rgb[high, 1]).mean()


def test_fixed_threshold_and_bad_values(capsys, tmp_path, weights, images):
    status, err = run(capsys, "predict", images[0], "--weights", weights, "-o", tmp_path, "--outputs", "map,mask",
                      "--threshold", "140", "--no-progress")
    assert status == 0, err
    saliency, mask = read(tmp_path / f"{images[0].stem}.png"), read(tmp_path / f"{images[0].stem}_mask.png")
    np.testing.assert_array_equal(mask, np.where(saliency >= 140, 255, 0))
    assert 0 < (mask == 255).mean() < 1
    for bad in (["--threshold", "300"], ["--threshold", "half"], ["--outputs", "map,alpha"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["predict", str(images[0]), "-o", str(tmp_path), *bad])
        assert e.value.code == 2


def test_adaptive_threshold_of_a_black_map_is_an_empty_mask():
    from pfanet.outputs import mask

    assert mask(np.zeros((4, 5), np.uint8)).max() == 0
    m = np.array([[0, 10], [30, 40]], np.uint8)  # mean 20 -> threshold 40
    np.testing.assert_array_equal(mask(m), [[0, 0], [0, 255]])


def test_webp_is_lossless(capsys, tmp_path, weights, images):
    args = ["predict", images[0], "--weights", weights, "--outputs", "map,cutout", "--no-progress"]
    assert run(capsys, *args, "-o", tmp_path / "png")[0] == 0
    assert run(capsys, *args, "-o", tmp_path / "webp", "--format", "webp")[0] == 0
    stem = images[0].stem
    webp = Image.open(tmp_path / "webp" / f"{stem}_cutout.webp")
    assert webp.format == "WEBP" and webp.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(webp), read(tmp_path / "png" / f"{stem}_cutout.png"))
    webp = np.asarray(Image.open(tmp_path / "webp" / f"{stem}.webp"))  # WebP has no gray mode: R = G = B = map
    for channel in range(webp.shape[2]):
        np.testing.assert_array_equal(webp[:, :, channel], read(tmp_path / "png" / f"{stem}.png"))


def test_edges_shorthand(capsys, tmp_path, weights, images):
    status, _ = run(capsys, "predict", images[0], "--weights", weights, "-o", tmp_path, "--edges", "--no-progress")
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{images[0].stem}.png", f"{images[0].stem}_edge.png"]


# --- pfanet predict: inputs -----------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(capsys, tmp_path, weights, predictor, images):
    rgb = rgb_of(images[0])
    # Stored turned a quarter to the left; EXIF orientation 6 tells viewers to turn it a quarter right to show it.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(rgb)).save(tmp_path / "turned.png", exif=exif)
    status, err = run(capsys, "predict", tmp_path / "turned.png", "--weights", weights, "-o", tmp_path / "out",
                      "--no-progress")
    assert status == 0, err
    saliency = read(tmp_path / "out" / "turned.png")
    assert saliency.shape == rgb.shape[:2]
    assert_close_maps(saliency, predictor.predict(rgb))


def test_odd_image_modes(capsys, tmp_path, weights, predictor, images):
    rgb = rgb_of(images[1])
    gray = rgb[:, :, 1].copy()
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    src = tmp_path / "in"
    src.mkdir()
    palette = Image.fromarray(rgb).convert("P")
    palette.save(src / "palette.png")
    Image.fromarray(gray).save(src / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(src / "gray16.png")  # 16-bit: 8-bit value v -> v * 257
    Image.fromarray(np.dstack([rgb, alpha])).save(src / "rgba.png")
    Image.fromarray(np.dstack([gray, alpha])).save(src / "gray_alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(src / "cmyk.tif")
    Image.fromarray(gray > 128).save(src / "bilevel.png")
    assert Image.open(src / "gray16.png").mode.startswith("I")
    assert Image.open(src / "cmyk.tif").mode == "CMYK"

    composited = (rgb.astype(np.uint16) * alpha[:, :, None] // 255).astype(np.uint8)  # alpha over black
    expected = {
        "palette": np.asarray(palette.convert("RGB")),
        "gray": gray,
        "gray16": gray,
        "rgba": composited,
        "gray_alpha": composited[:, :, 1],
        "cmyk": np.asarray(Image.open(src / "cmyk.tif").convert("RGB")),
        "bilevel": np.where(gray > 128, 255, 0).astype(np.uint8),
    }
    status, err = run(capsys, "predict", src, "--weights", weights, "-o", tmp_path / "out", "--no-progress")
    assert status == 0, err
    for name, image in expected.items():
        assert_close_maps(read(tmp_path / "out" / f"{name}.png"), predictor.predict(image))


def test_a_bad_file_is_reported_and_the_rest_written(capsys, tmp_path, weights, images):
    src = tmp_path / "in"
    src.mkdir()
    for path in images[:2]:
        shutil.copy(path, src)
    data = images[2].read_bytes()
    (src / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (src / "notes.png").write_text("not an image at all")
    status, err = run(capsys, "predict", src, tmp_path / "missing.jpg", "--weights", weights, "-o", tmp_path / "out",
                      "--no-progress")
    assert status == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{p.stem}.png" for p in images[:2])
    summary = err[err.index("3 failed:"):]
    for bad in ("truncated.jpg", "notes.png", "missing.jpg"):
        assert bad in summary


def test_existing_outputs_are_skipped_unless_overwrite(capsys, tmp_path, weights, images):
    args = ["predict", *images[:2], "--weights", weights, "-o", tmp_path, "--outputs", "map,mask", "--no-progress"]
    assert run(capsys, *args)[0] == 0
    first = tmp_path / f"{images[0].stem}.png"
    first.write_bytes(b"marker")
    (tmp_path / f"{images[1].stem}_mask.png").unlink()  # an interrupted run: one output missing

    status, err = run(capsys, *args)
    assert status == 0 and "1 written" in err and "1 skipped" in err
    assert first.read_bytes() == b"marker" and (tmp_path / f"{images[1].stem}_mask.png").is_file()

    # nothing left to do: the model is not even loaded, so a missing weights file does not matter
    status, err = run(capsys, "predict", *images[:2], "--weights", tmp_path / "gone.safetensors", "-o", tmp_path,
                      "--outputs", "map,mask", "--no-progress")
    assert status == 0 and "2 skipped" in err

    status, err = run(capsys, *args, "--overwrite")
    assert status == 0 and "2 written" in err
    assert read(first).shape == rgb_of(images[0]).shape[:2]


def test_stdin_to_stdout(monkeypatch, capsys, weights, predictor, images):
    def predict_stdin(*args) -> tuple[int, bytes]:
        stdin, stdout = io.TextIOWrapper(io.BytesIO(images[0].read_bytes())), io.TextIOWrapper(io.BytesIO())
        monkeypatch.setattr(sys, "stdin", stdin)
        monkeypatch.setattr(sys, "stdout", stdout)
        status = cli.main(["predict", "-", "--weights", str(weights), *args])
        monkeypatch.undo()
        return status, stdout.buffer.getvalue()

    status, data = predict_stdin()
    assert status == 0 and data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), predictor.predict(images[0]))
    status, data = predict_stdin("--outputs", "cutout", "--format", "webp")
    assert status == 0 and Image.open(io.BytesIO(data)).mode == "RGBA"
    status, _ = predict_stdin("--outputs", "map,mask")
    assert status == 2 and "one image" in capsys.readouterr().err


def test_folders_mirror_subfolders_and_clashes_are_reported(capsys, tmp_path, weights, predictor, images):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "sub").mkdir(parents=True)
    b.mkdir()
    shutil.copy(images[0], a / "x.jpg")
    shutil.copy(images[1], a / "sub" / "x.jpg")
    shutil.copy(images[2], b / "x.jpg")  # same relative name as a/x.jpg
    Image.open(images[3]).save(a / "sub" / "x.png")  # same stem as a/sub/x.jpg
    status, err = run(capsys, "predict", a, b, "--weights", weights, "-o", tmp_path / "out", "--no-progress")
    assert status == 1
    assert (tmp_path / "out" / "x.png").is_file() and (tmp_path / "out" / "sub" / "x.png").is_file()
    assert "2 written" in err and "2 failed" in err
    assert str(b / "x.jpg") in err and str(a / "sub" / "x.png") in err
    # the first owner's outputs are the ones written
    assert_close_maps(read(tmp_path / "out" / "x.png"), predictor.predict(images[0]))


def test_glob_patterns(capsys, tmp_path, weights, images):
    (tmp_path / "in" / "deep").mkdir(parents=True)
    shutil.copy(images[0], tmp_path / "in" / "one.jpg")
    shutil.copy(images[1], tmp_path / "in" / "deep" / "two.jpg")
    (tmp_path / "in" / "skip.txt").write_text("not matched")
    status, err = run(capsys, "predict", f"{tmp_path}/in/**/*.jpg", "--weights", weights, "-o", tmp_path / "out",
                      "--no-progress")
    assert status == 0, err
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png")) == [
        "deep/two.png", "one.png"]
    status, err = run(capsys, "predict", f"{tmp_path}/in/*.gif", "--weights", weights, "-o", tmp_path / "out")
    assert status == 1 and "no image matches" in err


# ---- backends -------------------------------------------------------------------------------------------------------


def test_onnxruntime_backend_exports_once_and_matches_pytorch(weights, images, onnx_cache):
    torch_maps = Predictor(weights, device="cpu", backend="torch").predict_batch(images[:3])
    fast = Predictor(weights, device="cpu", backend="onnxruntime")
    assert fast.backend == "onnxruntime" and type(fast.model).__name__ == "OnnxNetwork"
    graph = onnx_cache / "onnx" / f"{content_key(pathlib.Path(weights))}.onnx"  # keyed by the weights' bytes
    assert fast.model.path == graph
    stamp = graph.stat().st_mtime_ns
    for want, got in zip(torch_maps, fast.predict_batch(images[:3]), strict=True):
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want).max() <= 1  # float rounding may cross a gray level
        assert (got == want).mean() > 0.999
    again = Predictor(weights, device="cpu", backend="auto")  # auto on the CPU: the same cached graph
    assert again.backend == "onnxruntime" and again.model.path == graph and graph.stat().st_mtime_ns == stamp


def test_backend_falls_back_to_pytorch_when_the_cache_cannot_be_written(weights, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("PFANET_CACHE", str(blocker))
    p = Predictor(weights, device="cpu", backend="onnxruntime")
    assert p.backend == "torch" and "running on PyTorch" in caplog.text
    with pytest.raises(ValueError, match="backend must be one of"):
        Predictor(weights, device="cpu", backend="tensorrt")
    assert Predictor(weights, device="cpu").backend == "torch"  # the Python default is the reference


def test_a_model_passed_in_keeps_its_device_and_mode(weights, predictor, images):
    """Predictor(model=m) runs m where it is and in eval mode for each pass only: a model being trained stays in
    train mode (and is not moved to a default device)."""
    from pfanet.weights import load_checkpoint

    model, spec, _ = load_checkpoint(weights)
    model.train()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    mine = Predictor(model=model, spec=spec)
    assert mine.device == torch.device("cpu") and model.training
    saliency = mine.predict(images[0])
    assert modes == [False] and model.training  # eval for the pass, train again after
    np.testing.assert_array_equal(saliency, predictor.predict(images[0]))
