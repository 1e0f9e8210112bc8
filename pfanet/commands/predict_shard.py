"""`pfanet predict-shard`: `predict` for one of several torchrun processes (`pfanet.distributed_predict`)."""

from __future__ import annotations

import argparse

from .common import add_prediction_options, predict_options


def add(sub) -> None:
    p = sub.add_parser(
        "predict-shard", help="`predict` split over torchrun processes (several GPUs or machines, shared storage)",
        description="Like `pfanet predict`, for one of several processes started by torchrun (or with RANK and "
                    "WORLD_SIZE set by hand): each takes every WORLD_SIZE-th file of the sorted inputs. Existing "
                    "outputs are skipped, so re-running resumes; rank 0 prints the total.",
        epilog="examples:\n"
               "  torchrun --nproc-per-node 4 -m pfanet predict-shard photos/ -o maps/\n"
               "  torchrun --nnodes 8 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\\n"
               "      --no-python pfanet predict-shard /shared/photos -o /shared/maps",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, folders, glob patterns")
    p.add_argument("-o", "--out", metavar="DIR", required=True, help="output folder (shared by all ranks)")
    add_prediction_options(p)
    p.add_argument("--workers", type=int, default=4, help="decoding threads per process (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (rank 0 shows one)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..distributed_predict import run as run_shard

    return run_shard(args.inputs, args.out, predict_options(args), args.workers, progress=not args.no_progress)
