"""A run's state and its checkpoints: where the run is (`RunState`), state.pt and the weights files
(`Checkpointer`), and which recipe a resumed run continues with (`recipe_for_run`).

state.pt is a file format: folders written by every earlier version must resume exactly. Its keys are only ever
added (and read with defaults), never renamed or dropped; tests/data/state_pt_format.json holds its structure.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import pathlib
import shutil
import time

import torch

from ..ema import ModelEMA
from ..io import atomic_write
from ..model import PFANet
from ..recipes import RECIPES, Recipe
from ..transforms import InputSpec
from ..weights import save_checkpoint
from .builders import epoch_seed
from .distributed import DistributedEnv

log = logging.getLogger(__name__)

# What --reschedule may change in a run under way: its length, rates and sizes, and the batch per process (so that
# a run moved from one process to several under torchrun keeps its images per step) -- not what it trains.
SCHEDULE_FIELDS = ("stages", "size", "size_schedule", "batch_size")


@dataclasses.dataclass
class RunState:
    """Where a run is: its position in the schedule, the running sums of the epoch (its log row's loss and speed
    span an interruption) and the best validation scores so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_loss: float = 0.0
    epoch_steps: int = 0
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    best: float | None = None  # best val max F (best.safetensors)
    best_mae: float | None = None  # best val MAE (best_mae.safetensors)

    def start_epoch(self) -> None:
        self.epoch_loss, self.epoch_steps, self.epoch_images, self.epoch_seconds = 0.0, 0, 0, 0.0


def read_state(out: pathlib.Path) -> dict:
    path = out / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nothing to resume (no state.pt in {out})")
    return torch.load(path, map_location="cpu", weights_only=True)


def run_seed(saved: dict | None, seed: int | None, out: pathlib.Path) -> int:
    """The run's seed: `seed` (default 0) for a new run, the run's own when resuming (states from before it was
    saved used 0); another one for a resumed run is refused."""
    if saved is None:
        return 0 if seed is None else seed
    own = int(saved.get("seed", 0))
    if seed is not None and seed != own:
        raise ValueError(f"{out}: the run was started with seed {own}, not {seed}; resume without --seed (or with "
                         "the same one)")
    return own


def saved_rng_state(state: dict, rank: int, world: int) -> torch.Tensor | None:
    """The CPU RNG state a process of `world` saved in state.pt, or None when another number of processes saved it.

    A copy: a row of the stacked states is a view at an offset into their storage, which torch.set_rng_state
    misreads ("Invalid mt19937 state", or a crash) for every rank but 0."""
    ranks = state.get("rank_torch_rng")
    if ranks is None:  # written before the per-rank states existed, by a single process
        return state["torch_rng"] if world == 1 else None
    return ranks[rank].clone() if len(ranks) == world else None


def trim_log(path: pathlib.Path, fields: tuple[str, ...], run: RunState) -> None:
    """Drop the log rows written after the checkpoint (before a crash that came ahead of the next one)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f)
                if (float(r["step"]) <= run.global_step if r.get("step") else int(r["epoch"]) <= run.epoch)]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


class Checkpointer:
    """Writes and restores what a run needs to continue exactly: the network, the optimizer, the moving average,
    the run's position and every process's RNG state in state.pt; the weights in last.safetensors and the other
    weights files of the run folder. Only rank 0 writes."""

    def __init__(self, out: pathlib.Path, recipe: Recipe, seed: int, env: DistributedEnv, model: PFANet,
                 optimizer: torch.optim.Optimizer, ema: ModelEMA | None = None):
        self.out, self.recipe, self.seed, self.env = out, recipe, seed, env
        self.model, self.optimizer, self.ema = model, optimizer, ema

    def state_dict(self, run: RunState) -> dict | None:
        """state.pt's contents on rank 0, None on the others. Every process calls it at the same step: the
        processes' RNG states are gathered so that each resumes its own."""
        rngs = self.env.gather(self.env.rng_state())
        if not self.env.main:
            return None
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": run.epoch, "step_in_epoch": run.step_in_epoch, "global_step": run.global_step,
            "torch_rng": rngs[0][0],
            "best": run.best if run.best is not None else float("nan"),
            "best_mae": run.best_mae if run.best_mae is not None else float("nan"),
            "recipe": self.recipe.to_json(),
            # Added after the first runs; restore() reads them with defaults.
            "seed": self.seed, "world": self.env.world,
            "rank_torch_rng": torch.stack([r[0] for r in rngs]),
            "epoch_loss": run.epoch_loss, "epoch_steps": run.epoch_steps, "epoch_images": run.epoch_images,
            "epoch_seconds": run.epoch_seconds,
        }
        if rngs[0][1] is not None:
            state["rank_cuda_rng"] = torch.stack([r[1] for r in rngs])
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def write(self, state: dict, weights: PFANet, spec: InputSpec, meta: dict) -> None:
        """state.pt and last.safetensors (`weights`: the network that is shipped), each written atomically."""
        atomic_write(self.out / "state.pt", lambda tmp: torch.save(state, tmp))
        self.save_weights("last.safetensors", weights, spec, meta)

    def save_weights(self, name: str, weights: PFANet, spec: InputSpec, meta: dict) -> None:
        save_checkpoint(self.out / name, weights, spec, meta)

    def restore(self, state: dict, run: RunState, reschedule: bool = False) -> None:
        """Continue from a state.pt: its recipe must be this run's (up to the schedule when rescheduling). Each
        process takes back its own RNG state; saved by another number of processes, each reseeds its dropout from
        (seed, epoch, rank, step) instead."""
        path = self.out / "state.pt"
        saved = Recipe.from_dict(json.loads(state["recipe"]))
        changed = saved.differences(self.recipe, ignore=SCHEDULE_FIELDS if reschedule else ())
        if changed:
            raise ValueError(f"{path}: the run was started with another recipe ({'; '.join(changed)}); "
                             "resume with the same settings")
        rank, world = self.env.rank, self.env.world
        if state.get("world", world) != world and state["step_in_epoch"]:
            log.warning("%s: saved mid-epoch by %d processes, resumed by %d: the rest of this epoch is shared out "
                        "differently", path, state["world"], world)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        run.epoch, run.step_in_epoch, run.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        run.best = None if math.isnan(state["best"]) else state["best"]
        best_mae = state.get("best_mae", float("nan"))  # absent from states written before it existed
        run.best_mae = None if math.isnan(best_mae) else best_mae
        run.epoch_loss = state.get("epoch_loss", 0.0)
        run.epoch_steps = state.get("epoch_steps", 0)
        run.epoch_images = state.get("epoch_images", 0)
        run.epoch_seconds = state.get("epoch_seconds", 0.0)
        rng = saved_rng_state(state, rank, world)
        if rng is not None:
            torch.set_rng_state(rng)
        else:  # saved by another number of processes: each process its own dropout draws from here on
            torch.manual_seed(epoch_seed(self.seed, run.epoch, rank, offset=run.global_step))
        if self.env.device.type == "cuda" and "rank_cuda_rng" in state and rng is not None:
            torch.cuda.set_rng_state(state["rank_cuda_rng"][rank].clone(), self.env.device)


def recipe_for_run(name: str | None, overrides: dict, out: str | os.PathLike, resume: bool,
                   reschedule: bool = False) -> Recipe:
    """The recipe a `pfanet train` invocation means: the named recipe (default cpu-duts) with the overrides applied,
    or, when resuming, the run's own recipe.json, which must come out unchanged by the overrides (so that the run
    continues exactly as it was started).

    With `reschedule` a resumed run takes a new schedule (SCHEDULE_FIELDS) from its current position on: its own
    recipe's with the overrides applied (e.g. --epochs), or, when a recipe is named, that recipe's as the package
    now defines it. The learning rate, alpha and input size are functions of the position, so the run carries on
    along the new curves. Anything else that would change is refused. The replaced recipe.json is kept beside it."""
    if reschedule and not resume:
        raise ValueError("--reschedule changes the schedule of a run being resumed: use it with --resume")
    if not resume:
        return RECIPES[name or "cpu-duts"].override(**overrides)
    path = pathlib.Path(out) / "recipe.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nothing to resume (no recipe.json in {out})")
    saved = Recipe.from_dict(json.loads(path.read_text()))
    if name and name != saved.name:
        raise ValueError(f"{out} is a run of recipe {saved.name!r}, not {name!r}")
    if not reschedule:
        changed = saved.differences(saved.override(**overrides))
        if changed:
            raise ValueError(f"--resume continues {out} as it was started; these options would change its recipe: "
                             + "; ".join(changed) + " (--reschedule allows changes to " + ", ".join(SCHEDULE_FIELDS)
                             + ")")
        return saved
    target = (RECIPES[name] if name else saved).override(**overrides)
    rescheduled = dataclasses.replace(saved, **{f: getattr(target, f) for f in SCHEDULE_FIELDS},
                                      description=target.description)
    refused = rescheduled.differences(target)  # the schedule is target's already: what is left would change the run
    if refused:
        raise ValueError(f"--reschedule changes only {', '.join(SCHEDULE_FIELDS)}; {out} differs from the new "
                         "recipe in: " + "; ".join(refused))
    changed = saved.differences(rescheduled)
    if changed and os.environ.get("RANK", "0") == "0":  # under torchrun every process gets here: one copy, one warning
        kept = path.with_name(f"recipe.{time.strftime('%Y%m%d-%H%M%S')}.json")
        shutil.copyfile(path, kept)
        log.warning("%s rescheduled (old recipe kept as %s): %s", out, kept.name, "; ".join(changed))
    return rescheduled
