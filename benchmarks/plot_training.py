"""Plot training curves (loss, and validation MAE / max F when present) from runs' log.csv files.

    python benchmarks/plot_training.py RUN_DIR [RUN_DIR ...] [-o docs/training_curve.png]

A run started with --init from another run's epoch_N.safetensors is drawn from epoch N on, so phases line up.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def epoch_offset(run: pathlib.Path) -> int:
    """The epoch a fine-tuning run starts from: N of the epoch_N.safetensors its recipe's `init` names, else 0."""
    recipe = run / "recipe.json"
    init = json.loads(recipe.read_text()).get("init", "") if recipe.is_file() else ""
    found = re.search(r"epoch_(\d+)\.safetensors$", init or "")
    return int(found.group(1)) if found else 0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders holding log.csv")
    ap.add_argument("-o", "--out", help="PNG path (default FIRST_RUN/training_curve.png)")
    args = ap.parse_args(argv)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))  # loss | max F | MAE: each on its own scale
    by_images = False
    for run in map(pathlib.Path, args.runs):
        with (run / "log.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        offset = epoch_offset(run)
        # images seen when the log has them (runs with mid-epoch validation), else epochs
        by_images = bool(rows) and bool(rows[0].get("images"))
        x = [float(r["images"]) if by_images else offset + float(r["epoch"]) for r in rows]
        ax[0].plot(x, [float(r["loss"]) for r in rows], "o-", label=f"{run.name}: train loss")
        sources = [k[: -len("_mae")] for k in (rows[0] if rows else {}) if k.endswith("_mae")]
        for source in sources:  # val (the first --val source), then NAME_mae / NAME_maxF of the others
            val = [(xi, r) for xi, r in zip(x, rows) if r.get(f"{source}_mae")]
            if val:
                name = f"{run.name} {'val (first source)' if source == 'val' else source}"
                vx = [xi for xi, _ in val]
                ax[1].plot(vx, [float(r[f"{source}_maxF"]) for _, r in val], "o-", label=f"{name}: max F")
                ax[2].plot(vx, [float(r[f"{source}_mae"]) for _, r in val], "s--", label=f"{name}: MAE")
    # the recipe's loss: edge preservation, plus an IoU term where the recipe has one, plus the CA regulariser
    ax[0].set_ylabel("training loss (the recipe's)")
    ax[1].set_ylabel("validation max F")
    ax[2].set_ylabel("validation MAE")
    for a in ax:
        a.set_xlabel("images seen" if by_images else "epoch")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.suptitle("training curve: " + " -> ".join(pathlib.Path(r).name for r in args.runs))
    fig.tight_layout()
    out = args.out or pathlib.Path(args.runs[0]) / "training_curve.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
