"""Checkpoints of the PyTorch port (sairajk/PyTorch-Pyramid-Feature-Attention-Network-for-Saliency-Detection and its
forks): recognised, loaded, run exactly as the port runs them, converted, exported; and clear errors for .pth files
that are none of ours.

The port's network and pipeline are rebuilt independently in tests/port_reference.py; its checkpoints are built
here from random weights in the port's key names and shapes, with BatchNorm statistics far from their defaults, so
that a tensor in the wrong place or a statistic ignored fails. OpenCV (a pysodmetrics dependency) is the port's own
resizer.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

cv2 = pytest.importorskip("cv2")

from port_reference import PortSODModel, port_input, port_map, randomise

from pfanet.cli import main
from pfanet.data import training_sample
from pfanet.export import export_onnx, plan_export, quantize_onnx
from pfanet.export_weights import map_differences
from pfanet.predictor import Predictor
from pfanet.runtime import check_parity
from pfanet.transforms import PORT_INPUT, padded_resize, preprocess
from pfanet.weights import PORT_CONFIG, WeightsError, load_checkpoint

NAME = "best-model_epoch-204_mae-0.0505_loss-0.1370.pth"  # the file name the port's train.py gives its best model
# Image shapes: landscape and portrait with an odd difference (the port's padding leaves them a pixel short of a
# square), square, smaller than 256 (OpenCV then enlarges), large, one row short of 256.
SHAPES = ((300, 401), (401, 300), (256, 256), (150, 201), (700, 512), (255, 256))


@pytest.fixture(scope="module")
def port():
    """The port's network with random weights: logits spread over most of the gray range."""
    model = PortSODModel().eval()
    randomise(model, seed=0, logit_scale=3.0)
    with torch.no_grad():
        model.ff_conv_1.bias -= 4.0
    return model


@pytest.fixture(scope="module")
def checkpoint(port, tmp_path_factory):
    """What the port's train.py saves: {'epoch', 'test_mae' (a numpy float), 'model', 'test_loss', 'test_acc',
    'test_pre', 'test_rec'} (tensors)."""
    path = tmp_path_factory.mktemp("port") / NAME
    torch.save({"epoch": 204, "test_mae": np.float64(0.0505), "model": port.state_dict(), "test_loss": 0.137,
                "test_acc": torch.tensor(0.9312), "test_pre": torch.tensor(0.88), "test_rec": torch.tensor(0.86)},
               path)
    return path


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random colour image with some noise: varied enough for the network, like a photo's statistics."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).astype(int)
    return np.clip(smooth + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)


def test_the_checkpoint_is_recognised_with_its_network_convention_and_record(checkpoint):
    model, spec, meta = load_checkpoint(checkpoint)
    assert meta["format"] == "pytorch-port"
    assert model.config == PORT_CONFIG  # 3x3 C345 conv, eps 1e-5, running statistics, no dropout
    assert spec == PORT_INPUT and (spec.pad, spec.resize, spec.size) == ("black", "area", 256)
    assert spec.mean == pytest.approx((123.675, 116.28, 103.53)) and spec.std == pytest.approx((58.395, 57.12, 57.375))
    assert meta["training"] == pytest.approx({"epoch": 204, "test_mae": 0.0505, "test_loss": 0.137,
                                              "test_acc": 0.9312, "test_pre": 0.88, "test_rec": 0.86})
    json.dumps(meta)  # plain JSON: it goes into metadata


@pytest.mark.parametrize("shape", [(1, 3, 256, 256), (2, 3, 96, 160)])
def test_the_network_reproduces_the_ports_output(port, checkpoint, shape):
    ours = load_checkpoint(checkpoint)[0]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = port(x), ours(x)
    assert want.std() > 1.0  # logits that spread over the gray range
    assert (got - want).abs().max() <= 1e-4
    assert (torch.sigmoid(got) - port.probabilities(x)).abs().max() <= 1e-4


def test_preprocessing_is_the_ports_opencv_pipeline():
    """Black padding, (side - h) // 2 on each side, INTER_AREA on the uint8 image, ImageNet mean/std."""
    for i, (h, w) in enumerate(SHAPES):
        rgb = photo(h, w, i)
        want, _ = port_input(rgb)
        got = preprocess(rgb, PORT_INPUT)[None]
        d = (got - want).abs() * torch.tensor(PORT_INPUT.std)[:, None, None]  # in gray levels
        pixels, _ = padded_resize(rgb, 256, "black", "area")
        if h + 2 * ((max(h, w) - h) // 2) >= 256 and w + 2 * ((max(h, w) - w) // 2) >= 256:
            # shrinking: OpenCV's area averages, rounded: the same integers, but for a rare exact tie (x.5) that
            # OpenCV's float32 sums put on the other side (measured: 1 of 196,608 values at 700 x 512)
            assert d.max() <= 1.001 and (d > 1e-3).float().mean() < 1e-4, (h, w)
        else:
            # enlarging: OpenCV's 11-bit fixed-point bilinear weights round differently now and then
            assert d.max() <= 1.001 and (d < 1e-3).float().mean() > 0.8, (h, w)
        assert pixels.shape == (3, 256, 256)


@pytest.mark.slow
def test_predict_matches_the_ports_pipeline_unpadded(port, checkpoint, tmp_path):
    """`pfanet predict --weights best-model...pth` against the port's map taken back to the image."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (h, w) in enumerate(SHAPES):
        Image.fromarray(photo(h, w, i)).save(folder / f"p{i}.png")
    # PyTorch here; the ONNX graph the default backend runs follows it within a gray level (test below)
    args = ["predict", str(folder), "--weights", str(checkpoint), "--backend", "torch", "-o", str(tmp_path / "out")]
    assert main(args) == 0
    for i, (h, w) in enumerate(SHAPES):
        rgb = np.asarray(Image.open(folder / f"p{i}.png"))
        want = port_map(port, rgb).astype(int)
        assert 25 < want.std() and want.min() < 60 and want.max() > 190  # a map that uses the gray range
        got = np.asarray(Image.open(tmp_path / "out" / f"p{i}.png"))
        assert got.shape == (h, w)
        d = np.abs(got.astype(int) - want)
        # measured: mean 0.50-0.66, max 1 where the image is shrunk, up to 4 where OpenCV enlarges it (its
        # fixed-point input pixels differ by one level here and there); the map is truncated to uint8 before it is
        # resized back, as every pfanet map
        assert d.mean() <= 1.0 and d.max() <= 6, ((h, w), d.mean(), d.max())


def test_bare_state_dict_legacy_format_and_dataparallel_load_the_same(port, checkpoint, tmp_path):
    reference = load_checkpoint(checkpoint)[0].state_dict()
    bare, legacy, parallel = tmp_path / "bare.pth", tmp_path / "legacy.pt", tmp_path / "parallel.pth"
    torch.save(port.state_dict(), bare)
    torch.save({"epoch": 3, "test_mae": np.float64(0.1), "model": port.state_dict()}, legacy,
               _use_new_zipfile_serialization=False)  # torch < 1.6's format, as the port's own torch 1.1 wrote
    torch.save({f"module.{k}": v for k, v in port.state_dict().items()}, parallel)
    for path in (bare, legacy, parallel):
        model, spec, meta = load_checkpoint(path)
        assert meta["format"] == "pytorch-port" and spec == PORT_INPUT
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items()), path.name
    no_count = tmp_path / "no_count.pth"  # files of torch < 0.4.1 have no num_batches_tracked
    torch.save({k: v for k, v in port.state_dict().items() if not k.endswith("num_batches_tracked")}, no_count)
    state = load_checkpoint(no_count)[0].state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items() if not k.endswith("num_batches_tracked"))


def test_convert_keeps_the_network_and_the_convention(checkpoint, tmp_path, capsys):
    out = tmp_path / "port.safetensors"
    assert main(["convert", str(checkpoint), str(out)]) == 0
    listed = capsys.readouterr()
    assert "hl_conv1 -> c345_conv (weight[64, 384, 3, 3], bias[64])" in listed.out
    assert "spa_att.grp2_convk1 -> spatial_attention.conv2_1" in listed.out
    assert "(pytorch-port)" in listed.err
    model, spec, meta = load_checkpoint(out)
    assert spec == PORT_INPUT and model.config == PORT_CONFIG
    assert meta["input"]["pad"] == "black" and meta["input"]["resize"] == "area"
    assert meta["training"]["epoch"] == 204 and meta["training"]["source_format"] == "pytorch-port"
    original = load_checkpoint(checkpoint)[0].state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


@pytest.mark.slow
def test_onnx_export_and_int8_of_a_port_checkpoint(checkpoint, tmp_path):
    """The 3x3 C345 conv and eps-1e-5 BatchNorm (running statistics) go through the exporter; the graph records the
    port's input convention and runs through Predictor like the weights."""
    model, spec, meta = load_checkpoint(checkpoint)
    plan = plan_export(model, spec)
    graph = export_onnx(plan, tmp_path / "port.onnx", meta)
    assert check_parity(plan, graph, n=2, size=64) <= 1e-4
    props = {p.key: p.value for p in __import__("onnx").load(str(graph)).metadata_props}
    assert (props["input_pad"], props["input_resize"]) == ("black", "area")
    images = []
    for i, (h, w) in enumerate(SHAPES[:2]):
        images.append(tmp_path / f"c{i}.png")
        Image.fromarray(photo(h, w, 10 + i)).save(images[-1])
    onnx_predictor = Predictor(graph, device="cpu")
    assert onnx_predictor.spec == PORT_INPUT
    torch_predictor = Predictor(checkpoint, device="cpu", backend="torch")
    worst, _ = map_differences(torch_predictor, onnx_predictor, images)
    assert worst <= 1
    int8 = quantize_onnx(graph, tmp_path / "port.int8.onnx", images, progress=False)
    _, mean = map_differences(torch_predictor, Predictor(int8, device="cpu"), images)
    assert mean < 8  # INT8 follows fp32 (random weights quantise worse than trained ones)


def test_fine_tuning_targets_follow_the_ports_padding():
    """Training from a port checkpoint (`pfanet train --init best-model.pth`): the mask is padded like the image."""
    h, w = 301, 400  # odd difference: padded 301 x 400, not a square
    img = np.zeros((h, w, 3), np.uint8)
    img[100:200, 150:250] = 255
    mask = (img[..., 0] > 0).astype(np.float32)
    x, y = training_sample(img, mask, PORT_INPUT, target_resize="bilinear")
    white = (x[0] > 0).float()  # white pixels after normalisation
    assert torch.corrcoef(torch.stack([white.ravel(), (y[0] > 0.5).float().ravel()]))[0, 1] > 0.97


# ---------------------------------------------------------------------------------------------------------------
# Files that are none of these: an error that says what was found


def _raises(path, *fragments):
    with pytest.raises(WeightsError) as e:
        load_checkpoint(path)
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))
    return str(e.value)


def test_a_port_checkpoint_missing_a_layer_is_named_in_the_ports_words(port, tmp_path):
    state = {k: v for k, v in port.state_dict().items() if not k.startswith("hl_bn1.")}
    torch.save({"model": state}, tmp_path / "cut.pth")
    _raises(tmp_path / "cut.pth", "cut.pth", "the PyTorch port's SODModel", "missing", "'hl_bn1.weight'")


def test_a_port_variant_with_other_shapes_names_them(port, tmp_path):
    state = dict(port.state_dict(), **{"hl_conv1.weight": torch.zeros(64, 384, 1, 1), "extra.weight": torch.ones(2)})
    torch.save(state, tmp_path / "variant.pth")
    _raises(tmp_path / "variant.pth", "unexpected ['extra.weight']",
            "hl_conv1.weight: file (64, 384, 1, 1) vs (64, 384, 3, 3)")


def test_an_unrelated_state_dict_lists_what_it_has_and_lacks(tmp_path):
    state = {f"layer{i}.conv.weight": torch.zeros(8, 8, 3, 3) for i in range(10)} | {"fc.weight": torch.zeros(2, 8)}
    torch.save(state, tmp_path / "resnet.pth")
    message = _raises(tmp_path / "resnet.pth", "resnet.pth", "missing ['backbone.convs.conv1_1.weight'",
                      "unexpected ['fc.weight', 'layer0.conv.weight'", "and 5 more")
    assert len(message) < 1200  # the first names, not all 115


def test_a_checkpoint_without_a_state_dict_says_what_it_holds(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "opt.pth")
    _raises(tmp_path / "opt.pth", "expected a state dict", "found a dict with keys ['epoch', 'optimizer']")


def test_predict_with_a_foreign_pth_is_an_error_not_a_traceback(tmp_path, capsys):
    torch.save({"fc.weight": torch.zeros(2, 8)}, tmp_path / "other.pth")
    Image.fromarray(photo(64, 64, 0)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--weights", str(tmp_path / "other.pth"),
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "other.pth" in err and "unexpected ['fc.weight']" in err and "Traceback" not in err


def test_spec_options_are_validated_and_written_only_where_they_differ():
    from pfanet.transforms import OFFICIAL_INPUT, InputSpec

    assert "pad" not in OFFICIAL_INPUT.to_dict() and "resize" not in OFFICIAL_INPUT.to_dict()
    assert InputSpec.from_dict(PORT_INPUT.to_dict()) == PORT_INPUT
    with pytest.raises(ValueError, match="pad must be one of"):
        dataclasses.replace(PORT_INPUT, pad="white")
    with pytest.raises(ValueError, match="resize must be one of"):
        dataclasses.replace(PORT_INPUT, resize="cubic")


def test_config_options_are_validated_and_old_configs_keep_the_official_network():
    from pfanet.model import PFANetConfig

    old = {"dropout": True, "norm": "per-image", "with_ca": True, "with_cpfe": True, "with_low_level": True,
           "with_sa": True}  # a config saved before c345_kernel and bn_eps existed
    assert PFANetConfig.from_dict(old) == PFANetConfig()
    assert (PFANetConfig().c345_kernel, PFANetConfig().bn_eps) == (1, 1e-3)
    assert PFANetConfig.from_dict(json.loads(PORT_CONFIG.to_json())) == PORT_CONFIG
    with pytest.raises(ValueError, match="c345_kernel must be 1 or 3"):
        PFANetConfig(c345_kernel=5)
    with pytest.raises(ValueError, match="bn_eps must be positive"):
        PFANetConfig(bn_eps=0)


@pytest.mark.slow
def test_fine_tuning_from_a_port_checkpoint_keeps_its_network_and_convention(port, checkpoint, tmp_path):
    """`pfanet train --init best-model.pth --norm batch`: the file's network (3x3 C345 conv, eps 1e-5), its input
    convention at the recipe's size, every tensor from the file; one short epoch runs and writes a loadable model."""
    from pfanet.recipes import RECIPES
    from pfanet.train import Trainer, TrainOptions

    lines = []
    for i, (h, w) in enumerate(SHAPES[:2]):
        rgb = photo(h, w, 20 + i)
        Image.fromarray(rgb).save(tmp_path / f"i{i}.png")
        Image.fromarray(((rgb[..., 0] > 128) * 255).astype(np.uint8)).save(tmp_path / f"m{i}.png")
        lines.append(f"{tmp_path / f'i{i}.png'}\t{tmp_path / f'm{i}.png'}\n")
    (tmp_path / "train.txt").write_text("".join(lines))
    recipe = RECIPES["cpu-ecssd"].override(size=64, batch_size=2, epochs=1, init=str(checkpoint), norm="batch")
    trainer = Trainer(recipe, TrainOptions(train=[str(tmp_path / "train.txt")], out=str(tmp_path / "run"), workers=0,
                                           progress=False))
    assert (trainer.model.config.c345_kernel, trainer.model.config.bn_eps) == (3, 1e-5)
    assert trainer.spec == dataclasses.replace(PORT_INPUT, size=64)
    assert torch.equal(trainer.model.c345_conv.weight, port.hl_conv1.weight)
    assert torch.equal(trainer.model.spatial_attention.bn2_1.running_var, port.spa_att.grp2_bn1.running_var)
    trainer.run()
    model, spec, _ = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert model.config.c345_kernel == 3 and spec.pad == "black" and spec.resize == "area"
