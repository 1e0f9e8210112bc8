"""Which training recipe learns fastest on this machine: each variant trains for the same number of DUTS-TR images
from the HED VGG16, then is scored on a fixed DUTS-TR val subset. Images/s are measured in the same run (ratios
between variants are what to read: absolute speed drifts on a shared machine).

    python benchmarks/train_compare.py --images 1600 --val-limit 100 --json benchmarks/results/train_compare.json

A variant is `name=field:value,field:value` over the cpu-duts recipe (see pfanet/recipes.py), e.g.
`sgd=optimizer:sgd,lr:1e-2,norm:per-image`.
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


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition("=")
    changes = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition(":")
        if key == "lr":
            changes["lr"] = float(value)
        elif FIELD_TYPES.get(key) is bool:
            changes[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            changes[key] = FIELD_TYPES[key](value)
    return name, changes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="name=field:value,... over cpu-duts")
    ap.add_argument("--images", type=int, default=1600, help="training images per variant")
    ap.add_argument("--size", type=int, default=128, help="training and validation size")
    ap.add_argument("--val-limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    val = evenly_spaced(read_pairs(DATA / "duts-tr" / "val.txt"), args.val_limit)
    results = []
    for text in args.variants:
        name, changes = parse_variant(text)
        recipe = RECIPES["cpu-duts"].override(size=args.size, size_schedule="", epochs=1, **changes)
        steps = args.images // recipe.batch_size
        # the cosine of a 1-epoch recipe would decay over DUTS-TR's 1,256 steps; for a fixed budget, keep the rate
        recipe = recipe.override(lr_decay="none")
        with tempfile.TemporaryDirectory() as out:
            opts = TrainOptions(train=[str(DATA / "duts-tr" / "train.txt")], out=out, max_steps=steps,
                                workers=args.workers, progress=False)
            trainer = Trainer(recipe, opts)
            t0 = time.perf_counter()
            trainer.run()
            seconds = time.perf_counter() - t0
            if trainer.stopped_by:  # Ctrl-C / SIGTERM stops the comparison, not just this variant
                return 128 + trainer.stopped_by
            scores = validate(trainer.model, trainer.spec, val, torch.device("cpu"))
        row = {"name": name, "changes": changes, "images": steps * recipe.batch_size,
               "images_per_s": steps * recipe.batch_size / seconds, "val_mae": scores["mae"],
               "val_maxF": scores["maxF"]}
        results.append(row)
        print(f"{name:24s} {row['images_per_s']:6.2f} img/s  DUTS-TR val MAE {row['val_mae']:.4f}  "
              f"max F {row['val_maxF']:.4f}", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
