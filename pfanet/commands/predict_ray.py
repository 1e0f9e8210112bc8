"""`pfanet predict-ray`: `predict` on a Ray cluster with Ray Data (`pfanet.ray_predict`)."""

from __future__ import annotations

import argparse
import sys

from .common import add_prediction_options, fail, missing_extra, predict_options


def add(sub) -> None:
    p = sub.add_parser(
        "predict-ray", help="`predict` on a Ray cluster with Ray Data (needs pfanet[ray])",
        description="Predict every image under a folder or URI (s3://, gs://, ...) with Ray Data: map_batches with "
                    "one model per actor. Outputs mirror the input's subfolders; existing ones are skipped.",
        epilog="examples:\n"
               "  pfanet predict-ray --input photos/ --output maps/\n"
               "  pfanet predict-ray --input s3://b/photos --output s3://b/maps --address auto --concurrency 8 "
               "--num-gpus 1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, metavar="DIR_OR_URI", help="folder or URI of images (recursive)")
    p.add_argument("--output", required=True, metavar="DIR_OR_URI", help="where the outputs go")
    add_prediction_options(p, batch_size=8)
    p.add_argument("--concurrency", type=int, default=1, help="model actors (default 1)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (default 0)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    p.add_argument("--address", help="Ray cluster to join ('auto': this machine's; default: start a local one)")
    p.set_defaults(func=run)


def run(args) -> int:
    if missing := missing_extra("ray"):
        return fail(args, missing)
    from ..ray_predict import run as run_ray

    written, skipped, failures = run_ray(args.input, args.output, predict_options(args), args.concurrency,
                                         args.num_gpus, args.address, args.num_cpus)
    print(f"{written} written to {args.output}, {skipped} skipped (outputs exist)"
          + (f", {len(failures)} failed:" if failures else ""), file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return 1 if failures else 0
