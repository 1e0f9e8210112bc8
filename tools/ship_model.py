"""Write a run's chosen checkpoint as the shipped default model: fp16 safetensors with how it was trained.

    python tools/ship_model.py /work/runs/cpu-duts/best.safetensors --run /work/runs/cpu-duts \
        --status "..." -o pfanet/weights/pfanet_duts.safetensors

`--size` and `--precise-bn N` apply what tools/select_model.py chose: the input size the model predicts at, and its
BatchNorm statistics re-estimated on N evenly spaced DUTS-TR train images at that size (pfanet.precise_bn).

The metadata keeps the checkpoint's own training record (recipe, epoch, seed, data lists) and adds: the run's
validation log (every epoch's val MAE / max F from log.csv), the record of the checkpoint it was fine-tuned from
(recipe `init`), what it was selected on, and a status line. fp16 halves the file (about 33 MB); predictions upcast.

It then writes the model's INT8 graph beside it (OUT with .int8.onnx: `pfanet.runtime.int8_path`), which
`--backend auto` runs on CPUs with VNNI or AMX: the fp32 export of the file just written, checked against PyTorch,
statically quantised (`pfanet.export.quantize_onnx`), calibrated on the first --calibration-count images of
--calibration (DUTS-TR train by default; never test images), with the SHA-256 of OUT in its metadata so that a graph
left beside other weights is never used. --no-int8 skips it; for a file already shipped, --int8-only writes just
its graph:

    python tools/ship_model.py --int8-only pfanet/weights/pfanet_duts.safetensors
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pfanet.weights import load_checkpoint, save_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
CALIBRATION = REPO.parent / "shared" / "data" / "duts-tr" / "train.txt"


def val_log(run: pathlib.Path) -> list[dict]:
    """Every validated row of the run's log.csv: position (epoch, images seen) and each source's MAE / max F."""
    with (run / "log.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_mae")]
    wanted = [k for k in (rows[0] if rows else {}) if k in ("epoch", "images") or k.endswith(("_mae", "_maxF"))]
    return [{k: float(r[k]) for k in wanted if r.get(k)} for r in rows]


def write_int8(weights: pathlib.Path, calibration: pathlib.Path, count: int) -> pathlib.Path:
    """The INT8 graph of `weights`, beside them; its fp32 source is checked against PyTorch first."""
    from pfanet.export import calibration_images, export_onnx, plan_export, quantize_onnx
    from pfanet.predictor import Predictor
    from pfanet.runtime import ParityError, check_parity, int8_path

    if "test" in calibration.name:
        raise SystemExit(f"{calibration}: calibrate on training images, never on a test list")
    images = calibration_images(calibration, count)
    fp32_model = Predictor(weights, device="cpu", backend="torch")  # its meta carries the file's SHA-256
    plan = plan_export(fp32_model.model, fp32_model.spec)
    with tempfile.TemporaryDirectory(prefix="ship-int8-") as tmp:
        fp32 = export_onnx(plan, pathlib.Path(tmp) / "fp32.onnx", fp32_model.meta)
        try:
            check_parity(plan, fp32, name="the fp32 export")
        except ParityError as e:
            raise SystemExit(str(e)) from None
        out = quantize_onnx(fp32, int8_path(weights), images)
    out.chmod(0o644)  # a package file, readable by all whatever the umask
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): INT8 of {weights.name} (SHA-256 "
          f"{fp32_model.meta['weights_sha256'][:16]}...), calibrated on {len(images)} images of {calibration}",
          file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the chosen .safetensors of a run (e.g. its best.safetensors)")
    ap.add_argument("--run", help="the run folder (its log.csv holds the validation history)")
    ap.add_argument("--status", help="one line: where this model stands")
    ap.add_argument("--selected-on", default="max F on the run's first validation source (best.safetensors)",
                    help="how the checkpoint was chosen (stored in the metadata)")
    ap.add_argument("-o", "--out")
    ap.add_argument("--size", type=int, help="the input size to predict at (default: the checkpoint's)")
    ap.add_argument("--precise-bn", type=int, default=0, metavar="N",
                    help="re-estimate BatchNorm statistics on N DUTS-TR train images at that size (default 0: no)")
    ap.add_argument("--calibration", type=pathlib.Path, default=CALIBRATION,
                    help=f"INT8 calibration images: a training list file or folder (default {CALIBRATION})")
    ap.add_argument("--calibration-count", type=int, default=32, help="the first N of them (default 32)")
    ap.add_argument("--no-int8", action="store_true", help="do not write the INT8 graph")
    ap.add_argument("--int8-only", action="store_true", help="CHECKPOINT is a shipped file: write only its INT8 graph")
    args = ap.parse_args(argv)
    if args.int8_only:
        write_int8(pathlib.Path(args.checkpoint), args.calibration, args.calibration_count)
        return 0
    if not (args.run and args.status and args.out):
        ap.error("--run, --status and -o are required (unless --int8-only)")

    model, spec, meta = load_checkpoint(args.checkpoint)
    training = dict(meta.get("training", {}))
    if args.size:
        spec = dataclasses.replace(spec, size=args.size)
    if args.precise_bn:
        from select_model import bn_pairs  # the one definition of which training images precise BN uses

        from pfanet.precise_bn import recompute_bn_statistics

        recompute_bn_statistics(model, spec, bn_pairs(args.precise_bn))
    training["inference"] = {"size": spec.size, "precise_bn_images": args.precise_bn}
    init = training.get("recipe", {}).get("init")
    if init:
        training["init_training"] = load_checkpoint(init)[2].get("training", {})
    training["val_log"] = val_log(pathlib.Path(args.run))
    training["selected_on"] = args.selected_on
    training["status"] = args.status
    save_checkpoint(args.out, model, spec, training, dtype=torch.float16)
    pathlib.Path(args.out).chmod(0o644)  # a package file, readable by all whatever the umask
    print(f"wrote {args.out}: epoch {training.get('epoch')} of {training.get('recipe', {}).get('name')}, val "
          f"{training.get('val_scores')}", file=sys.stderr)
    if not args.no_int8:
        write_int8(pathlib.Path(args.out), args.calibration, args.calibration_count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
