"""Whole-process speed: `pfanet predict` on a folder of photos against the official Keras pipeline on the same photos,
each as a fresh process (start-up, model loading, decoding, network, writing PNGs), plus where `pfanet predict
one.jpg` spends its time before the first forward pass.

    python benchmarks/whole_process.py --json benchmarks/results/whole_process.json

The Keras side runs in another interpreter (--keras-python, default .venv-tf/bin/python: TensorFlow, tf_keras,
OpenCV; see docs/FIDELITY.md) through this same file (`--keras-child`): the official network rebuilt in tf_keras
(tests/keras_official.py) with random weights, at the same input size as the pfanet model, and the authors' demo
pipeline (cv2.imread, reverse to RGB, subtract the means, zero-pad to a square, cv2.resize, model.predict at batch 1,
sigmoid x 255 to uint8, resize back, crop), each map written with cv2.imwrite. pfanet runs as users run it: the
`pfanet` script beside this interpreter, `pfanet predict PHOTOS -o OUT` with the given --backend values, its ONNX
cache warmed first (the cold first run is reported apart).

The photos are the first --count images of ECSSD val.txt (never test). The processes are interleaved (one of each in
turn, repeated) and the medians compared, so that drift in the machine's load reaches them alike. Each process's CPU
time (user + system, of it and its children) is recorded beside its wall time.

--startup-baseline DIR adds the start-up of another checkout of pfanet (e.g. `git worktree add DIR COMMIT`), run from
DIR with this interpreter, to compare start-up before and after a change:

    git worktree add --detach /tmp/pfanet-before 297af1d
    python benchmarks/whole_process.py --startup-baseline /tmp/pfanet-before \
        --json benchmarks/results/whole_process.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
ECSSD = REPO.parent / "shared" / "data" / "ecssd"
MEANS = (103.939, 116.779, 123.68)  # the official demo's, subtracted from channels 0 / 1 / 2 after BGR -> RGB

# Runs `pfanet` in-process with timestamps at each start-up stage (wall clock, comparable with the parent's launch).
STARTUP_CHILD = """
import json, sys, time
t = {"python_ready": time.time()}
from pfanet import predictor
t["pfanet_imported"] = time.time()
init, logits = predictor.Predictor.__init__, predictor.Predictor.logits
def timed_init(self, *a, **k):
    t.setdefault("predictor_start", time.time())
    init(self, *a, **k)
    t.setdefault("predictor_ready", time.time())
def timed_logits(self, x):
    t.setdefault("first_forward", time.time())
    return logits(self, x)
predictor.Predictor.__init__, predictor.Predictor.logits = timed_init, timed_logits
from pfanet.cli import main
rc = main(sys.argv[1:])
t["done"] = time.time()
print("STAGES " + json.dumps(t), file=sys.stderr)
sys.exit(rc)
"""


def keras_child(photos: pathlib.Path, out: pathlib.Path, size: int) -> None:
    """The official pipeline over every photo in `photos` (run under TensorFlow's interpreter)."""
    t = {"python_ready": time.time()}
    import cv2
    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    from keras_official import build_official, randomise

    t["keras_imported"] = time.time()
    model = build_official(size)
    randomise(model)
    t["model_ready"] = time.time()
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(photos.iterdir()):
        x = cv2.imread(str(path)).astype(np.float32)
        h, w = x.shape[:2]
        x = x[..., ::-1] - np.array(MEANS, dtype=np.float32)
        side = max(h, w)
        square = np.zeros((side, side, 3))
        top, left = (side - h) // 2, (side - w) // 2
        square[top : top + h, left : left + w] = x
        x = cv2.resize(square, (size, size), interpolation=cv2.INTER_LINEAR)[None]
        t.setdefault("first_forward", time.time())
        logits = model.predict(x, verbose=0)
        m = np.array(1 / (1 + np.exp(-logits)) * 255, dtype=np.uint8).squeeze()
        m = cv2.resize(m, (side, side))[top : top + h, left : left + w]
        cv2.imwrite(str(out / f"{path.stem}.png"), m)
    t["done"] = time.time()
    print("STAGES " + json.dumps(t), file=sys.stderr)


def run(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Wall time of one process and its stage timestamps, relative to the launch."""
    t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    wall, cpu1 = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    stages = {}
    for line in proc.stderr.splitlines():
        if line.startswith("STAGES "):
            stages = {k: round(v - t0, 3) for k, v in json.loads(line[7:]).items()}
    backend = next((line for line in proc.stderr.splitlines() if "backend " in line), "")
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "stages_s": stages, "backend_line": backend.strip()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=24, help="photos (default 24: the first of ECSSD val.txt)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each process, interleaved (default 3)")
    ap.add_argument("--backends", default="auto", help="pfanet --backend values run on all photos (default auto)")
    ap.add_argument("--startup-backends", default="auto,torch",
                    help="pfanet --backend values whose start-up is measured on one photo (default auto,torch)")
    ap.add_argument("--startup-baseline", metavar="DIR", help="also the start-up of the pfanet checkout in DIR")
    ap.add_argument("--startup-only", action="store_true", help="only the one-photo start-ups (no Keras)")
    ap.add_argument("--weights", help="PFANet weights (default: the shipped model)")
    ap.add_argument("--keras-python", default=str(REPO / ".venv-tf" / "bin" / "python"),
                    help="an interpreter with tensorflow, tf_keras and opencv (default .venv-tf/bin/python)")
    ap.add_argument("--data", default=str(ECSSD), help="ECSSD folder (val.txt)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keras-child", nargs=3, metavar=("PHOTOS", "OUT", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.keras_child:
        keras_child(pathlib.Path(args.keras_child[0]), pathlib.Path(args.keras_child[1]), int(args.keras_child[2]))
        return 0

    from pfanet.data import read_list_file
    from pfanet.predictor import DEFAULT_WEIGHTS
    from pfanet.weights import read_checkpoint

    weights = pathlib.Path(args.weights) if args.weights else DEFAULT_WEIGHTS
    size = read_checkpoint(weights)[1]["input"]["size"]
    backends = [b for b in args.backends.split(",") if b]
    pfanet_script = str(pathlib.Path(sys.executable).parent / "pfanet")
    res: dict = {"command": " ".join(sys.argv), "weights": str(weights), "size": size, "count": args.count,
                 "cpu": cpu_line(), "load_average_start": os.getloadavg(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="pfanet-whole-") as tmp:
        tmp = pathlib.Path(tmp)
        photos, one = tmp / "photos", tmp / "one"
        photos.mkdir()
        one.mkdir()
        pairs = read_list_file(pathlib.Path(args.data) / "val.txt")[: args.count]
        for img, _ in pairs:
            shutil.copyfile(img, photos / img.name)
        shutil.copyfile(pairs[0][0], one / pairs[0][0].name)
        env = dict(os.environ, PFANET_CACHE=str(tmp / "cache"))  # a cold cache: the first run exports
        extra = ["--weights", str(weights)] if args.weights else []

        def pfanet(backend: str, inputs: pathlib.Path, startup: bool = False, tree: str | None = None) -> dict:
            cli = ["predict", str(inputs), "-o", str(tmp / f"out-{backend}"), "--overwrite", "--no-progress",
                   "--backend", backend, *extra]
            cmd = [sys.executable, "-c", STARTUP_CHILD, *cli] if startup else [pfanet_script, *cli]
            if tree:  # another checkout (imported from there: the current folder comes first), with its own cache
                return run(cmd, dict(env, PYTHONPATH=tree, PFANET_CACHE=str(tmp / "cache-baseline")), cwd=tree)
            return run(cmd, env)

        def keras() -> dict:
            return run([args.keras_python, __file__, "--keras-child", str(photos), str(tmp / "out-keras"), str(size)])

        cold = pfanet("auto", one, startup=True)
        res["runs"]["pfanet auto, first run (cold cache: exports and checks the graph)"] = [cold]
        jobs = {}
        if not args.startup_only:
            jobs = {f"pfanet --backend {b}": (lambda b=b: pfanet(b, photos)) for b in backends}
            jobs["keras official"] = keras
        startup = [b for b in args.startup_backends.split(",") if b]
        jobs.update({f"pfanet --backend {b}, one photo (start-up)": (lambda b=b: pfanet(b, one, startup=True))
                     for b in startup})
        if args.startup_baseline:
            res["startup_baseline"] = args.startup_baseline
            pfanet("auto", one, startup=True, tree=args.startup_baseline)  # warms its cache
            jobs["baseline pfanet --backend auto, one photo (start-up)"] = (
                lambda: pfanet("auto", one, startup=True, tree=args.startup_baseline))
        for rep in range(args.repeats):
            for name, job in jobs.items():
                print(f"[{rep + 1}/{args.repeats}] {name}", file=sys.stderr, flush=True)
                res["runs"].setdefault(name, []).append(job())
    res["load_average_end"] = os.getloadavg()
    res["median_wall_s"] = {name: statistics.median(r["wall_s"] for r in runs) for name, runs in res["runs"].items()}
    res["median_cpu_s"] = {name: statistics.median(r["cpu_s"] for r in runs) for name, runs in res["runs"].items()}
    res["median_first_forward_s"] = {name: statistics.median(r["stages_s"]["first_forward"] for r in runs)
                                     for name, runs in res["runs"].items() if "one photo" in name}
    keras_s = res["median_wall_s"].get("keras official")
    res["speedup_vs_keras"] = {name: round(keras_s / s, 3) for name, s in res["median_wall_s"].items()
                               if keras_s and name.startswith("pfanet") and "one photo" not in name
                               and "first" not in name}
    print(report(res), end="")
    if args.json:
        out = pathlib.Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


def cpu_line() -> str:
    from pfanet.hardware import INT8_FLAGS, cpu_flags

    flags = cpu_flags()
    model = next((line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    shown = [f for f in ("avx2", "fma", "avx512f", *INT8_FLAGS) if f in flags]
    return f"{model}, {os.cpu_count()} logical CPUs, flags: {' '.join(shown)}"


def report(res: dict) -> str:
    lines = [(f"{res['cpu']}; load average at the start {res['load_average_start'][0]:.2f}, end "
              f"{res['load_average_end'][0]:.2f}"),
             f"{res['count']} ECSSD val photos, network input {res['size']}x{res['size']}, medians of the runs:"]
    for name, s in res["median_wall_s"].items():
        ratio = res["speedup_vs_keras"].get(name)
        lines.append(f"  {name:62s} {s:7.2f} s (CPU {res['median_cpu_s'][name]:6.2f} s)"
                     + (f"   {ratio:.2f}x Keras" if ratio else ""))
    lines.append("first forward pass of one photo, median seconds from launch: " + ", ".join(
        f"{name.split(', one photo')[0]} {s:.2f}" for name, s in res["median_first_forward_s"].items()))
    lines.append("start-up of one photo (seconds from launch; median run):")
    for name, runs in res["runs"].items():
        if "one photo" in name or "first" in name or name == "keras official":
            mid = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
            lines.append(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in mid["stages_s"].items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
