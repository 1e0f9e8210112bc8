"""PFANet vs U²-Net-p on an ECSSD split, in one run: maps from both, then every metric through `pfanet evaluate`.

    python benchmarks/ecssd_accuracy.py --split val            # development
    python benchmarks/ecssd_accuracy.py --split test           # the ECSSD-trained model's final numbers, once
    python benchmarks/ecssd_accuracy.py --split all            # a DUTS-TR model's (all 1,000: the paper's Table 1)

Writes benchmarks/results/ecssd-<split>/{maps/<method>/, metrics.json, metrics.md, plots/} and prints the table.
The split lists come from ../shared/data/ecssd/<split>.txt; only the images of that split are read.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from peers import U2NetP

from pfanet.data import read_list_file
from pfanet.io import load_image
from pfanet.predictor import Predictor

REPO = pathlib.Path(__file__).resolve().parents[1]
# PFANET.md, the paper's Table 1 on ECSSD (trained on DUTS-TR): max F (beta^2 0.3), MAE.
PAPER_ECSSD = {"maxF": 0.9313, "MAE": 0.0328}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", required=True, choices=["train", "val", "test", "all"])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ecssd"), help="ECSSD folder")
    ap.add_argument("--weights", help="pfanet weights (default: the shipped model)")
    ap.add_argument("--out", help="results folder (default benchmarks/results/ecssd-<split>)")
    ap.add_argument("--limit", type=int, help="first N images only (smoke runs)")
    args = ap.parse_args(argv)

    pairs = read_list_file(pathlib.Path(args.data) / f"{args.split}.txt")[: args.limit]
    out = pathlib.Path(args.out or REPO / "benchmarks" / "results" / f"ecssd-{args.split}")
    masks_dir = out / "masks"
    masks_dir.mkdir(parents=True, exist_ok=True)
    for _, mask in pairs:  # the split's masks only, so evaluation pairs exactly these images
        link = masks_dir / mask.name
        if not link.exists():
            link.symlink_to(mask.resolve())

    methods = {"pfanet": Predictor(args.weights, device="cpu", batch_size=1), "u2netp": U2NetP()}
    seconds = {}
    for name, model in methods.items():
        d = out / "maps" / name
        d.mkdir(parents=True, exist_ok=True)
        t = 0.0
        for img_path, _ in tqdm(pairs, desc=name):
            rgb = load_image(img_path)
            t0 = time.perf_counter()
            m = model.predict(rgb)
            t += time.perf_counter() - t0
            Image.fromarray(m).save(d / f"{img_path.stem}.png")
        seconds[name] = t / len(pairs)

    from pfanet.cli import main as pfanet_main

    rc = pfanet_main(["evaluate", "--masks", str(masks_dir), "--json", str(out / "metrics.json"),
                      "--table", str(out / "metrics.md"), "--plots", str(out / "plots"), "--maps",
                      *(f"{n}={out / 'maps' / n}" for n in methods)])
    timing = {n: {"seconds_per_image": s, "images_per_s": 1 / s} for n, s in seconds.items()}
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    if args.split == "all":  # the paper's Table 1 is on all 1,000 images
        print(f"\npaper, Table 1 (ECSSD, trained on DUTS-TR): max F {PAPER_ECSSD['maxF']:.4f}  MAE {PAPER_ECSSD['MAE']:.4f}")
    print("\nseconds per image (same run, same machine, batch 1, native size in and out):")
    for n, s in seconds.items():
        print(f"  {n:8s} {s:.3f} s  ({1 / s:.2f} images/s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
