"""CPU performance of PFANet in one run on the same inputs: the machine's fp32 matmul ceiling, the model's GFLOP,
inference images/s for every path (eager, channels_last, torch.compile, ONNX Runtime fp32, INT8, the U²-Net-p peer),
training step time, peak memory on a 6000x4000 photo, and evaluation throughput.

    python benchmarks/perf.py --json benchmarks/results/perf.json             # the full run (idle machine)
    python benchmarks/perf.py --quick --json /tmp/perf.json                    # development: tiny repetitions
    python benchmarks/perf.py --paths eager,ort,int8,int8-fullrange --only inference

Timings are medians over repetitions after warm-up; the inference paths are interleaved (one call of each in turn,
repeated) so that drift in the machine's speed reaches them all alike. A path's fraction of the ceiling is
images/s x GFLOP per image / matmul GFLOP/s, the GFLOP counted by torch.utils.flop_counter (2 x multiply-adds of the
convolutions and dense layers at the benchmark size).

Inputs: the first 8 images of ECSSD train.txt put through `pfanet.transforms.preprocess` at --size (random images
when ECSSD is absent). The INT8 path is calibrated on ECSSD train images too; `pfanet export --int8` makes the same
file. Evaluation scores the 1,000 ECSSD masks, blurred and noised, as if they were maps (scoring does not care where
maps come from). Nothing here reads ECSSD's test.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).parent))

REPO = pathlib.Path(__file__).resolve().parents[1]
ECSSD = REPO.parent / "shared" / "data" / "ecssd"
SECTIONS = ("matmul", "flops", "profile", "inference", "training", "rss", "evaluation")
# Inference paths. int8: QDQ, per-channel 7-bit weights (what `pfanet export --int8` writes); the variants show what
# the other choices do: per-tensor weights, QOperator graph, full-range weights (saturate in AVX2 int8 kernels).
# openvino / openvino-int8: the fp32 / int8 ONNX files compiled by OpenVINO (only when `pip install openvino` is done).
# int8-shipped: the INT8 graph beside the weights (tools/ship_model.py writes it; `--backend auto` runs it on CPUs with
# VNNI or AMX), used only when its recorded SHA-256 is the weights'.
PATHS = ("eager", "channels_last", "compile", "ort", "int8", "int8-tensor", "int8-qop", "int8-fullrange", "int8-shipped",
         "openvino", "openvino-int8", "u2netp")
DEFAULT_PATHS = ("eager", "channels_last", "compile", "ort", "int8", "u2netp")
INT8_VARIANTS = {  # name -> quantize_onnx options
    "int8": {},
    "int8-tensor": {"per_channel": False},
    "int8-qop": {"quant_format": "qoperator"},
    "int8-fullrange": {"reduce_range": False},
}
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Repetitions and sizes; --quick shrinks them for development and tests."""

    warmup: int = 2
    reps: int = 5
    matmul_n: int = 4096
    matmul_reps: int = 5
    train_reps: int = 3
    calibration: int = 32
    eval_limit: int | None = None  # all 1,000 masks


QUICK = Settings(warmup=1, reps=2, matmul_n=1024, matmul_reps=3, train_reps=1, calibration=4, eval_limit=40)


# --------------------------------------------------------------------------------------------------------------------
# The machine


def cpu_info() -> dict:
    """CPU model, the instruction-set flags that decide fp32/int8/bf16 speed, and what PyTorch dispatches to."""
    model, flags, family = platform.processor(), set(), {}
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("cpu family", "model") and key.strip() not in family:
                family[key.strip()] = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {"model": model, "family": family, "logical_cpus": os.cpu_count(),
            "flags": {f: f in flags for f in CPU_FLAGS},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def environment(threads: int) -> dict:
    import onnx
    import onnxruntime as ort

    return {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "onnxruntime_threads": threads,
            "mkldnn": torch.backends.mkldnn.is_available(), "cpu": cpu_info(), "load_average_start": os.getloadavg()}


def time_call(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_gflops(n: int, reps: int) -> dict:
    """fp32 n x n matrix product in PyTorch at the current thread count: the practical fp32 ceiling."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    torch.mm(a, b)  # warm-up
    times = [time_call(lambda: torch.mm(a, b)) for _ in range(reps)]
    return {"n": n, "median_s": statistics.median(times), "gflops": 2 * n**3 / statistics.median(times) / 1e9}


def model_gflop(model: nn.Module, size: int) -> float:
    """GFLOP of one size x size image, counted by torch.utils.flop_counter (2 x multiply-adds)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def profile_eager(model: nn.Module, x: torch.Tensor, iterations: int = 2, rows: int = 10) -> dict:
    """torch.profiler over `iterations` eager forward passes (after one warm-up): the operators taking the most time.

    Returns the top operators by self CPU time (share of the total, calls) and the profiler's own table.
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iterations):
                model(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [{"op": e.key, "self_ms_per_iter": e.self_cpu_time_total / 1000 / iterations,
            "share": e.self_cpu_time_total / total, "calls_per_iter": e.count // iterations} for e in events[:rows]]
    return {"iterations": iterations, "batch": len(x), "size": x.shape[-1], "top": top,
            "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)}


# --------------------------------------------------------------------------------------------------------------------
# Inference paths: each a module from a preprocessed NCHW batch to logits, so `Predictor(model=..., spec=...)` runs it


class ChannelsLast(nn.Module):
    """The network with its weights and input in channels_last (NHWC) memory order."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


class U2NetPNetwork:
    """U²-Net-p's network alone (rembg's ONNX, 320 x 320, batch 1 fixed in the graph), for timing beside PFANet's."""

    size = 320

    def __init__(self, threads: int):
        from peers import U2NetP

        self.session = U2NetP(threads).session.inner_session
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input_name: x.numpy()})[0]


class OpenVinoNetwork(nn.Module):
    """An ONNX file compiled by OpenVINO for the CPU (optional: only when the openvino package is installed)."""

    def __init__(self, path: pathlib.Path, threads: int):
        super().__init__()
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.compiled(x.numpy())[0])


def build_paths(names: list[str], weights: pathlib.Path, size: int, work: pathlib.Path, threads: int,
                calibration: list[pathlib.Path], timings: dict | None = None) -> dict[str, nn.Module | str]:
    """The requested inference paths for `weights` at `size`: name -> network, or the error that stopped it.

    `timings` (when given) receives each path's one-off cost (export, quantisation, compilation happens at the first
    call and is timed there).
    """
    from pfanet.export import export_onnx, plan_export, quantize_onnx
    from pfanet.runtime import OnnxNetwork
    from pfanet.weights import load_checkpoint

    model, spec, meta = load_checkpoint(weights)
    model = model.float().eval()
    timings = {} if timings is None else timings
    paths: dict[str, nn.Module | str] = {}
    fp32 = work / "fp32.onnx"

    def int8_file(variant: str) -> pathlib.Path:
        path = work / f"{variant}.onnx"
        if not path.is_file():
            if not calibration:
                raise RuntimeError("no calibration images (ECSSD train.txt not found)")
            quantize_onnx(fp32, path, calibration, progress=False, **INT8_VARIANTS[variant])
        return path

    for name in names:
        t0 = time.perf_counter()
        try:
            if name == "eager":
                paths[name] = model
            elif name == "channels_last":
                paths[name] = ChannelsLast(copy.deepcopy(model))
            elif name == "compile":
                # Default inductor; static shapes so that batch 1 and batch 8 each get their own graph.
                paths[name] = torch.compile(copy.deepcopy(model), dynamic=False)
            elif name == "u2netp":
                paths[name] = U2NetPNetwork(threads)
            elif name == "int8-shipped":
                from pfanet.runtime import file_sha256, find_int8_graph, int8_path

                graph = find_int8_graph(weights, file_sha256(weights))
                if graph is None:
                    raise RuntimeError(f"no INT8 graph of these weights at {int8_path(weights)}")
                paths[name] = OnnxNetwork(graph.path, threads=threads)
            else:
                if not fp32.is_file():
                    plan = plan_export(model, dataclasses.replace(spec, size=size), size=size)
                    export_onnx(plan, fp32, meta)
                if name == "ort":
                    paths[name] = OnnxNetwork(fp32, threads=threads)
                elif name in INT8_VARIANTS:
                    paths[name] = OnnxNetwork(int8_file(name), threads=threads)
                elif name == "openvino":
                    paths[name] = OpenVinoNetwork(fp32, threads)
                elif name == "openvino-int8":
                    paths[name] = OpenVinoNetwork(int8_file("int8"), threads)
                else:
                    raise ValueError(f"unknown path {name!r}; known: {', '.join(PATHS)}")
        except Exception as e:  # noqa: BLE001  (a path that cannot be built is a result to report, not a stop)
            paths[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        timings[name] = time.perf_counter() - t0
    return paths


def input_batch(n: int, size: int, spec, data: pathlib.Path) -> tuple[torch.Tensor, str]:
    """n preprocessed images at `size`: ECSSD train's first n (the same every run), or random pixels without ECSSD."""
    from pfanet.data import read_list_file
    from pfanet.export import example_batch
    from pfanet.io import load_image
    from pfanet.transforms import preprocess

    spec = dataclasses.replace(spec, size=size)
    if (data / "train.txt").is_file():
        pairs = read_list_file(data / "train.txt")[:n]
        return torch.stack([preprocess(load_image(img), spec) for img, _ in pairs]), f"{data}/train.txt[:{n}]"
    return torch.from_numpy(example_batch(spec, n)), "random pixels (ECSSD not found)"


def bench_inference(paths: dict[str, nn.Module | str], batches: dict[int, torch.Tensor], settings: Settings,
                    u2netp_input: dict[int, torch.Tensor]) -> list[dict]:
    """Median seconds per call of every path at every batch size, the paths interleaved."""
    rows = []
    for n, x in batches.items():
        runnable = {}
        for name, net in paths.items():
            if isinstance(net, str):
                rows.append({"path": name, "batch": n, "error": net})
            elif isinstance(net, U2NetPNetwork) and n not in u2netp_input:
                rows.append({"path": name, "batch": n, "error": "its ONNX graph fixes the batch at 1"})
            else:
                runnable[name] = (net, u2netp_input[n] if isinstance(net, U2NetPNetwork) else x)
        first_call = {}
        with torch.inference_mode():
            for name, (net, inp) in list(runnable.items()):
                try:
                    first_call[name] = time_call(functools.partial(net, inp))  # compilation happens here
                    for _ in range(settings.warmup - 1):
                        net(inp)
                except Exception as e:  # noqa: BLE001  (e.g. torch.compile failing on this machine: reported)
                    rows.append({"path": name, "batch": n, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
                    del runnable[name]
            times: dict[str, list[float]] = {name: [] for name in runnable}
            for _ in tqdm(range(settings.reps), desc=f"inference, batch {n}", leave=False):
                for name, (net, inp) in runnable.items():
                    times[name].append(time_call(functools.partial(net, inp)))
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"path": name, "batch": n, "seconds_per_batch": med, "images_per_s": n / med,
                         "first_call_s": first_call[name], "times": ts,
                         "size": U2NetPNetwork.size if name == "u2netp" else x.shape[-1]})
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Training, memory, evaluation


def bench_training(weights: pathlib.Path, data: pathlib.Path, size: int, settings: Settings,
                   variants: list[str]) -> dict:
    """Seconds per image of one optimizer step (batch 8) with the cpu-ecssd-ft recipe, blocks 1-3 frozen, through
    `pfanet.training.TrainStep` (the step `pfanet train` runs), built from the recipe: eager NCHW, channels_last and
    torch.compile, interleaved."""
    from pfanet.data import collate, read_pairs
    from pfanet.recipes import RECIPES
    from pfanet.training import TrainStep, build_model, make_optimizer, training_dataset

    if not (data / "train.txt").is_file():
        return {"error": f"no {data}/train.txt"}
    # Start torch.compile afresh, as a training process would. PFANet.forward compiled before at other shapes (the
    # inference section) makes dynamo recompile it with symbolic sizes, and inductor then fails on this network
    # ("cannot determine truth value of Relational: 4*s77*((s0//4)) < s77", torch 2.13).
    torch._dynamo.reset()
    recipe = RECIPES["cpu-ecssd-ft"].override(init=str(weights), size=size)
    trainers, result = {}, {"recipe": recipe.name, "size": size, "batch": recipe.batch_size,
                            "freeze_blocks": recipe.freeze_blocks, "rows": []}
    batch = None
    for name in variants:
        if name not in ("eager", "channels_last", "compile"):
            raise ValueError(f"training path {name!r}: expected eager, channels_last or compile")
        channels_last = name == "channels_last"
        model, spec = build_model(recipe, channels_last=channels_last)
        model.train()
        if batch is None:  # the recipe's first training samples (augmented as in training), the same for every path
            dataset = training_dataset(read_pairs(data / "train.txt")[: recipe.batch_size], recipe, spec)
            batch = collate([dataset[i] for i in range(recipe.batch_size)])[:2]
        train_step = TrainStep(model, make_optimizer(model, recipe), recipe, channels_last=channels_last,
                               net=torch.compile(model) if name == "compile" else model)
        step = functools.partial(train_step, *batch, recipe.stage(0).alpha)
        try:
            trainers[name] = (step, time_call(step))  # torch.compile compiles here
        except Exception as e:  # noqa: BLE001  (reported in the results)
            result["rows"].append({"path": name, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in tqdm(range(settings.train_reps), desc="training steps", leave=False):
        for name, (step, _) in trainers.items():
            times[name].append(time_call(step))
    for name, ts in times.items():
        med = statistics.median(ts)
        result["rows"].append({"path": name, "seconds_per_step": med, "seconds_per_image": med / recipe.batch_size,
                               "first_step_s": trainers[name][1], "times": ts})
    return result


# Peak RSS is VmHWM (Linux): ru_maxrss of a child starts at its parent's high-water mark (a 500 MiB parent gives a
# fresh `python -c` 500 MiB), and this harness holds several models when it gets here. ru_maxrss is kept beside it.
RSS_SCRIPT = """
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from pfanet.predictor import Predictor

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

predictor = Predictor(sys.argv[1] or None, device="cpu")
loaded = hwm_mib()
t0 = time.perf_counter()
m = predictor.predict(sys.argv[2])
seconds = time.perf_counter() - t0
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"map_shape": list(m.shape), "seconds": seconds, "rss_after_load_mib": loaded,
                  "peak_rss_mib": hwm_mib(), "ru_maxrss_mib": maxrss}))
"""


def synthetic_photo(path: pathlib.Path, width: int, height: int) -> pathlib.Path:
    """A JPEG with smooth colour gradients and an ellipse (compresses small, decodes to full size)."""
    from PIL import Image, ImageDraw

    if path.is_file():
        return path
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([xx / width * 255, yy / height * 255, (xx + yy) / (width + height) * 255], axis=2)
    img = Image.fromarray(rgb.astype(np.uint8))
    ImageDraw.Draw(img).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(230, 40, 40))
    img.save(path, quality=90)
    return path


def bench_rss(weights: pathlib.Path | None, photo: pathlib.Path, threads: int) -> dict:
    """Peak resident memory (ru_maxrss) of a fresh process that loads `Predictor` and predicts one photo."""
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(weights or ""), str(photo), str(threads)],
                          capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    from PIL import Image

    with Image.open(photo) as im:
        size = im.size
    return {"photo": f"{size[0]}x{size[1]} synthetic JPEG", **json.loads(proc.stdout.strip().splitlines()[-1])}


def noisy_maps(masks: list[pathlib.Path], out: pathlib.Path) -> pathlib.Path:
    """Masks blurred (Gaussian, sigma 4) and noised (normal, sigma 12 gray levels), saved as PNG maps."""
    import cv2
    from PIL import Image

    from pfanet.io import load_mask

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for m in tqdm(masks, desc="making maps", leave=False):
        target = out / f"{m.stem}.png"
        if target.is_file():
            continue
        blurred = cv2.GaussianBlur(load_mask(m).astype(np.float32), (0, 0), 4)
        noised = blurred + rng.normal(0, 12, blurred.shape)
        Image.fromarray(np.clip(noised, 0, 255).astype(np.uint8)).save(target)
    return out


def bench_evaluation(data: pathlib.Path, work: pathlib.Path, limit: int | None) -> dict:
    """maps/s of `pfanet.evaluate.evaluate_folders` (all metrics, its default worker count) at the masks' size."""
    from pfanet import evaluate as ev
    from pfanet.io import list_images

    masks_dir = data / "masks"
    if not masks_dir.is_dir():
        return {"error": f"no {masks_dir}"}
    masks = list_images(masks_dir)
    if limit is not None:  # a folder of links to the first masks, so evaluation sees only those
        masks = masks[:limit]
        masks_dir = work / "masks"
        masks_dir.mkdir(exist_ok=True)
        for m in masks:
            if not (masks_dir / m.name).exists():
                (masks_dir / m.name).symlink_to(m)
    maps = noisy_maps(masks, work / "maps")
    t0 = time.perf_counter()
    report = ev.evaluate_folders({"noisy-masks": maps}, masks_dir, "ecssd", progress=False)
    seconds = time.perf_counter() - t0
    scores = report["noisy-masks"]["ecssd"]
    workers = inspect.signature(ev.evaluate_folders).parameters["workers"].default
    return {"maps": scores.n, "seconds": seconds, "maps_per_s": scores.n / seconds, "workers": workers,
            "metrics": list(scores.metrics), "mae": scores.metrics["mae"], "maxF": scores.metrics["maxF"]}


# --------------------------------------------------------------------------------------------------------------------
# Report


def fractions(rows: list[dict], gflop: float | None, ceiling: float | None) -> None:
    """Add each PFANet row's GFLOP/s and fraction of the matmul ceiling."""
    for r in rows:
        if "images_per_s" in r and gflop and ceiling and r["path"] != "u2netp":
            r["gflops"] = r["images_per_s"] * gflop
            r["fraction_of_ceiling"] = r["gflops"] / ceiling


def format_report(res: dict) -> str:
    lines = []
    env = res["environment"]
    cpu = env["cpu"]
    lines.append(f"CPU {cpu['model']} ({cpu['logical_cpus']} logical), torch dispatch {cpu['torch_cpu_capability']}, "
                 f"flags: {', '.join(f for f, on in cpu['flags'].items() if on)}")
    lines.append(f"torch {env['torch']} ({env['torch_threads']} threads), onnxruntime {env['onnxruntime']} "
                 f"({env['onnxruntime_threads']} threads); load average at start {env['load_average_start'][0]:.2f}")
    for m in res.get("matmul", []):
        lines.append(f"fp32 matmul {m['n']}^2: {m['gflops']:.1f} GFLOP/s ({m['when']})")
    if res.get("gflop_per_image"):
        lines.append(f"PFANet: {res['gflop_per_image']:.2f} GFLOP per {res['size']}x{res['size']} image")
    if "inference" in res:
        lines.append("")
        lines.append(f"{'inference':16s} {'batch':>5s} {'images/s':>9s} {'ms/image':>9s} {'GFLOP/s':>8s} "
                     f"{'ceiling':>8s} {'1st call':>9s}")
        for r in sorted(res["inference"], key=lambda r: (PATHS.index(r["path"]), r["batch"])):
            if "error" in r:
                lines.append(f"{r['path']:16s} {r['batch']:5d}  n/a: {r['error']}")
                continue
            frac = f"{100 * r['fraction_of_ceiling']:7.1f}%" if "fraction_of_ceiling" in r else f"{'-':>8s}"
            gfs = f"{r['gflops']:8.1f}" if "gflops" in r else f"{'-':>8s}"
            note = f"  ({r['size']}x{r['size']})" if r["size"] != res["size"] else ""
            lines.append(f"{r['path']:16s} {r['batch']:5d} {r['images_per_s']:9.3f} {1000 / r['images_per_s']:9.1f} "
                         f"{gfs} {frac} {r['first_call_s']:8.1f}s{note}")
    prof = res.get("profile")
    if prof:
        lines.append("")
        lines.append(f"eager profile, batch {prof['batch']}, {prof['size']}x{prof['size']}, {prof['iterations']} "
                     "iterations: top operators by self CPU time")
        for t in prof["top"]:
            lines.append(f"  {t['op']:36s} {t['self_ms_per_iter']:9.1f} ms/iter {100 * t['share']:5.1f}%  "
                         f"{t['calls_per_iter']:3d} calls")
    tr = res.get("training")
    if tr:
        lines.append("")
        if "error" in tr:
            lines.append(f"training: n/a: {tr['error']}")
        else:
            lines.append(f"training step ({tr['recipe']}, batch {tr['batch']}, {tr['size']}x{tr['size']}, blocks "
                         f"1-{tr['freeze_blocks']} frozen)")
            base = next((r["seconds_per_image"] for r in tr["rows"] if r["path"] == "eager" and "error" not in r),
                        None)
            for r in tr["rows"]:
                if "error" in r:
                    lines.append(f"  {r['path']:14s} n/a: {r['error']}")
                    continue
                speedup = f"  x{base / r['seconds_per_image']:.2f} vs eager" if base else ""
                lines.append(f"  {r['path']:14s} {r['seconds_per_image']:.3f} s/image (step {r['seconds_per_step']:.2f}"
                             f" s; first {r['first_step_s']:.1f} s){speedup}")
    rss = res.get("rss")
    if rss:
        lines.append("")
        lines.append(f"rss: n/a: {rss['error']}" if "error" in rss else
                     f"predict one {rss['photo']}: peak RSS {rss['peak_rss_mib']:.0f} MiB (after loading the model "
                     f"{rss['rss_after_load_mib']:.0f} MiB), {rss['seconds']:.1f} s")
    ev = res.get("evaluation")
    if ev:
        lines.append("evaluation: n/a: " + ev["error"] if "error" in ev else
                     f"evaluation: {ev['maps']} ECSSD maps at native size, all metrics, {ev['workers']} workers: "
                     f"{ev['maps_per_s']:.1f} maps/s ({ev['seconds']:.1f} s)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny repetitions (development, tests)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--weights", help="PFANet weights (default: the shipped model)")
    ap.add_argument("--size", type=int, default=256, help="inference input size (default 256)")
    ap.add_argument("--train-size", type=int, default=192,
                    help="training crop size (default 192, the cpu-ecssd recipes' own)")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"sections, from {','.join(SECTIONS)} (default all)")
    ap.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                    help=f"inference paths, from {','.join(PATHS)} (default {','.join(DEFAULT_PATHS)})")
    ap.add_argument("--train-paths", default="eager,channels_last,compile", help="training variants")
    ap.add_argument("--batches", default="1,8", help="inference batch sizes (default 1,8)")
    ap.add_argument("--data", default=str(ECSSD), help="ECSSD folder (train.txt, masks/)")
    ap.add_argument("--photo-size", default="6000x4000", help="WxH of the synthetic photo for peak RSS")
    ap.add_argument("--eval-limit", type=int, help="score only the first N masks (default all; --quick 40)")
    ap.add_argument("--work", help="folder for exported models and generated files (default: a temporary one)")
    args = ap.parse_args(argv)

    from pfanet.export import calibration_images
    from pfanet.predictor import DEFAULT_WEIGHTS
    from pfanet.weights import load_checkpoint

    sections = [s for s in args.only.split(",") if s]
    names = [p for p in args.paths.split(",") if p]
    unknown = (set(sections) - set(SECTIONS)) | (set(names) - set(PATHS))
    if unknown:
        ap.error(f"unknown sections or paths: {', '.join(sorted(unknown))}")
    settings = QUICK if args.quick else Settings()
    if args.eval_limit is not None:
        settings = dataclasses.replace(settings, eval_limit=args.eval_limit)
    torch.set_num_threads(args.threads)
    weights = pathlib.Path(args.weights) if args.weights else DEFAULT_WEIGHTS
    data = pathlib.Path(args.data)
    model, spec, _ = load_checkpoint(weights)
    model = model.float().eval()

    res: dict = {"command": " ".join(sys.argv), "quick": args.quick, "settings": dataclasses.asdict(settings),
                 "weights": str(weights), "size": args.size, "environment": environment(args.threads),
                 "matmul": []}
    with contextlib.ExitStack() as stack:
        work = pathlib.Path(args.work) if args.work else pathlib.Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="pfanet-perf-")))
        work.mkdir(parents=True, exist_ok=True)
        if "matmul" in sections:
            res["matmul"].append({"when": "start", **matmul_gflops(settings.matmul_n, settings.matmul_reps)})
        if "flops" in sections:
            res["gflop_per_image"] = model_gflop(model, args.size)
        if "profile" in sections:
            x1, _ = input_batch(1, args.size, spec, data)
            res["profile"] = profile_eager(model, x1)
        if "inference" in sections:
            calib = (calibration_images(data / "train.txt", settings.calibration)
                     if (data / "train.txt").is_file() else [])
            res["setup_s"] = {}
            paths = build_paths(names, weights, args.size, work, args.threads, calib, res["setup_s"])
            sizes = [int(b) for b in args.batches.split(",")]
            x8, res["inputs"] = input_batch(max(sizes), args.size, spec, data)
            batches = {n: x8[:n] for n in sizes}
            u2 = {1: torch.from_numpy(np.random.default_rng(0).normal(0, 1, (1, 3, 320, 320)).astype(np.float32))}
            res["inference"] = bench_inference(paths, batches, settings, u2)
            res["calibration_images"] = len(calib)
        if "training" in sections:
            res["training"] = bench_training(weights, data, args.train_size, settings,
                                             [p for p in args.train_paths.split(",") if p])
        if "rss" in sections:
            w, h = (int(v) for v in args.photo_size.lower().split("x"))
            photo = synthetic_photo(work / f"photo_{w}x{h}.jpg", w, h)
            res["rss"] = bench_rss(pathlib.Path(args.weights) if args.weights else None, photo, args.threads)
        if "evaluation" in sections:
            res["evaluation"] = bench_evaluation(data, work, settings.eval_limit)
        if "matmul" in sections and ("inference" in sections or "training" in sections):
            res["matmul"].append({"when": "end", **matmul_gflops(settings.matmul_n, settings.matmul_reps)})
    ceiling = max((m["gflops"] for m in res["matmul"]), default=None)
    res["ceiling_gflops"] = ceiling
    fractions(res.get("inference", []), res.get("gflop_per_image"), ceiling)
    res["environment"]["load_average_end"] = os.getloadavg()
    res["max_rss_this_process_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(format_report(res), end="")
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
