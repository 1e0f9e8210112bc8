"""INT8 export (`pfanet export --int8`): a quantised graph that Predictor runs, close to the fp32 export; and a smoke
run of benchmarks/perf.py on tiny settings."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from pfanet.cli import main
from pfanet.export import calibration_images
from pfanet.io import load_image
from pfanet.predictor import Predictor

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def int8(weights, ecssd, tmp_path_factory):
    """The tiny random-weight model exported as INT8, calibrated on 4 ECSSD train images."""
    path = tmp_path_factory.mktemp("int8") / "int8.onnx"
    assert main(["export", "--weights", str(weights), "-o", str(path), "--int8", "--calibration",
                 str(ecssd / "train.txt"), "--calibration-count", "4", "--no-check"]) == 0
    return path


def _producer(graph, tensor: str):
    return next((n for n in graph.node if tensor in n.output), None)


def test_int8_graph_is_quantised_but_keeps_the_logits_layer_float(int8):
    proto = onnx.load(str(int8))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    # PFANet has 34 convolutions and 2 dense layers (model.py); all but the last convolution carry int8 weights.
    assert len(int8_weights) == 35
    last = _producer(proto.graph, proto.graph.output[0].name)
    assert last.op_type == "Conv"
    weight_source = _producer(proto.graph, last.input[1])
    assert weight_source is None or weight_source.op_type != "DequantizeLinear"  # a float initializer
    # int8 weights: about a quarter of the 16.18 M fp32 parameters' 64.7 MB (PFANET.md)
    assert int8.stat().st_size < 16.18e6 * 4 / 3


def test_int8_metadata_says_how_it_was_made(int8):
    meta = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    info = json.loads(meta["pfanet"])
    # the tiny fixture's InputSpec(size=64): the official convention at 64
    assert info["input"] == {"channel_order": "RGB", "mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0],
                             "size": 64}
    assert (meta["input_mean"], meta["input_size"]) == ("103.939,116.779,123.68", "64")
    assert info["int8"]["calibration_images"] == 4
    assert info["int8"]["per_channel"] and info["int8"]["reduce_range"]


def test_int8_maps_through_predictor_follow_fp32(weights, int8, ecssd_val_pairs):
    images = [load_image(img) for img, _ in ecssd_val_pairs(3)]  # not among the calibration images
    # fp32 reference: the PyTorch weights (the fp32 ONNX export equals them within 1e-4, tests/test_export.py)
    want = Predictor(weights, device="cpu").predict_batch(images)
    got = Predictor(int8, device="cpu").predict_batch(images)
    for rgb, a, b in zip(images, want, got):
        assert b.shape == rgb.shape[:2] and b.dtype == np.uint8
        r = np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1]
        # On this random-weight net, measured: r = 0.994-0.996, mean differences 4.0-4.5 gray levels (the shipped
        # model at 192: 0.6). The loose bounds catch a broken graph (e.g. saturating int8 kernels, wrong ranges),
        # not a few gray levels.
        assert r > 0.95
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 8


def test_int8_export_needs_calibration_images(weights, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    assert main(["export", "--weights", str(weights), "-o", str(out), "--int8"]) == 2
    assert "--int8 needs --calibration" in capsys.readouterr().err
    assert main(["export", "--weights", str(weights), "-o", str(out), "--calibration", str(tmp_path)]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--weights", str(weights), "-o", str(out), "--int8", "--calibration", str(empty)]) == 2
    assert f"{empty}: no calibration images" in capsys.readouterr().err
    assert not out.exists()


def test_calibration_images_from_a_list_a_benchmark_folder_and_a_plain_folder(tmp_path):
    for name in ("b.png", "a.png", "c.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert [p.name for p in calibration_images(tmp_path, 2)] == ["a.png", "b.png"]
    bench = tmp_path / "bench"
    (bench / "images").mkdir(parents=True)
    (bench / "masks").mkdir()
    for stem in ("x", "y"):
        Image.new("RGB", (8, 8)).save(bench / "images" / f"{stem}.jpg")
        Image.new("L", (8, 8)).save(bench / "masks" / f"{stem}.png")
    assert [p.name for p in calibration_images(bench)] == ["x.jpg", "y.jpg"]
    listing = tmp_path / "list.txt"
    listing.write_text("c.jpg a.png\nb.png a.png\n")
    assert calibration_images(listing, 5) == [tmp_path / "c.jpg", tmp_path / "b.png"]


@pytest.fixture(scope="module")
def perf_run(weights, ecssd, tmp_path_factory):
    """benchmarks/perf.py --quick on tiny settings: 64x64 inference, 32x32 training, a 640x480 photo, 8 masks."""
    spec = importlib.util.spec_from_file_location("benchmarks_perf", REPO / "benchmarks" / "perf.py")
    perf = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = perf  # dataclasses look their module up there
    spec.loader.exec_module(perf)
    out = tmp_path_factory.mktemp("perf") / "perf.json"
    assert perf.main(["--quick", "--weights", str(weights), "--size", "64", "--train-size", "32", "--paths",
                      "eager,channels_last,ort", "--train-paths", "eager", "--batches", "1,2", "--photo-size",
                      "640x480", "--eval-limit", "8", "--data", str(ecssd), "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_perf_counts_the_model_flops(perf_run):
    # PFANET.md: 65.3 GFLOP per 256x256 image; everything but the two small dense layers scales with the pixels.
    assert perf_run["gflop_per_image"] == pytest.approx(65.3 / 16, rel=0.01)


def test_perf_reports_every_section(perf_run):
    assert perf_run["environment"]["cpu"]["flags"].keys() >= {"avx2", "avx512_vnni"}
    assert [m["when"] for m in perf_run["matmul"]] == ["start", "end"]
    top = perf_run["profile"]["top"]
    assert "convolution" in top[0]["op"]  # PFANet is convolutions, even at 64x64
    shares = [t["share"] for t in top]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 1
    rows = {(r["path"], r["batch"]): r for r in perf_run["inference"]}
    assert set(rows) == {(p, b) for p in ("eager", "channels_last", "ort") for b in (1, 2)}
    assert all(r["images_per_s"] > 0 and r["size"] == 64 and len(r["times"]) == 2 for r in rows.values())
    train = perf_run["training"]
    assert (train["size"], train["batch"], train["freeze_blocks"]) == (32, 8, 3)
    assert train["rows"][0]["path"] == "eager" and train["rows"][0]["seconds_per_image"] > 0
    rss = perf_run["rss"]
    assert rss["map_shape"] == [480, 640]
    assert rss["peak_rss_mib"] >= rss["rss_after_load_mib"] > 50
    ev = perf_run["evaluation"]
    assert ev["maps"] == 8 and 0 < ev["mae"] < 0.2 and ev["maps_per_s"] > 0
