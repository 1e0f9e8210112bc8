"""Sharded prediction under torchrun: each process predicts every WORLD_SIZE-th file of the sorted input list.

    torchrun --nproc-per-node 4 -m pfanet predict-shard photos/ -o maps/
    torchrun --nnodes 8 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m pfanet predict-shard /shared/photos -o /shared/maps --outputs map,mask

Predicting needs no communication: the rank and world size come from the environment (RANK, WORLD_SIZE and
LOCAL_RANK, which torchrun sets, or which can be set by hand for any launcher). Every rank lists the inputs itself,
in the same sorted order, so the shards are disjoint and cover everything. Outputs are written atomically and
inputs whose outputs exist are skipped, so re-running the same command resumes a crashed or pre-empted job, with
any number of processes. When torchrun has set up a rendezvous (MASTER_ADDR), a gloo process group gathers each
rank's summary and rank 0 prints the total.

The command line is `pfanet predict-shard` (see `pfanet predict-shard --help`), which calls `run`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence

import torch

from .options import PredictOptions
from .outputs import Job, Summary, collect_jobs, pending_jobs, predict_files


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's place among the workers."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Shard:
        """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (one process when they are absent)."""
        try:
            shard = cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
        except ValueError as e:
            raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({e})") from None
        if not 0 <= shard.rank < shard.world_size:
            raise ValueError(f"RANK={shard.rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={shard.world_size})")
        return shard

    def take(self, jobs: Sequence[Job]) -> list[Job]:
        """This rank's share: every world_size-th job of the list sorted by source path, starting at rank."""
        return sorted(jobs, key=lambda j: str(j.source))[self.rank :: self.world_size]


def predict_shard(shard: Shard, inputs: Sequence[str], out_dir: str | os.PathLike, make_predictor: Callable,
                  kinds: Sequence[str] = ("map",), fmt: str = "png", threshold: float | None = None,
                  overwrite: bool = False, workers: int = 4, progress: bool = True) -> Summary:
    """Predict this rank's share of `inputs` (files, folders, glob patterns) into `out_dir`.

    The model is loaded (`make_predictor()`) only when the shard has work left. Problems found while listing the
    inputs (a missing path, clashing output names) are the same on every rank and are reported by rank 0 only.
    """
    jobs, problems = collect_jobs(inputs)
    mine = shard.take(jobs)
    todo = pending_jobs(mine, pathlib.Path(out_dir), kinds, fmt, overwrite)
    summary = Summary()
    if todo:
        summary = predict_files(make_predictor(), todo, out_dir, kinds, fmt, threshold, workers, progress)
    summary.skipped = len(mine) - len(todo)
    if shard.rank == 0:
        summary.failures[:0] = problems
    return summary


def gather(summary: Summary, shard: Shard) -> Summary | None:
    """The summaries of all ranks added up, when a torchrun rendezvous lets the ranks talk; None otherwise."""
    if shard.world_size == 1:
        return summary
    if "MASTER_ADDR" not in os.environ or not torch.distributed.is_available():
        return None
    import torch.distributed as dist

    # Ranks finish at different times; the group is only formed at the end, so allow a long wait for the slowest.
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    try:
        parts: list = [None] * shard.world_size
        dist.all_gather_object(parts, dataclasses.asdict(summary))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    total = Summary()
    for part in parts:
        total.written += part["written"]
        total.skipped += part["skipped"]
        total.failures += part["failures"]
    return total


def report(summary: Summary, shard: Shard, out_dir: str | os.PathLike, whole: bool) -> None:
    """One line per rank (or the total, from rank 0), then the failures."""
    who = f"rank {shard.rank}/{shard.world_size}"
    if whole and shard.world_size > 1:
        who = f"all {shard.world_size} ranks"
    line = f"{who}: {summary.written} written to {out_dir}, {summary.skipped} skipped (outputs exist)"
    print(line + (f", {len(summary.failures)} failed:" if summary.failures else ""), file=sys.stderr)
    for failure in summary.failures:
        print(f"  {failure}", file=sys.stderr)


def run(inputs: Sequence[str], out_dir: str | os.PathLike, options: PredictOptions | None = None,
        workers: int = 4, progress: bool = True, shard: Shard | None = None) -> int:
    """Predict this process's shard and report; the exit status (1 when anything failed on any rank seen)."""
    options = options or PredictOptions()
    shard = shard or Shard.from_env()
    device = options.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{shard.local_rank % torch.cuda.device_count()}"  # one GPU per local process

    mine = predict_shard(shard, inputs, out_dir, lambda: options.predictor(device), options.kinds, options.fmt,
                         options.threshold, options.overwrite, workers,
                         progress=progress and shard.rank == 0)  # one progress bar, not world_size interleaved ones
    total = gather(mine, shard)
    if total is None:  # no rendezvous: every rank reports for itself
        report(mine, shard, out_dir, whole=False)
        return 1 if mine.failures else 0
    if shard.rank == 0:
        report(total, shard, out_dir, whole=True)
    return 1 if total.failures else 0
