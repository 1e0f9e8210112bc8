"""How many more images would a run need to reach the targets, if its validation curve went on as it has?

    python benchmarks/project_training.py docs/training_log_cpu-duts.csv --from 8000 --images-per-s 1.8

Fits a power law, error = a * images^b, to each validation column of a run's log.csv (MAE, and 1 - max F: the
shortfall from a perfect F) by least squares in log-log, from --from images on (the first descent follows another
law), and prints where each fit reaches its target (issue 11's minimum: MAE 0.060, max F 0.900). An extrapolation
of a noisy curve at a fixed recipe, resolution and learning-rate schedule: an order of magnitude, not a forecast.
"""

from __future__ import annotations

import argparse
import csv

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", help="a run's log.csv")
    ap.add_argument("--from", dest="start", type=float, default=0, help="fit rows from this many images on")
    ap.add_argument("--mae", type=float, default=0.060, help="target MAE (default 0.060)")
    ap.add_argument("--max-f", type=float, default=0.900, help="target max F (default 0.900)")
    ap.add_argument("--images-per-s", type=float, default=1.8, help="training speed, for hours (default 1.8)")
    ap.add_argument("--epoch", type=int, default=10048, help="images per epoch (default DUTS-TR's 10,048)")
    args = ap.parse_args(argv)
    with open(args.log, newline="") as f:
        rows = [r for r in csv.DictReader(f) if float(r["images"]) >= args.start]
    last = max(float(r["images"]) for r in rows)
    for column in [k for k in rows[0] if k.endswith(("_mae", "_maxF"))]:
        points = [(float(r["images"]), float(r[column])) for r in rows if r[column]]
        x = np.log([p[0] for p in points])
        is_f = column.endswith("_maxF")
        error = [1 - p[1] if is_f else p[1] for p in points]
        b, a = np.polyfit(x, np.log(error), 1)
        target = 1 - args.max_f if is_f else args.mae
        fitted = np.exp(a + b * np.log(last))
        if b >= 0:
            print(f"{column}: not improving (exponent {b:+.3f}) over {len(points)} rows")
            continue
        n = float(np.exp((np.log(target) - a) / b))
        shown = (lambda e: f"{1 - e:.4f}") if is_f else (lambda e: f"{e:.4f}")
        print(f"{column}: {len(points)} rows, exponent {b:+.3f}; fit at {last:,.0f} images {shown(fitted)}; "
              f"reaches {shown(target)} at {n:,.0f} images = {n / args.epoch:,.0f} epochs = "
              f"{n / args.images_per_s / 3600:,.0f} h at {args.images_per_s} images/s")


if __name__ == "__main__":
    main()
