"""How a checkpoint should predict: its input size and whether its BatchNorm statistics are re-estimated ("precise
BN", pfanet.precise_bn), chosen on validation data the way every ship is (issue 20: the same measurement each time).

    python tools/select_model.py /work/runs/cpu-duts-iou/best_mae.safetensors [--sizes 192 224 256] \
        [--bn-images 400] [--json benchmarks/results/select_<name>.json]

Each variant is scored with PyTorch fp32 on the fixed DUTS-TR val subset (200 evenly spaced pairs, the one the run
validates on) and on ECSSD val. A variant replaces the checkpoint as trained (its own size, its own statistics) only
when it is at least as good in both DUTS-TR val MAE and max F and better in one; of several such, the lowest MAE.
ECSSD val is shown, not used to choose. It prints the `tools/ship_model.py` options that apply the choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pfanet.data import read_pairs
from pfanet.evaluate import score_pairs
from pfanet.precise_bn import recompute_bn_statistics
from pfanet.predictor import Predictor
from pfanet.train import evenly_spaced
from pfanet.weights import load_checkpoint

DATA = REPO.parent / "shared" / "data"


def bn_pairs(count: int) -> list:
    """The training images precise BN uses: `count` evenly spaced DUTS-TR train pairs (never validation ones)."""
    return evenly_spaced(read_pairs(DATA / "duts-tr" / "train.txt"), count)


def with_precise_bn(weights: str, size: int, count: int):
    """(model, spec) of `weights` to predict at `size`, statistics re-estimated on `count` training images at that
    size (count 0: as trained)."""
    model, spec, _ = load_checkpoint(weights)
    spec = dataclasses.replace(spec, size=size)
    if count:
        recompute_bn_statistics(model, spec, bn_pairs(count))
    return model, spec


def choose(rows: list[dict]) -> dict:
    """The first row is the checkpoint as trained; another replaces it only if no worse in both DUTS-TR val metrics
    and better in one (the lowest MAE of those)."""
    base = rows[0]
    better = [r for r in rows[1:] if r["duts_mae"] <= base["duts_mae"] and r["duts_maxF"] >= base["duts_maxF"]
              and (r["duts_mae"] < base["duts_mae"] or r["duts_maxF"] > base["duts_maxF"])]
    return min(better, key=lambda r: r["duts_mae"]) if better else base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("--sizes", type=int, nargs="+", help="input sizes to try (default: the trained size and +32)")
    ap.add_argument("--bn-images", type=int, default=400, help="training images for precise BN (0: do not try it)")
    ap.add_argument("--val-limit", type=int, default=200, help="evenly spaced DUTS-TR val pairs (default 200)")
    ap.add_argument("--json", help="write every variant's scores and the choice")
    args = ap.parse_args(argv)
    _, spec, meta = load_checkpoint(args.weights)
    sizes = args.sizes or [spec.size, spec.size + 32]
    sizes = [spec.size] + [s for s in sizes if s != spec.size]  # the checkpoint as trained comes first
    vals = {"duts": evenly_spaced(read_pairs(DATA / "duts-tr" / "val.txt"), args.val_limit),
            "ecssd": read_pairs(DATA / "ecssd" / "val.txt")}
    norm_batch = meta.get("config", {}).get("norm") == "batch"
    rows = []
    for bn in [0] + ([args.bn_images] if args.bn_images and norm_batch else []):
        for size in sizes:
            model, s = with_precise_bn(args.weights, size, bn)
            predictor = Predictor(model=model, spec=s, device="cpu", batch_size=4)
            row = {"size": size, "precise_bn": bn}
            for name, pairs in vals.items():
                scores = score_pairs(predictor, pairs)
                row.update({f"{name}_mae": scores["mae"], f"{name}_maxF": scores["maxF"]})
            rows.append(row)
            print(f"size {size:4d}  precise BN {bn or '-':>4}  DUTS-TR val MAE {row['duts_mae']:.4f} max F "
                  f"{row['duts_maxF']:.4f}  ECSSD val MAE {row['ecssd_mae']:.4f} max F {row['ecssd_maxF']:.4f}",
                  flush=True)
    best = choose(rows)
    options = f"--size {best['size']}" + (f" --precise-bn {best['precise_bn']}" if best["precise_bn"] else "")
    print(f"chosen: size {best['size']}, precise BN {best['precise_bn'] or 'no'} -> tools/ship_model.py {options}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"weights": str(args.weights), "rows": rows, "chosen": best,
                                                       "val_limit": args.val_limit}, indent=1))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
