"""Which training recipe learns fastest on this machine: each variant trains for the same number of DUTS-TR images
from the HED VGG16, then is scored on a fixed DUTS-TR val subset. Images/s are measured in the same run (ratios
between variants are what to read: absolute speed drifts on a shared machine).

    python benchmarks/train_compare.py --images 640 --val-limit 100 --json benchmarks/results/train_compare.json \
        base sgd=optimizer:sgd,lr:1e-2 ...
    python benchmarks/train_compare.py --speed-only --images 96 base s192=size:192 cl=channels_last:on ...

A variant is `name=field:value,field:value` over the cpu-duts recipe (see pfanet/recipes.py), e.g.
`sgd=optimizer:sgd,lr:1e-2,norm:per-image`, or over the mechanics: workers, threads, cache, channels_last, bf16.
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
from pfanet.recipes import RECIPES
from pfanet.train import Trainer, TrainOptions, evenly_spaced, validate

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
FIELD_TYPES = {f: type(v) for f, v in RECIPES["cpu-duts"].to_dict().items()}
MECHANICS = {"workers": int, "threads": int, "cache": bool, "channels_last": bool, "bf16": bool}


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


def timed(step, ends: list[float]):
    """train_step, noting when each step ends (data waits between steps count: they are the run's real pace)."""
    def wrapper(*args, **kw):
        result = step(*args, **kw)
        ends.append(time.perf_counter())
        return result
    return wrapper


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="name=field:value,... over cpu-duts")
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
    val = evenly_spaced(read_pairs(DATA / "duts-tr" / "val.txt"), args.val_limit)
    default_threads = torch.get_num_threads()
    results = []
    for text in args.variants:
        name, changes, mechanics = parse_variant(text)
        recipe = RECIPES["cpu-duts"].override(**{"size": args.size, "size_schedule": "", "epochs": 1,
                                                 "warmup_steps": args.warmup_steps, **changes})
        steps = args.images // recipe.batch_size
        # the cosine of a 1-epoch recipe would decay over DUTS-TR's 1,256 steps; for a fixed budget, keep the rate
        recipe = recipe.override(lr_decay="none")
        torch.set_num_threads(mechanics.get("threads", args.threads or default_threads))
        with tempfile.TemporaryDirectory() as out:
            opts = TrainOptions(train=[str(DATA / "duts-tr" / "train.txt")], out=out, max_steps=steps,
                                workers=mechanics.get("workers", args.workers), cache=mechanics.get("cache", False),
                                channels_last=mechanics.get("channels_last", False), bf16=mechanics.get("bf16", False),
                                limit=steps * recipe.batch_size if args.speed_only else None, progress=False)
            trainer = Trainer(recipe, opts)
            ends: list[float] = []
            trainer.train_step = timed(trainer.train_step, ends)
            trainer.run()
            if trainer.stopped_by:  # Ctrl-C / SIGTERM stops the comparison, not just this variant
                return 128 + trainer.stopped_by
            if len(ends) < 3:
                raise SystemExit(f"variant {name!r}: {len(ends)} steps; --images must give at least 3")
            pace = (len(ends) - 2) * recipe.batch_size / (ends[-1] - ends[1])
            scores = {} if args.speed_only else validate(trainer.model, trainer.spec, val, torch.device("cpu"))
        row = {"name": name, "changes": changes, "mechanics": mechanics, "images": steps * recipe.batch_size,
               "images_per_s": pace, "val_mae": scores.get("mae"), "val_maxF": scores.get("maxF")}
        results.append(row)
        quality = "" if args.speed_only else f"  DUTS-TR val MAE {row['val_mae']:.4f}  max F {row['val_maxF']:.4f}"
        print(f"{name:24s} {pace:6.2f} img/s{quality}", flush=True)
        if args.json:  # after every variant: a long comparison stopped part-way keeps what it measured
            pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "cpu": cpu_name(),
                                                           "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
