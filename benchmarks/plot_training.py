"""Plot a run's training curve (loss, and validation MAE / max F when present) from its log.csv.

    python benchmarks/plot_training.py RUN_DIR [-o docs/training_curve.png]
"""

from __future__ import annotations

import argparse
import csv
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder holding log.csv")
    ap.add_argument("-o", "--out", help="PNG path (default RUN/training_curve.png)")
    args = ap.parse_args(argv)
    rows = list(csv.DictReader(open(pathlib.Path(args.run) / "log.csv")))
    epochs = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(epochs, [float(r["loss"]) for r in rows], "o-", label="train loss")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("loss (edge preservation loss + CA regulariser)")
    ax[0].legend()
    val = [r for r in rows if r.get("val_mae")]
    if val:
        ve = [int(r["epoch"]) for r in val]
        ax[1].plot(ve, [float(r["val_maxF"]) for r in val], "o-", label="val max F")
        ax[1].plot(ve, [float(r["val_mae"]) for r in val], "s-", label="val MAE")
        ax[1].set_xlabel("epoch")
        ax[1].legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle(f"training curve: {pathlib.Path(args.run).name}")
    fig.tight_layout()
    out = args.out or pathlib.Path(args.run) / "training_curve.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
