"""Write a run's chosen checkpoint as the shipped default model: fp16 safetensors with how it was trained.

    python tools/ship_model.py /work/runs/cpu-ecssd-ft/best.safetensors --run /work/runs/cpu-ecssd-ft \
        --status "..." -o pfanet/weights/pfanet_ecssd.safetensors

The metadata keeps the checkpoint's own training record (recipe, epoch, seed, data lists) and adds: the run's
validation log (every epoch's val MAE / max F from log.csv), the record of the checkpoint it was fine-tuned from
(recipe `init`), what it was selected on, and a status line. fp16 halves the file (about 33 MB); predictions upcast.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pfanet.weights import load_checkpoint, save_checkpoint


def val_log(run: pathlib.Path) -> list[dict]:
    with (run / "log.csv").open(newline="") as f:
        return [{"epoch": int(r["epoch"]), "val_mae": float(r["val_mae"]), "val_maxF": float(r["val_maxF"])}
                for r in csv.DictReader(f) if r.get("val_mae")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the chosen .safetensors of a run (e.g. its best.safetensors)")
    ap.add_argument("--run", required=True, help="the run folder (its log.csv holds the validation history)")
    ap.add_argument("--status", required=True, help="one line: where this model stands")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args(argv)

    model, spec, meta = load_checkpoint(args.checkpoint)
    training = dict(meta.get("training", {}))
    init = training.get("recipe", {}).get("init")
    if init:
        training["init_training"] = load_checkpoint(init)[2].get("training", {})
    training["val_log"] = val_log(pathlib.Path(args.run))
    training["selected_on"] = "ECSSD val.txt max F (best.safetensors)"
    training["status"] = args.status
    save_checkpoint(args.out, model, spec, training, dtype=torch.float16)
    print(f"wrote {args.out}: epoch {training.get('epoch')} of {training.get('recipe', {}).get('name')}, val "
          f"{training.get('val_scores')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
