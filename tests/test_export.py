"""ONNX export: onnxruntime against PyTorch (logits, batches, free sizes), the metadata, the ONNX-backed Predictor on a
real image, and rembg's own code running a --for-rembg export."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pfanet.cli import main
from pfanet.io import load_image
from pfanet.model import PFANet
from pfanet.predictor import Predictor
from pfanet.transforms import OFFICIAL_INPUT, preprocess
from pfanet.weights import WeightsError, load_checkpoint, save_checkpoint

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-weight model saved as a pfanet checkpoint with the official input convention (256)."""
    torch.manual_seed(0)
    model = PFANet().eval()
    path = tmp_path_factory.mktemp("export") / "random.safetensors"
    save_checkpoint(path, model, OFFICIAL_INPUT, {"note": "random weights for tests"})
    return path, model


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "random.onnx"
    assert main(["export", "--format", "onnx", "--weights", str(checkpoint[0]), "-o", str(path), "--no-check"]) == 0
    return path


def _images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """n random images in the official convention (RGB pixels minus the Caffe means), NCHW float32."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 3, h, w)).astype(np.float32)
    return pixels - np.asarray(OFFICIAL_INPUT.mean, np.float32)[None, :, None, None]


@pytest.mark.parametrize("n, h, w", [(1, 64, 64), (3, 64, 64), (3, 96, 64)])
def test_onnxruntime_matches_pytorch_logits(checkpoint, exported, n, h, w):
    _, model = checkpoint
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    x = _images(n, h, w, seed=n + h)
    got = session.run(None, {"input": x})[0]
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == (n, 1, h, w)
    assert np.abs(got - want).max() <= 1e-4


def test_metadata_names_the_input_convention(exported):
    proto = onnx.load(str(exported))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["input_channel_order"] == "RGB"
    assert props["input_mean"] == "103.939,116.779,123.68"
    assert props["input_std"] == "1,1,1"
    assert props["input_size"] == "256"
    assert props["output"] == "logits"
    meta = json.loads(props["pfanet"])
    assert meta["input"] == {"channel_order": "RGB", "mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0],
                             "size": 256}
    assert meta["config"]["norm"] == "per-image"
    assert meta["training"] == {"note": "random weights for tests"}
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]


def test_onnx_predictor_matches_pytorch_on_a_real_image(checkpoint, exported, ecssd_val_pairs):
    image = ecssd_val_pairs(1)[0][0]
    want = Predictor(checkpoint[0], device="cpu").predict(image)
    got = Predictor(exported, device="cpu").predict(image)
    assert got.shape == want.shape == load_image(image).shape[:2]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_deploy_doc_snippet_reproduces_the_predictor(checkpoint, exported, ecssd_val_pairs, tmp_path, monkeypatch):
    """The plain-onnxruntime snippet in docs/DEPLOY.md, run as printed, gives pfanet's maps."""
    pytest.importorskip("cv2")
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "DEPLOY.md").read_text()
    snippet = re.search(r"<!-- snippet: onnxruntime.*?```python\n(.*?)```", doc, re.DOTALL).group(1)
    # A lossless copy of the photo: OpenCV's and Pillow's JPEG decoders may differ by a gray level here and there
    Image.fromarray(load_image(ecssd_val_pairs(1)[0][0])).save(tmp_path / "photo.png")
    (tmp_path / "pfanet.onnx").symlink_to(exported)
    monkeypatch.chdir(tmp_path)
    exec(compile(  # noqa: S102 (our own documentation)
        snippet.replace('"photo.jpg"', '"photo.png"'), "DEPLOY.md", "exec"), {})
    got = np.asarray(Image.open(tmp_path / "photo_map.png"))
    want = Predictor(checkpoint[0], device="cpu").predict(tmp_path / "photo.png")
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_a_graph_that_outputs_nan_fails_the_check(weights, tmp_path, monkeypatch, capsys):
    """NaN compares false with everything: `pfanet export` once tested `diff > 1e-4` and passed a graph computing NaN
    (exit 0). The one check, `runtime.check_parity`, fails it there (exit 1) and in the fp32 cache (not cached)."""
    import pfanet.export
    import pfanet.export_weights
    from pfanet.runtime import ParityError, check_parity

    real = pfanet.export.export_onnx

    def nan_graph(plan, path, meta=None, **kw):  # an exporter whose graph computes NaN (one weight is NaN)
        real(plan, path, meta, **kw)
        proto = onnx.load(str(path))
        w = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
        w.CopyFrom(onnx.numpy_helper.from_array(np.full_like(onnx.numpy_helper.to_array(w), np.nan), w.name))
        onnx.save(proto, str(path))
        return pathlib.Path(path)

    monkeypatch.setattr(pfanet.export_weights, "export_onnx", nan_graph)
    out = tmp_path / "nan.onnx"
    assert main(["export", "--weights", str(weights), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "max |difference| nan" in err and f"pfanet export: error: {out} differs from PyTorch by nan" in err
    model, spec, _ = load_checkpoint(weights)
    with pytest.raises(ParityError, match="differs from PyTorch by nan") as failed:
        check_parity(pfanet.export.plan_export(model, spec), out)
    assert np.isnan(failed.value.diff)

    monkeypatch.setattr(pfanet.export, "export_onnx", nan_graph)
    monkeypatch.setenv("PFANET_CACHE", str(tmp_path / "cache"))
    predictor = Predictor(weights, device="cpu", backend="onnxruntime")
    assert predictor.backend == "torch" and not list((tmp_path / "cache" / "onnx").glob("*.onnx"))


def test_onnx_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="bad.onnx: not a readable ONNX model"):
        Predictor(bad, device="cpu")
    rembg = pytest.importorskip("rembg")
    foreign = pathlib.Path(rembg.__file__).parent / "u2netp.onnx"
    with pytest.raises(WeightsError, match="u2netp.onnx: ONNX model without pfanet metadata"):
        Predictor(foreign, device="cpu")


@pytest.fixture(scope="module")
def rembg_export(checkpoint, tmp_path_factory):
    """--for-rembg export, named as rembg looks for it ($U2NET_HOME/u2net.onnx); the network runs at 64 inside."""
    folder = tmp_path_factory.mktemp("u2net_home")
    assert main(["export", "--weights", str(checkpoint[0]), "-o", str(folder / "u2net.onnx"), "--for-rembg",
                 "--size", "64"]) == 0  # with the built-in parity check
    return folder


@pytest.fixture(scope="module")
def square_photo(ecssd_val_pairs) -> Image.Image:
    """A real photo cropped and resized to rembg's 320 x 320 (so rembg's own resize is the identity)."""
    rgb = load_image(ecssd_val_pairs(2)[1][0])
    side = min(rgb.shape[:2])
    crop = Image.fromarray(rgb[:side, :side]).resize((320, 320), Image.BILINEAR)
    arr = np.array(crop)
    arr[0, 0, 0] = 255  # rembg divides by the image's maximum: make it 255, the convention we convert from
    return Image.fromarray(arr)


def test_rembg_runs_the_export(checkpoint, rembg_export, square_photo, monkeypatch):
    rembg = pytest.importorskip("rembg")
    monkeypatch.setenv("U2NET_HOME", str(rembg_export))
    session = rembg.new_session("u2net")

    # rembg's own normalisation of the photo, through the exported graph ...
    inputs = session.normalize(square_photo, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (320, 320))
    prob = session.inner_session.run(None, inputs)[0]
    # ... equals our own preprocessing (official convention, 64 x 64) and the PyTorch network with a sigmoid
    spec64 = dataclasses.replace(OFFICIAL_INPUT, size=64)
    with torch.inference_mode():
        want = torch.sigmoid(checkpoint[1](preprocess(np.asarray(square_photo), spec64)[None])).numpy()
    assert prob.shape == (1, 1, 64, 64)
    assert np.abs(prob - want).max() <= 1e-4

    # rembg's remove(): min-max stretch, x255 to uint8, LANCZOS to the image size, as docs/DEPLOY.md says
    mask = np.asarray(rembg.remove(square_photo, session=session, only_mask=True))
    stretched = (want[0, 0] - want.min()) / (want.max() - want.min())
    expected = np.asarray(Image.fromarray((stretched * 255).astype(np.uint8)).resize((320, 320), Image.LANCZOS))
    assert mask.shape == (320, 320)
    assert np.abs(mask.astype(int) - expected.astype(int)).max() <= 1

    # and the same file serves pfanet's Predictor (probabilities turned back into logits)
    ours = Predictor(model=checkpoint[1], spec=spec64, device="cpu").predict(square_photo)
    via_onnx = Predictor(rembg_export / "u2net.onnx", device="cpu").predict(square_photo)
    assert np.abs(ours.astype(int) - via_onnx.astype(int)).max() <= 1


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PFANET_TEST_DYNAMO"), reason="dynamo export takes minutes on a CPU; "
                    "set PFANET_TEST_DYNAMO=1 (and pip install onnxscript) to run it")
def test_dynamo_exporter_matches_pytorch(checkpoint, tmp_path):
    pytest.importorskip("onnxscript")
    path = tmp_path / "dynamo.onnx"
    assert main(["export", "--weights", str(checkpoint[0]), "-o", str(path), "--exporter", "dynamo", "--size", "64",
                 "--no-check"]) == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _images(3, 96, 64, seed=7)
    with torch.inference_mode():
        want = checkpoint[1](torch.from_numpy(x)).numpy()
    assert np.abs(session.run(None, {"input": x})[0] - want).max() <= 1e-4
