"""Peak RSS predicting one 6000x4000 photo with a given backend (VmHWM of this process).

    python benchmarks/peak_rss.py auto --json benchmarks/results/peak_rss.json    # `pfanet predict`'s path
    python benchmarks/peak_rss.py torch --json benchmarks/results/peak_rss.json

The photo is a smooth synthetic JPEG (a random 600x400 image upscaled), written to /tmp once per run. The first
`auto` run on a machine also exports the ONNX graph (cached afterwards), which raises its peak; that run is recorded
under the key `<backend>_first_run`. `--json` adds this run's result to the file under that key (one process per
measurement: the peak is the process's own).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
from PIL import Image

from pfanet.predictor import Predictor
from pfanet.runtime import onnx_cache_dir


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backend", nargs="?", default="auto", help="auto (default), torch or onnxruntime")
    ap.add_argument("--json", metavar="FILE", help="add the result to FILE (JSON object keyed by backend)")
    args = ap.parse_args(argv)
    path = "/tmp/photo_6000x4000.jpg"
    small = np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8)
    Image.fromarray(small).resize((6000, 4000), Image.BILINEAR).save(path, quality=90)
    cached = set(onnx_cache_dir().glob("*.onnx"))
    predictor = Predictor(backend=args.backend)
    exported = set(onnx_cache_dir().glob("*.onnx")) != cached
    predictor.predict(np.zeros((64, 64, 3), np.uint8))  # warm-up
    after_load, start = peak_mib(), time.perf_counter()
    saliency = predictor.predict(path)
    result = {"backend": predictor.backend, "exported_the_graph": exported, "map_shape": list(saliency.shape),
              "peak_rss_mib": round(peak_mib(), 1), "after_load_mib": round(after_load, 1),
              "seconds": round(time.perf_counter() - start, 2)}
    print(f"backend {predictor.backend}: map {saliency.shape}, peak RSS {result['peak_rss_mib']:.0f} MiB (after "
          f"loading and a warm-up {after_load:.0f} MiB), {result['seconds']:.1f} s"
          + (" (this run exported the graph)" if exported else ""))
    if args.json:
        out = pathlib.Path(args.json)
        results = json.loads(out.read_text()) if out.is_file() else {}
        results[args.backend + ("_first_run" if exported else "")] = result
        out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
