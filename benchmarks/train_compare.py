"""Which training recipe learns fastest on this machine: each variant trains for the same number of DUTS-TR images
from the HED VGG16, then is scored on a fixed DUTS-TR val subset. Images/s are measured in the same run (ratios
between variants are what to read: absolute speed drifts on a shared machine).

    python benchmarks/train_compare.py --images 640 --val-limit 100 --json benchmarks/results/train_compare.json \
        base sgd=optimizer:sgd,lr:1e-2 ...
    python benchmarks/train_compare.py --speed-only --images 96 base s192=size:192 cl=channels_last:on ...
    # from the shipped model, scored on DUTS-TR val (200) and ECSSD val, EMA weights scored beside the raw ones:
    python benchmarks/train_compare.py --recipe cpu-duts-192 --init pfanet/weights/pfanet_duts.safetensors \
        --size 192 --images 4000 --val-limit 200 --ecssd-val --ema 0.99 base iou=iou:soft ...

A variant is `name=field:value,field:value` over the --recipe (default cpu-duts; see pfanet/recipes.py), e.g.
`sgd=optimizer:sgd,lr:1e-2,norm:per-image`, or over the mechanics: workers, threads, cache, channels_last, bf16,
compile, seed (another seed draws another order and other augmentations: the same variant at two seeds measures the
noise a difference between variants is read against).
Every variant starts from the same weights and sees the same images in the same order (seed 0). Images/s count
from the end of the second step (model building, worker start-up and the first steps' one-off costs aside).
--speed-only trains on the first --images pairs only (so that `cache` preloads just those) and skips validation.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pfanet.data import read_pairs
from pfanet.ema import ModelEMA
from pfanet.recipes import RECIPES
from pfanet.training import Callback, Trainer, TrainOptions, evenly_spaced, validate

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
FIELD_TYPES = {f: type(v) for f, v in RECIPES["cpu-duts"].to_dict().items()}
MECHANICS = {"workers": int, "threads": int, "cache": bool, "channels_last": bool, "bf16": bool, "compile": bool,
             "seed": int}


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """"name=field:value,..." -> (name, recipe changes, mechanics changes)."""
    name, _, body = text.partition("=")
    changes, mechanics = {}, {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition(":")
        kind = MECHANICS.get(key) or (float if key == "lr" else FIELD_TYPES.get(key))
        if kind is None:
            raise SystemExit(f"variant {name!r}: {key!r} is neither a recipe field nor one of {sorted(MECHANICS)}")
        parsed = value.lower() in ("1", "true", "yes", "on") if kind is bool else kind(value)
        (mechanics if key in MECHANICS else changes)[key] = parsed
    return name, changes, mechanics


def cpu_name() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines() if pathlib.Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


class StepEnds(Callback):
    """Notes when each optimizer step ends (data waits between steps count: they are the run's real pace)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_step(self, trainer, loss, images) -> None:
        self.ends.append(time.perf_counter())


def quality(scores: dict) -> str:
    return "  ".join(f"{k} MAE {s['mae']:.4f} max F {s['maxF']:.4f}" for k, s in scores.items())


class EMA(Callback):
    """Moving averages of the trained weights, one per decay (pfanet.ema), from the run's start, updated after each
    step and scored beside the raw weights (what a recipe's `ema` would validate and ship)."""

    def __init__(self, decays: list[float]):
        self.decays, self.averages = decays, {}

    def on_fit_start(self, trainer) -> None:
        self.averages = {d: ModelEMA(trainer.model, d) for d in self.decays}

    def on_train_step(self, trainer, loss, images) -> None:
        for avg in self.averages.values():
            avg.update(trainer.model)

    def scored(self, score) -> dict[float, dict]:
        """score(model) of each average."""
        return {d: score(avg.module) for d, avg in self.averages.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="name=field:value,... over --recipe")
    ap.add_argument("--recipe", default="cpu-duts", choices=sorted(RECIPES), help="the recipe the variants change")
    ap.add_argument("--init", help="start every variant from this PFANet weights file (default: the recipe's)")
    ap.add_argument("--ecssd-val", action="store_true", help="also score on ECSSD val (all 100 pairs)")
    ap.add_argument("--ema", type=float, nargs="*", default=[],
                    help="also score exponential moving averages of the weights with these decays")
    ap.add_argument("--images", type=int, default=1600, help="training images per variant")
    ap.add_argument("--size", type=int, default=128, help="training and validation size")
    ap.add_argument("--val-limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--warmup-steps", type=int, default=20,
                    help="the variants' warm-up (cpu-duts' 200 would outlast a short budget)")
    ap.add_argument("--speed-only", action="store_true", help="images/s only: no validation")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    vals = {"duts-tr": evenly_spaced(read_pairs(DATA / "duts-tr" / "val.txt"), args.val_limit)}
    if args.ecssd_val:
        vals["ecssd"] = read_pairs(DATA / "ecssd" / "val.txt")
    default_threads = torch.get_num_threads()
    results = []
    for text in args.variants:
        name, changes, mechanics = parse_variant(text)
        recipe = RECIPES[args.recipe].override(**{"size": args.size, "size_schedule": "", "epochs": 1,
                                                  "warmup_steps": args.warmup_steps, "init": args.init, **changes})
        steps = args.images // recipe.batch_size
        # the cosine of a 1-epoch recipe would decay over DUTS-TR's 1,256 steps; for a fixed budget, keep the rate
        recipe = recipe.override(lr_decay="none")
        torch.set_num_threads(mechanics.get("threads", args.threads or default_threads))
        with tempfile.TemporaryDirectory() as out:
            opts = TrainOptions(train=[str(DATA / "duts-tr" / "train.txt")], out=out, max_steps=steps,
                                workers=mechanics.get("workers", args.workers), cache=mechanics.get("cache", False),
                                channels_last=mechanics.get("channels_last", False), bf16=mechanics.get("bf16", False),
                                compile=mechanics.get("compile", False), seed=mechanics.get("seed"),
                                limit=steps * recipe.batch_size if args.speed_only else None, progress=False)
            step_ends = StepEnds()
            ema = EMA(args.ema) if args.ema and not args.speed_only else None
            trainer = Trainer(recipe, opts, callbacks=[step_ends, *([ema] if ema else [])])
            trainer.run()
            ends = step_ends.ends
            if trainer.stopped_by:  # Ctrl-C / SIGTERM stops the comparison, not just this variant
                return 128 + trainer.stopped_by
            if len(ends) < 3:
                raise SystemExit(f"variant {name!r}: {len(ends)} steps; --images must give at least 3")
            pace = (len(ends) - 2) * recipe.batch_size / (ends[-1] - ends[1])
            def score(model, spec=trainer.spec):
                return {k: validate(model, spec, pairs, torch.device("cpu")) for k, pairs in vals.items()}
            scores = {} if args.speed_only else score(trainer.model)
            ema_scores = ema.scored(score) if ema else {}
        row = {"name": name, "changes": changes, "mechanics": mechanics, "images": steps * recipe.batch_size,
               "images_per_s": pace, "val_mae": scores.get("duts-tr", {}).get("mae"),
               "val_maxF": scores.get("duts-tr", {}).get("maxF"), "scores": scores,
               "ema": {str(d): s for d, s in ema_scores.items()}}
        results.append(row)
        print(f"{name:24s} {pace:6.2f} img/s  {quality(scores)}", flush=True)
        for d, s in ema_scores.items():
            print(f"{'  EMA ' + str(d):24s} {'':10s}  {quality(s)}", flush=True)
        if args.json:  # after every variant: a long comparison stopped part-way keeps what it measured
            pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "cpu": cpu_name(),
                                                           "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
