"""ONNX Runtime in place of PyTorch behind `Predictor.logits`: running exported graphs, where they are kept, and which
path a weights file runs on.

- `OnnxNetwork`: an exported graph (fp32 or INT8) run by onnxruntime, returning logits as `PFANet` does.
- The cache (`onnx_cache_dir`): fp32 graphs exported from weights files, keyed by their bytes and the versions that
  shape the graph (`fp32_graph`); INT8 graphs left by `pfanet export --int8` (`int8_cache_path`) or shipped beside
  the weights (`int8_path`), tied to them by SHA-256 (`find_int8_graph`); onnxruntime's optimised forms
  (`optimized_path`).
- `check_parity`: the one check of a graph against the PyTorch network it came from, for `pfanet export` and for
  the cache.
- `auto_backend` and `load_network`: what a weights file runs on, and why.

Graphs are written by `pfanet.export`; this module reads and runs them (and asks `pfanet.export` for the fp32 graph
the first time a weights file runs on onnxruntime).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import pathlib
import shutil

import numpy as np
import torch
from torch import nn

from . import __version__, export, hardware
from .io import atomic_write
from .transforms import InputSpec
from .weights import WeightsError, load_checkpoint

log = logging.getLogger(__name__)

# "auto" picks the fastest faithful path measured (docs/PERFORMANCE.md): on the CPU, the INT8 graph made from the
# weights where the CPU has VNNI or AMX (`hardware.int8_instructions`), else ONNX Runtime fp32; on a GPU, PyTorch with
# channels_last + bf16 autocast. "torch" is plain PyTorch fp32 (the reference every path is checked against);
# "onnxruntime" the weights' fp32 graph; "int8" needs an INT8 graph made from these weights (beside them, or cached
# by `pfanet export --int8`).
BACKENDS = ("auto", "torch", "onnxruntime", "int8")
# The check of a graph against PyTorch: max |logit| difference (both exporters measured ~4e-6 on this network).
# `pfanet export` checks on two images at the graph's size; the cache, once per weights file, on one small image.
PARITY_TOLERANCE = 1e-4
PARITY_SIZE = 64


# ---------------------------------------------------------------------------------------------------------------------
# Running a graph


class OnnxNetwork(nn.Module):
    """An exported PFANet graph run by onnxruntime, standing in for the PyTorch network behind `Predictor.logits`.

    It returns logits whatever the graph outputs (a probability graph's output goes back through torch.logit), so
    `pfanet.transforms.postprocess` is used unchanged.
    """

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu", threads: int | None = None,
                 optimized: str | os.PathLike | None = None):
        super().__init__()
        self.path = pathlib.Path(path)
        self.session = session_for(self.path, torch.device(device), threads, optimized)
        self.meta = export.parse_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        self.spec = InputSpec.from_dict(self.meta["input"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        y = torch.from_numpy(out)
        # logit(sigmoid(z)) is z up to float rounding; saturated probabilities give +-inf, which sigmoid maps back
        return torch.logit(y.double()).float() if self.meta["output"] == "probability" else y


def session_for(path: str | os.PathLike, device: torch.device, threads: int | None = None,
                optimized: str | os.PathLike | None = None):
    """An onnxruntime session on `device` (CUDA when asked for and available, else CPU), with `threads` intra-op
    threads (None: onnxruntime's default, one per physical core).

    `optimized` (CPU only) keeps onnxruntime's optimised graph, most of a session's start-up: loaded as it is when
    the file exists, else written by this session for the next one. It holds layouts chosen for this CPU and
    onnxruntime version, so its name must say which (`optimized_path`).
    """
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
        optimized = None
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    # Threads sleep between operators instead of spinning: the spinning took the cores from the rest of the process
    # (decoding, PNG writing) and from other processes (24 photos: 16.3 s -> 14.7 s, docs/PERFORMANCE.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None and os.path.isfile(optimized):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done once already
        try:
            return ort.InferenceSession(str(optimized), options, providers=providers)
        except Exception as e:  # noqa: BLE001 -- a damaged file: optimise the graph again
            log.warning("%s: not used (%s); optimising %s again", optimized, type(e).__name__, path)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime writes the optimised graph itself while it builds the session, so `io.atomic_write` (which hands a
    # temporary name to a writer and renames it after) cannot wrap it: the same temporary-and-rename, by hand.
    tmp = None
    if optimized is not None:
        with contextlib.suppress(OSError):  # a read-only cache: no optimised copy
            pathlib.Path(optimized).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{optimized}.{os.getpid()}.tmp"
            options.optimized_model_filepath = tmp
            options.log_severity_level = 3  # not its warning that the file is hardware-specific: it is named so
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        if tmp is not None:
            pathlib.Path(tmp).unlink(missing_ok=True)
        raise WeightsError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.replace(tmp, optimized)
    return session


def load_onnx(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[OnnxNetwork, InputSpec, dict]:
    """An exported .onnx -> (network for `Predictor`, the input convention of the graph, its metadata)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such ONNX file")
    net = OnnxNetwork(path, device)
    return net, net.spec, net.meta


def has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# The check against PyTorch


class ParityError(ValueError):
    """A graph that does not compute what its PyTorch network computes; `diff` is the max |difference| (maybe NaN)."""

    def __init__(self, message: str, diff: float):
        super().__init__(message)
        self.diff = diff


def check_parity(plan: export.ExportPlan, path: str | os.PathLike, n: int = 2, size: int | None = None,
                 tolerance: float = PARITY_TOLERANCE, name: str | None = None) -> float:
    """Max |difference| between onnxruntime on `path` and PyTorch on `plan.network`, for n random images (of `size`,
    default the graph's input size; a graph with a fixed size needs that one).

    Raises ParityError when the difference is over `tolerance` or is not a number: a graph that computes NaN fails
    (the test is `not diff <= tolerance`, since NaN compares false with everything). `name` is what the message
    calls the graph (default: its path).
    """
    size = size or plan.input_spec.size
    x = export.example_batch(dataclasses.replace(plan.input_spec, size=size), n, seed=1)
    session = session_for(path, torch.device("cpu"))
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.inference_mode():
        want = plan.network(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - want).max())
    if not diff <= tolerance:
        images = f"{n} random {size}x{size} image" + ("s" if n > 1 else "")
        raise ParityError(f"{name or path} differs from PyTorch by {diff:.2e} (> {tolerance:g}) on {images}", diff)
    return diff


# ---------------------------------------------------------------------------------------------------------------------
# Where graphs are kept


def onnx_cache_dir() -> pathlib.Path:
    """Where the onnxruntime backend keeps the graphs it exports: $PFANET_CACHE, else $XDG_CACHE_HOME/pfanet (or
    ~/.cache/pfanet), subfolder onnx."""
    root = os.environ.get("PFANET_CACHE") or pathlib.Path(os.environ.get("XDG_CACHE_HOME") or
                                                          pathlib.Path.home() / ".cache") / "pfanet"
    return pathlib.Path(root) / "onnx"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex): what ties a graph to the weights it was made from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_key(path: str | os.PathLike, sha: str | None = None) -> str:
    """The name of a weights file's fp32 graph in the cache: its bytes (`sha`: their SHA-256, when known) and the
    versions that shape the exported graph, so a changed file (or pfanet, torch, onnxruntime) is exported again."""
    import onnxruntime

    versions = f"{__version__} {torch.__version__} {onnxruntime.__version__}"
    return hashlib.sha256(f"{sha or file_sha256(path)} {versions}".encode()).hexdigest()[:32]


def int8_path(weights: str | os.PathLike) -> pathlib.Path:
    """Where an INT8 graph shipped with a weights file lies: beside it, model.safetensors -> model.int8.onnx."""
    return pathlib.Path(weights).with_suffix(".int8.onnx")


def int8_cache_path(sha: str) -> pathlib.Path:
    """The cache entry `pfanet export --int8` leaves for the weights with SHA-256 `sha`."""
    return onnx_cache_dir() / f"{sha}.int8.onnx"


def optimized_path(graph: pathlib.Path) -> pathlib.Path:
    """Where onnxruntime's optimised form of `graph` is kept (`OnnxNetwork(optimized=...)`): named by the graph file
    (path, size, time) and by what the optimisation depends on (onnxruntime's version, the CPU's flags)."""
    import onnxruntime

    stat = graph.stat()
    made_for = (f"{graph.resolve()} {stat.st_size} {stat.st_mtime_ns} {onnxruntime.__version__} "
                f"{sorted(hardware.cpu_flags())}")
    return onnx_cache_dir() / "optimized" / f"{hashlib.sha256(made_for.encode()).hexdigest()[:32]}.onnx"


def cache_int8_graph(graph: str | os.PathLike) -> pathlib.Path | None:
    """Copy an INT8 graph just made (`pfanet export --int8`) to the cache entry of the weights it was made from, where
    `Predictor(backend="auto" | "int8")` finds it; returns the entry. Only a graph of the weights' own input
    convention and logits, exported from a weights file (its SHA-256 in the metadata), is cached (else None)."""
    meta = export.graph_metadata(graph)
    if not (meta.get("weights_sha256") and meta["output"] == "logits" and meta["input"] == meta["weights_input"]):
        return None
    entry = int8_cache_path(meta["weights_sha256"])
    atomic_write(entry, lambda tmp: shutil.copyfile(graph, tmp))
    log.info("cached %s as %s: --backend auto uses it on CPUs with VNNI or AMX, --backend int8 anywhere", graph, entry)
    return entry


def find_int8_graph(path: pathlib.Path, sha: str, device: torch.device | str = "cpu") -> OnnxNetwork | None:
    """An INT8 graph made from exactly these weights (SHA-256 `sha`, stored in the graph's metadata), at their input
    convention: the one beside them, else the cached one. Stale or foreign graphs are skipped with a warning."""
    for graph in (int8_path(path), int8_cache_path(sha)):
        if not graph.is_file():
            continue
        try:
            net = OnnxNetwork(graph, device, optimized=optimized_path(graph))
        except WeightsError as e:
            log.warning("%s: INT8 graph not used (%s)", graph, e)
            continue
        meta = net.meta
        made_from = meta.get("weights_sha256")
        if made_from != sha:
            log.warning("%s: INT8 graph not used: made from other weights (SHA-256 %s, %s has %s); a stale graph",
                        graph, (made_from or "not recorded")[:16], path.name, sha[:16])
        elif "int8" not in meta or meta["output"] != "logits" or meta["input"] != meta.get("weights_input"):
            log.warning("%s: INT8 graph not used: not an INT8 logits graph at the weights' input convention", graph)
        else:
            return net
    return None


def fp32_graph(path: pathlib.Path, sha: str, device: torch.device, checkpoint) -> OnnxNetwork:
    """The cached fp32 graph of the weights at `path` (SHA-256 `sha`); exported from `checkpoint()` (model, spec,
    meta) and checked against PyTorch when first made, and again when the cached file cannot be read. A graph that
    fails the check is not cached (ParityError)."""
    graph = onnx_cache_dir() / f"{content_key(path, sha)}.onnx"
    if graph.is_file():
        try:
            return OnnxNetwork(graph, device, optimized=optimized_path(graph))
        except WeightsError as e:
            log.warning("damaged cache entry, exported again: %s", e)
            graph.unlink(missing_ok=True)
    model, spec, meta = checkpoint()
    plan = export.plan_export(model, spec)

    def export_checked(tmp: str) -> None:  # an exception here leaves nothing in the cache
        export.export_onnx(plan, tmp, dict(meta, weights_sha256=sha))
        check_parity(plan, tmp, n=1, size=PARITY_SIZE, name="the exported graph")

    atomic_write(graph, export_checked)
    return OnnxNetwork(graph, device, optimized=optimized_path(graph))


# ---------------------------------------------------------------------------------------------------------------------
# Which path a weights file runs on


@dataclasses.dataclass
class Network:
    """What a weights file runs on: the module behind `Predictor.logits` (PFANet or an `OnnxNetwork`), its input
    convention, the weights' metadata (with their SHA-256), the backend it is and why it was chosen."""

    module: nn.Module
    spec: InputSpec
    meta: dict
    backend: str
    reason: str


def auto_backend(device: torch.device) -> tuple[str, str]:
    """What "auto" wants on `device`, and why (before looking for graphs)."""
    if device.type != "cpu":
        return "torch", f"{device.type}: PyTorch, channels_last + bf16 autocast"
    if not has_onnxruntime():
        return "torch", "onnxruntime is not installed"
    flag = hardware.int8_instructions()
    if flag:
        return "int8", f"auto: the CPU has {flag}"
    return "onnxruntime", f"auto: fp32, the CPU has none of {', '.join(hardware.INT8_FLAGS)} (INT8 no faster)"


def load_network(path: pathlib.Path, device: torch.device, backend: str = "torch") -> Network:
    """The network the weights at `path` run on for `backend` (one of `BACKENDS`; see `Predictor`).

    A graph (INT8, or the cached fp32 export) is used without building the PyTorch model. An .onnx file runs on
    onnxruntime whatever `backend` says. "int8" without a graph of these weights is an error; "auto" then falls back
    to fp32, and an fp32 graph that cannot be made, checked or cached to PyTorch, with a warning.
    """
    if path.suffix.lower() == ".onnx":  # an exported graph: onnxruntime behind the same `logits` hook
        net, spec, meta = load_onnx(path, device)
        return Network(net, spec, meta, "int8" if "int8" in meta else "onnxruntime", "the weights are an ONNX graph")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    sha = file_sha256(path)
    checkpoint = functools.cache(lambda: load_checkpoint(path))
    chosen, reason = auto_backend(device) if backend == "auto" else (backend, "asked for")
    net = None
    if chosen == "int8":
        net = find_int8_graph(path, sha, device)
        if net is not None:
            reason += f"; {net.path} was made from these weights"
        elif backend == "int8":
            raise WeightsError(f"{path}: no INT8 graph made from these weights (looked for {int8_path(path)} and "
                               f"{int8_cache_path(sha)}); make one with `pfanet export --weights {path} --int8 "
                               "--calibration TRAIN_LIST -o FILE.onnx`")
        else:
            chosen = "onnxruntime"
            reason += ", but no INT8 graph was made from these weights (`pfanet export --int8`): fp32"
    if chosen == "onnxruntime":
        try:
            net = fp32_graph(path, sha, device, checkpoint)
        except Exception as e:  # noqa: BLE001 -- a read-only cache, a failed export or check: still predict
            log.warning("%s: running on PyTorch, not onnxruntime (%s: %s)", path, type(e).__name__, e)
            chosen, reason = "torch", f"onnxruntime failed ({type(e).__name__})"
    if net is not None:
        m = net.meta
        meta = {"config": m["config"], "input": m["weights_input"], "training": m["training"], "weights_sha256": sha}
        return Network(net, net.spec, meta, chosen, reason)
    model, spec, meta = checkpoint()
    return Network(model, spec, dict(meta, weights_sha256=sha), chosen, reason)
