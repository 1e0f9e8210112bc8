"""Accuracy of every inference path on ECSSD val: the same images through `Predictor` with each path's network,
scored against the ground truth (MAE, max F; pysodmetrics through `pfanet.evaluate`) and compared map by map with
eager fp32 (max and mean |difference| in gray levels, the 99th percentile of the pixels' |difference|, and the share
of pixels within 1 and 2 levels).

    python benchmarks/paths_accuracy.py --json benchmarks/results/paths_accuracy.json        # all 100 val images
    python benchmarks/paths_accuracy.py --limit 8 --paths eager,ort,int8                      # development
    python benchmarks/paths_accuracy.py --paths int8-shipped --pairs ../shared/data/duts-tr/val.txt --limit 200

The paths are built exactly as benchmarks/perf.py times them (eager, channels_last, torch.compile, ONNX Runtime
fp32, INT8 and its variants), the INT8 ones calibrated on ECSSD train images. Maps come out at each image's own size,
as `pfanet predict` writes them. Only val.txt is read (never test.txt).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from perf import DEFAULT_PATHS, ECSSD, PATHS, build_paths

from pfanet.data import read_list_file
from pfanet.evaluate import SODMetrics, fit_to_mask
from pfanet.export import calibration_images
from pfanet.io import load_image, load_mask
from pfanet.predictor import DEFAULT_WEIGHTS, Predictor
from pfanet.runtime import file_sha256
from pfanet.weights import load_checkpoint


def path_maps(predictor: Predictor, images: list[np.ndarray], name: str) -> list[np.ndarray]:
    """Maps of all images, a batch at a time."""
    out = []
    for start in tqdm(range(0, len(images), predictor.batch_size), desc=name, leave=False):
        out.extend(predictor.predict_rgb(images[start : start + predictor.batch_size]))
    return out


def score(maps: list[np.ndarray], masks: list[np.ndarray], reference: list[np.ndarray] | None) -> dict:
    """MAE and max F against the masks; max / mean |difference| to the reference maps (gray levels)."""
    metrics = SODMetrics(("mae", "fm"))
    for m, gt in zip(maps, masks):
        metrics.step(m if m.shape == gt.shape else fit_to_mask(m, gt), gt)
    r = metrics.results().metrics
    row = {"mae": r["mae"], "maxF": r["maxF"], "n": len(maps)}
    if reference is not None:
        diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(maps, reference)]
        pixels = np.concatenate([d.ravel() for d in diffs])
        row.update(max_abs_diff=int(max(d.max() for d in diffs)), mean_abs_diff=float(np.mean([d.mean()
                                                                                              for d in diffs])),
                   p99_abs_diff=float(np.percentile(pixels, 99)), within_1=float((pixels <= 1).mean()),
                   within_2=float((pixels <= 2).mean()))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", default=",".join(p for p in DEFAULT_PATHS if p != "u2netp"),
                    help=f"from {','.join(p for p in PATHS if p != 'u2netp')}; eager always runs (the reference)")
    ap.add_argument("--weights", help="PFANet weights (default: the shipped model)")
    ap.add_argument("--size", type=int, help="network input size (default: the weights' own, as `pfanet predict`)")
    ap.add_argument("--data", default=str(ECSSD), help="ECSSD folder (val.txt; train.txt for calibration)")
    ap.add_argument("--pairs", help="the list file scored (default: DATA/val.txt), e.g. DUTS-TR's val.txt; never a "
                                    "test list")
    ap.add_argument("--limit", type=int, help="first N val images only (development)")
    ap.add_argument("--calibration-count", type=int, default=32, help="INT8 calibration images from train.txt")
    ap.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    data = pathlib.Path(args.data)
    weights = pathlib.Path(args.weights) if args.weights else DEFAULT_WEIGHTS
    _, spec, _ = load_checkpoint(weights)
    spec = dataclasses.replace(spec, size=args.size or spec.size)
    names = ["eager"] + [p for p in args.paths.split(",") if p and p != "eager"]
    if set(names) - set(PATHS) or "u2netp" in names:
        ap.error(f"unknown paths: {', '.join(sorted(set(names) - set(PATHS)) or ['u2netp'])}")

    listing = pathlib.Path(args.pairs) if args.pairs else data / "val.txt"
    if "test" in listing.name:
        ap.error(f"{listing}: not on test images")
    pairs = read_list_file(listing)[: args.limit]
    images = [load_image(img) for img, _ in tqdm(pairs, desc="decoding", leave=False)]
    masks = [load_mask(mask) for _, mask in pairs]
    calib = calibration_images(data / "train.txt", args.calibration_count)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="pfanet-paths-") as tmp:
        paths = build_paths(names, weights, spec.size, pathlib.Path(tmp), args.threads, calib)
        reference = None
        for name, net in paths.items():
            if isinstance(net, str):
                rows[name] = {"error": net}
                continue
            predictor = Predictor(model=net, spec=spec, device="cpu", batch_size=args.batch_size)
            try:
                maps = path_maps(predictor, images, name)
            except Exception as e:  # noqa: BLE001  (e.g. torch.compile failing at its first call: reported)
                rows[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
                continue
            rows[name] = score(maps, masks, reference)
            if reference is None:  # eager comes first
                reference = maps

    eager = rows["eager"]
    print(f"{listing}, {len(pairs)} images, network input {spec.size}x{spec.size}, maps at each image's size")
    print(f"{'path':16s} {'MAE':>7s} {'max F':>7s} {'dMAE':>8s} {'dmaxF':>8s} {'max|d|':>7s} {'mean|d|':>8s} "
          f"{'p99|d|':>7s} {'<=1':>7s} {'<=2':>7s}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:16s} n/a: {r['error']}")
            continue
        d = (f"{r['mae'] - eager['mae']:+8.4f} {r['maxF'] - eager['maxF']:+8.4f} {r.get('max_abs_diff', 0):7d} "
             f"{r.get('mean_abs_diff', 0.0):8.3f} {r.get('p99_abs_diff', 0.0):7.1f} {r.get('within_1', 1.0):7.2%} "
             f"{r.get('within_2', 1.0):7.2%}")
        print(f"{name:16s} {r['mae']:7.4f} {r['maxF']:7.4f} {d}")
    if args.json:
        out = pathlib.Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": " ".join(sys.argv), "weights": str(weights),
                                   "weights_sha256": file_sha256(weights), "size": spec.size,
                                   "pairs": str(listing), "images": len(pairs), "calibration_images": len(calib),
                                   "paths": rows},
                                  indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
