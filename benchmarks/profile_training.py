"""Where a training step's time goes: torch.profiler over one optimizer step (eager NCHW or channels_last), batch 8,
the cpu-ecssd-ft recipe (VGG blocks 1-3 frozen) at 192x192, top operators by self CPU time.

    python benchmarks/profile_training.py                    # eager NCHW
    python benchmarks/profile_training.py --channels-last

One warm-up step, then one profiled step, on the first 8 ECSSD train images. The shares are what matter: absolute
times depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import pathlib

from torch.profiler import ProfilerActivity, profile

from pfanet.data import collate, read_pairs
from pfanet.recipes import RECIPES
from pfanet.training import TrainStep, build_model, make_optimizer, training_dataset

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "ecssd"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    recipe = RECIPES["cpu-ecssd-ft"].override(size=args.size)
    model, spec = build_model(recipe, channels_last=args.channels_last)  # from the HED backbone, as the recipe
    model.train()
    step = TrainStep(model, make_optimizer(model, recipe), recipe, channels_last=args.channels_last)
    dataset = training_dataset(read_pairs(DATA / "train.txt")[: recipe.batch_size], recipe, spec)
    x, y, _ = collate([dataset[i] for i in range(recipe.batch_size)])
    step(x, y, 1.0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(x, y, 1.0)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"one training step, batch {recipe.batch_size}, {args.size}x{args.size}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}: {total / 1e6:.2f} s of self CPU time")
    print("| operator | s | share | calls |\n|---|---:|---:|---:|")
    for e in events[: args.top]:
        print(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | {100 * e.self_cpu_time_total / total:.1f} % | "
              f"{e.count} |")


if __name__ == "__main__":
    main()
