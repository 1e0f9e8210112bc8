"""Peak RSS predicting one 6000x4000 photo with a given backend (VmHWM of this process).

    python benchmarks/peak_rss.py auto     # what `pfanet predict` runs (onnxruntime on the CPU)
    python benchmarks/peak_rss.py torch

The photo is a smooth synthetic JPEG (a random 600x400 image upscaled), written to /tmp once per run. The first
`auto` run on a machine also exports the ONNX graph (cached afterwards), which raises its peak.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from PIL import Image

from pfanet.predictor import Predictor


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main(backend: str) -> None:
    path = "/tmp/photo_6000x4000.jpg"
    small = np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8)
    Image.fromarray(small).resize((6000, 4000), Image.BILINEAR).save(path, quality=90)
    predictor = Predictor(backend=backend)
    predictor.predict(np.zeros((64, 64, 3), np.uint8))  # warm-up
    after_load, start = peak_mib(), time.perf_counter()
    saliency = predictor.predict(path)
    print(f"backend {predictor.backend}: map {saliency.shape}, peak RSS {peak_mib():.0f} MiB (after loading and a "
          f"warm-up {after_load:.0f} MiB), {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "auto")
