"""MAE and max F of weights files on the default-model guard's DUTS-TR val pairs (tests/test_default_model.py: 24
evenly spaced pairs of val.txt), each model at its own input size, PyTorch fp32: the figures the guard's thresholds
sit between.

    python tools/guard_figures.py pfanet/weights/pfanet_duts.safetensors OLD.safetensors
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pfanet.data import read_pairs
from pfanet.evaluate import score_pairs
from pfanet.predictor import Predictor
from pfanet.train import evenly_spaced

DUTS_VAL = REPO.parent / "shared" / "data" / "duts-tr" / "val.txt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", nargs="+")
    ap.add_argument("--pairs", type=int, default=24, help="evenly spaced DUTS-TR val pairs (the guard's: 24)")
    args = ap.parse_args(argv)
    pairs = evenly_spaced(read_pairs(DUTS_VAL), args.pairs)
    for w in args.weights:
        s = score_pairs(Predictor(w, device="cpu", batch_size=4, backend="torch"), pairs)
        print(f"{w}: MAE {s['mae']:.4f} max F {s['maxF']:.4f} (n {s['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
