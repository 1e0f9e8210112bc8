"""Training: recipes, resumable checkpoints, validation, logs; one process or several under torchrun.

A run folder holds:
    recipe.json            the recipe, as run
    state.pt               weights + optimizer + schedule position + RNG states (tensors and numbers only, read
                           with weights_only=True), written atomically every epoch, every `save_steps` steps, at
                           the end and on SIGINT/SIGTERM
    last.safetensors       the latest weights in our format; best.safetensors the best on validation (max F)
                           (with a recipe `ema`, these and the epoch files hold the moving average, which is what
                           is validated; state.pt keeps both)
    epoch_NNNN.safetensors every `save_every` epochs
    log.csv, tb/           per-epoch CSV log and TensorBoard events

Reproducibility: the epoch's sample order comes from (seed, epoch), each sample's augmentation from (seed, epoch,
index) and dropout from a generator seeded with (seed, epoch, rank) and saved mid-epoch, so a run that is stopped and
resumed ends with exactly the weights of one that was not.

Under torchrun every process takes every world-th sample of the epoch's order and runs `batch_size` of them per step;
DistributedDataParallel averages the gradients, so N processes at batch b compute what one process at batch N x b
does. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import threading
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from .data import Augment, SaliencyDataset, collate, dataset_name, read_pairs
from .ema import ModelEMA
from .loss import activity_regulariser, training_loss
from .model import PFANet, PFANetConfig
from .recipes import Recipe
from .transforms import InputSpec
from .weights import atomic_write, load_backbone, load_checkpoint, load_state, save_checkpoint

log = logging.getLogger(__name__)

# log.csv: one row per epoch end and per mid-epoch validation (`val_steps`); "epoch" is the run's position in
# epochs (3.5 = half-way through the 4th), "step" and "images" count from the start of the run. val_* scores the
# first validation source (it picks best.safetensors); each further source adds NAME_mae, NAME_maxF columns.
LOG_FIELDS = ("epoch", "step", "images", "loss", "lr", "alpha", "size", "images_per_s", "val_mae", "val_maxF")


class TrainingStopped(RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainOptions:
    """What a run needs beyond the recipe: data, output, and the mechanics (none of which changes the result)."""

    train: list[str]
    out: str
    val: list[str] = dataclasses.field(default_factory=list)
    val_every: int = 1
    val_steps: int = 0  # also validate every N steps within an epoch (0: at epoch ends only)
    val_limit: int | None = None  # validate on N evenly spaced pairs of each source (None: all)
    save_every: int = 5
    save_steps: int = 0  # also write state.pt every N steps within an epoch (0: only at epoch ends)
    resume: bool = False
    reschedule: bool = False  # on resume, the recipe may differ from the state's in SCHEDULE_FIELDS (recipe_for_run)
    seed: int | None = None  # None: 0 for a new run, the run's own when resuming
    workers: int = 2
    cache: bool = False
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in this process
    max_minutes: float | None = None  # stop (with a checkpoint) after this much training time in this process
    device: str | None = None
    compile: bool = False
    channels_last: bool | None = None  # default: on a GPU
    bf16: bool | None = None  # autocast; default: on a GPU
    limit: int | None = None  # use only the first N training pairs
    progress: bool = True
    collective_timeout: float = 7200.0  # seconds a rank waits in a collective (the others wait while rank 0 validates)


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of the epoch's permutation (every world-th index), from a given position onwards.

    The permutation comes from (seed, epoch) alone, so a run resumed mid-epoch sees exactly the batches an
    uninterrupted one would. The remainder of n / world is dropped so that ranks run the same number of steps.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        return perm[self.rank : self.n - self.n % self.world : self.world]

    def __iter__(self):
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self.order()) - self.start)


def _worker_init(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops at the end of the step with a
    checkpoint (a Ctrl-C reaches the whole process group; a worker dying of it would fail the run instead)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def freeze_blocks(model: PFANet, n: int) -> None:
    """Keep the convolutions of VGG blocks 1..n fixed."""
    for name, conv in model.backbone.convs.items():
        if int(name[4]) <= n:  # "conv3_1" -> block 3
            conv.requires_grad_(False)


@torch.inference_mode()
def validate(model: PFANet, spec: InputSpec, pairs, device) -> dict[str, float]:
    """MAE and max F (pysodmetrics) of the model on validation pairs, maps at the mask's size."""
    from .evaluate import score_pairs  # evaluation owns the metrics
    from .predictor import Predictor

    was_training = model.training
    predictor = Predictor(model=model, spec=spec, device=str(device))
    try:
        return score_pairs(predictor, pairs, metrics=("mae", "maxF"))
    finally:
        model.train(was_training)


class Trainer:
    """One training run (one process of it under torchrun). `run()` trains to the end of the recipe, or until
    `max_steps` or a signal, and can be called again on a new Trainer with `resume=True` to continue."""

    def __init__(self, recipe: Recipe, opts: TrainOptions):
        self.recipe, self.opts = recipe, opts
        self.out = pathlib.Path(opts.out)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if opts.device:
            self.device = torch.device(opts.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            self.device = torch.device("cpu")
        self.own_group = False
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=opts.collective_timeout))
            self.own_group = True
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.main = self.rank == 0
        gpu = self.device.type == "cuda"
        self.channels_last = gpu if opts.channels_last is None else opts.channels_last
        self.bf16 = gpu if opts.bf16 is None else opts.bf16
        self.stopped_by: int | None = None  # the signal that stopped the run
        self.old_handlers: dict = {}

        self.state = self.read_state() if opts.resume else None
        self.seed = self.run_seed()

        torch.manual_seed(self.seed)
        self.model = PFANet(PFANetConfig(dropout=recipe.dropout, norm=recipe.norm))
        if recipe.init:  # fine-tuning: every layer from a PFANet file, with the input convention it was trained on
            start, spec, _ = load_checkpoint(recipe.init)
            # the file's network (e.g. the PyTorch port's 3x3 C345 conv, eps 1e-5) with the recipe's dropout and norm
            self.model = PFANet(dataclasses.replace(start.config, dropout=recipe.dropout, norm=recipe.norm))
            load_state(self.model, start.state_dict(), recipe.init)
        else:
            spec = load_backbone(self.model, recipe.backbone)
        self.spec = dataclasses.replace(spec, size=recipe.size_at(0))
        freeze_blocks(self.model, recipe.freeze_blocks)
        for m in self.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = recipe.bn_momentum
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, recipe)
        self.ema = ModelEMA(self.model, recipe.ema) if recipe.ema else None
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if gpu else None)
        if opts.compile:
            self.net = torch.compile(self.net)

        pairs = [p for source in opts.train for p in read_pairs(source)]
        if opts.limit:
            pairs = pairs[: opts.limit]
        augment = Augment(saturation=(0.5, 1.5) if recipe.saturation else None) if recipe.augment else None
        self.dataset = SaliencyDataset(pairs, self.spec, augment, seed=self.seed, cache=opts.cache,
                                       targets=recipe.targets, target_resize=recipe.target_resize)
        if opts.cache:  # before the DataLoader forks its workers, so that they share one copy
            self.dataset.preload(threads=max(1, opts.workers), progress=self.main and opts.progress)
        self.sampler = EpochSampler(len(pairs), self.seed, self.rank, self.world)
        if self.steps_per_epoch() == 0:
            raise ValueError(f"{len(pairs)} training pairs on {self.world} process(es) do not fill one batch of "
                             f"{recipe.batch_size}")
        self.val_sets = {dataset_name(source): evenly_spaced(read_pairs(source), opts.val_limit) for source in opts.val}
        extra = [f"{name}_{m}" for name in list(self.val_sets)[1:] for m in ("mae", "maxF")]
        self.log_fields = LOG_FIELDS + tuple(extra)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.epoch_loss, self.epoch_steps, self.epoch_images, self.epoch_seconds = 0.0, 0, 0, 0.0
        self.best: float | None = None  # best val max F (best.safetensors)
        self.best_mae: float | None = None  # best val MAE (best_mae.safetensors)
        self.bad_pairs: set[str] = set()
        if self.state is not None:
            self.load_state(self.state)

    # ---- checkpoints ------------------------------------------------------------------------------------------------

    def read_state(self) -> dict:
        path = self.out / "state.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: nothing to resume (no state.pt in {self.out})")
        return torch.load(path, map_location="cpu", weights_only=True)

    def run_seed(self) -> int:
        """The seed: the run's own when resuming (states from before it was saved used 0)."""
        if self.state is None:
            return 0 if self.opts.seed is None else self.opts.seed
        saved = int(self.state.get("seed", 0))
        if self.opts.seed is not None and self.opts.seed != saved:
            raise ValueError(f"{self.out}: the run was started with seed {saved}, not {self.opts.seed}; resume "
                             "without --seed (or with the same one)")
        return saved

    def training_meta(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "epoch": self.epoch, "step": self.global_step,
                "images_seen": self.global_step * self.recipe.batch_size * self.world, "seed": self.seed,
                "train": [str(t) for t in self.opts.train], "val": [str(v) for v in self.opts.val]}

    def rng_states(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This process's (CPU, GPU) generator states: dropout draws from the one on the model's device."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def save_state(self) -> None:
        """state.pt (resumable) and last.safetensors, both written atomically by rank 0.

        Called by every rank at the same step: the ranks' RNG states are gathered so that each resumes its own.
        """
        rngs = [self.rng_states()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, self.rng_states())
        if not self.main:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "torch_rng": rngs[0][0],
            "best": self.best if self.best is not None else float("nan"),
            "best_mae": self.best_mae if self.best_mae is not None else float("nan"),
            "recipe": self.recipe.to_json(),
            # Added after the first runs; load_state reads them with defaults.
            "seed": self.seed, "world": self.world,
            "rank_torch_rng": torch.stack([r[0] for r in rngs]),
            "epoch_loss": self.epoch_loss, "epoch_steps": self.epoch_steps, "epoch_images": self.epoch_images,
            "epoch_seconds": self.epoch_seconds,
        }
        if rngs[0][1] is not None:
            state["rank_cuda_rng"] = torch.stack([r[1] for r in rngs])
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        atomic_write(self.out / "state.pt", lambda tmp: torch.save(state, tmp))
        save_checkpoint(self.out / "last.safetensors", self.evaluated, self.spec, self.training_meta())

    @property
    def evaluated(self) -> PFANet:
        """The network that is validated and written to the weights files: the moving average, if the recipe keeps
        one, else the trained weights."""
        return self.model if self.ema is None else self.ema.module

    def load_state(self, state: dict) -> None:
        path = self.out / "state.pt"
        saved = Recipe.from_dict(json.loads(state["recipe"]))
        changed = saved.differences(self.recipe, ignore=SCHEDULE_FIELDS if self.opts.reschedule else ())
        if changed:
            raise ValueError(f"{path}: the run was started with another recipe ({'; '.join(changed)}); "
                             "resume with the same settings")
        if state.get("world", self.world) != self.world and state["step_in_epoch"]:
            log.warning("%s: saved mid-epoch by %d processes, resumed by %d: the rest of this epoch is shared out "
                        "differently", path, state["world"], self.world)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.best = None if math.isnan(state["best"]) else state["best"]
        best_mae = state.get("best_mae", float("nan"))  # absent from states written before it existed
        self.best_mae = None if math.isnan(best_mae) else best_mae
        self.epoch_loss = state.get("epoch_loss", 0.0)
        self.epoch_steps = state.get("epoch_steps", 0)
        self.epoch_images = state.get("epoch_images", 0)
        self.epoch_seconds = state.get("epoch_seconds", 0.0)
        rng = saved_rng_state(state, self.rank, self.world)
        if rng is not None:
            torch.set_rng_state(rng)
        else:  # saved by another number of processes: each process its own dropout draws from here on
            self.seed_dropout(self.global_step)
        if self.device.type == "cuda" and "rank_cuda_rng" in state and rng is not None:
            torch.cuda.set_rng_state(state["rank_cuda_rng"][self.rank].clone(), self.device)
        if self.main:
            self.trim_log()

    def seed_dropout(self, offset: int = 0) -> None:
        """Seed the global generator (dropout's) from (seed, epoch, rank), and `offset` when resuming mid-epoch."""
        torch.manual_seed(self.seed * 100_003 + self.epoch + self.rank * 1_000_003 + offset)

    def trim_log(self) -> None:
        """Drop log rows written after the checkpoint (before a crash that came ahead of the next one)."""
        path = self.out / "log.csv"
        if not path.is_file():
            return
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f)
                    if (float(r["step"]) <= self.global_step if r.get("step") else int(r["epoch"]) <= self.epoch)]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.log_fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    # ---- several processes ------------------------------------------------------------------------------------------

    def sum_over_ranks(self, *values: float) -> list[float]:
        """The sums of `values` over all processes (the values themselves in a single process)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                         device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # ---- the loop ---------------------------------------------------------------------------------------------------

    def steps_per_epoch(self) -> int:
        return len(self.sampler.order()) // self.recipe.batch_size

    def loader(self) -> torch.utils.data.DataLoader:
        self.dataset.set_epoch(self.epoch, self.spec.size)
        self.sampler.set_position(self.epoch, self.step_in_epoch * self.recipe.batch_size)
        # Its own generator: without one, each new iterator draws from the global RNG that dropout uses.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.recipe.batch_size, sampler=self.sampler, collate_fn=collate,
            num_workers=self.opts.workers, drop_last=True, pin_memory=self.device.type == "cuda",
            worker_init_fn=_worker_init, generator=generator,
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            logits = self.net(x)
        loss = training_loss(logits.float(), y, alpha, self.recipe.iou, self.recipe.edge_mode)
        if self.recipe.ca_regulariser:
            loss = loss + activity_regulariser(self.model.channel_attention_weights())
        return loss

    def train_step(self, x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[float, int]:
        """One optimizer step; returns the loss (the mean over processes) and the number of images (all processes).
        A NaN/Inf loss on any process stops the run on all of them before the weights change."""
        loss = self.loss(x, y, alpha)
        total, images = self.sum_over_ranks(loss.item(), len(x))
        value = total / self.world
        if not math.isfinite(value):
            raise TrainingStopped(
                f"the loss became {value} at epoch {self.epoch + 1} step {self.step_in_epoch + 1}; stopped without "
                f"saving, so {self.out / 'state.pt'} is still the last good checkpoint (try a lower --lr)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return value, int(images)

    def handle_signal(self, signum, frame) -> None:
        self.stopped_by = signum
        log.warning("signal %d: stopping after this step with a checkpoint (a second one stops at once)", signum)
        for s, h in self.old_handlers.items():
            signal.signal(s, h)

    def run(self) -> pathlib.Path:
        """Train to the end of the recipe (or max_steps / a signal). Returns the run folder."""
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.json").write_text(self.recipe.to_json())
        if self.state is not None and self.epoch >= self.recipe.epochs:
            log.info("%s is complete (%d epochs): nothing to resume", self.out, self.epoch)
        elif self.state is not None and self.main:
            log.info("resumed %s at epoch %d step %d", self.out, self.epoch + 1, self.step_in_epoch)
        elif self.main:
            log.info("started %s", self.out)
        if threading.current_thread() is threading.main_thread():
            self.old_handlers = {s: signal.signal(s, self.handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.loop()
            if self.world > 1:  # every process returns once rank 0 has written the run's files (state.pt, ...)
                dist.barrier()
        finally:
            for s, h in self.old_handlers.items():
                signal.signal(s, h)
            if self.bad_pairs:
                where = f" (process {self.rank})" if self.world > 1 else ""
                log.warning("%d training pairs could not be used and were skipped%s", len(self.bad_pairs), where)
            if self.own_group:
                dist.destroy_process_group()
        return self.out

    def loop(self) -> None:
        writer = self.tensorboard()
        steps_here, started = 0, time.perf_counter()
        try:
            while self.epoch < self.recipe.epochs:
                stage = self.recipe.stage(self.epoch)
                # checkpoints and validation of this epoch carry the size it trains at
                self.spec = dataclasses.replace(self.spec, size=self.recipe.size_at(self.epoch))
                if self.step_in_epoch == 0:  # dropout draws from (seed, epoch, rank); mid-epoch, the restored state
                    self.seed_dropout()
                    self.epoch_loss, self.epoch_steps, self.epoch_images, self.epoch_seconds = 0.0, 0, 0, 0.0
                self.model.train()
                total = self.steps_per_epoch()
                bar = tqdm(self.loader(), total=total, initial=self.step_in_epoch, dynamic_ncols=True,
                           disable=not (self.main and self.opts.progress),
                           desc=f"epoch {self.epoch + 1}/{self.recipe.epochs}")
                stop, seen_here = False, 0
                lr = self.recipe.lr(self.epoch, self.step_in_epoch, total)
                t0 = t_bar = time.perf_counter()  # t0: for epoch_seconds; t_bar: for the bar's images/s
                for x, y, errors in bar:
                    lr = self.recipe.lr(self.epoch, self.step_in_epoch, total)  # per step, from the position alone
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr
                    self.report_bad_pairs(errors)
                    # Every process must take part in each step (DDP reduces gradients across them).
                    if self.sum_over_ranks(x is not None)[0] == self.world:
                        loss, images = self.train_step(x, y, stage.alpha)
                        self.epoch_loss, self.epoch_steps = self.epoch_loss + loss, self.epoch_steps + 1
                        self.epoch_images, seen_here = self.epoch_images + images, seen_here + images
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}",
                                        img_s=f"{seen_here / (time.perf_counter() - t_bar):.2f}")
                        if writer is not None:
                            writer.add_scalar("step/loss", loss, self.global_step + 1)
                            writer.add_scalar("step/lr", lr, self.global_step + 1)
                        if self.main and not self.opts.progress and (self.global_step + 1) % 50 == 0:
                            log.info("epoch %d step %d/%d (%d images): loss %.4f lr %.3g, %.2f images/s",
                                     self.epoch + 1, self.step_in_epoch + 1, total,
                                     (self.global_step + 1) * self.recipe.batch_size * self.world, loss, lr,
                                     seen_here / (time.perf_counter() - t_bar))
                    else:
                        log.warning("epoch %d step %d skipped: a batch had no usable pair",
                                    self.epoch + 1, self.step_in_epoch + 1)
                    self.step_in_epoch += 1
                    self.global_step += 1
                    steps_here += 1
                    time_up = bool(self.opts.max_minutes and time.perf_counter() - started > 60 * self.opts.max_minutes)
                    wants_stop = (self.stopped_by is not None or time_up
                                  or bool(self.opts.max_steps and steps_here >= self.opts.max_steps))
                    stop = self.sum_over_ranks(wants_stop)[0] > 0
                    if self.step_in_epoch >= total:
                        break  # the epoch's end (below) writes the checkpoint, stopping or not
                    if self.opts.val_steps and self.global_step % self.opts.val_steps == 0:
                        self.epoch_seconds += time.perf_counter() - t0  # validation time is not training time
                        self.log_row(self.row(lr, stage.alpha, total), writer, validate_now=True)
                        self.model.train()
                        t0 = time.perf_counter()
                    if time_up:  # the end of a rented machine's time: score where it got to
                        self.log_row(self.row(lr, stage.alpha, total), writer, validate_now=True)
                    if stop or (self.opts.save_steps and self.step_in_epoch % self.opts.save_steps == 0):
                        self.epoch_seconds += time.perf_counter() - t0  # the timer restarts with the next step
                        t0 = time.perf_counter()
                        self.save_state()
                    if stop:
                        self.log_stop()
                        return
                bar.close()
                self.epoch_seconds += time.perf_counter() - t0
                self.end_epoch(lr, stage.alpha, writer)
                if stop:
                    self.log_stop()
                    return
        finally:
            if writer is not None:
                writer.close()

    def log_stop(self) -> None:
        if self.stopped_by is not None and self.main:
            log.warning("stopped by signal %d at epoch %d step %d; checkpoint in %s (continue with --resume)",
                        self.stopped_by, self.epoch + 1, self.step_in_epoch, self.out)

    def report_bad_pairs(self, errors: list[str]) -> None:
        for err in errors:
            if err not in self.bad_pairs:
                self.bad_pairs.add(err)
                log.warning("skipping a pair that cannot be used: %s", err)

    def row(self, lr: float, alpha: float, total: int) -> dict:
        """The log row of the run's current position (the epoch's running loss and speed)."""
        epoch = round(self.epoch + self.step_in_epoch / total, 4) if self.step_in_epoch else self.epoch
        return {"epoch": epoch, "step": self.global_step,
                "images": self.global_step * self.recipe.batch_size * self.world,
                "loss": self.epoch_loss / self.epoch_steps if self.epoch_steps else float("nan"),
                "lr": lr, "alpha": alpha, "size": self.spec.size,
                "images_per_s": self.epoch_images / self.epoch_seconds if self.epoch_seconds else float("nan")}

    def log_row(self, row: dict, writer, validate_now: bool) -> None:
        """Validate (rank 0) on each source if asked, keep best.safetensors on the first, append the row."""
        if self.main and self.val_sets and validate_now:
            for i, (name, pairs) in enumerate(self.val_sets.items()):
                scores = validate(self.evaluated, self.spec, pairs, self.device)
                prefix = "val" if i == 0 else name
                row.update({f"{prefix}_mae": scores["mae"], f"{prefix}_maxF": scores["maxF"]})
                log.info("epoch %.2f (%d images): %s MAE %.4f  max F %.4f", row["epoch"], row["images"], name,
                         scores["mae"], scores["maxF"])
            meta = {**self.training_meta(), "val_scores": {"mae": row["val_mae"], "maxF": row["val_maxF"]}}
            if self.best is None or row["val_maxF"] > self.best:
                self.best = row["val_maxF"]
                save_checkpoint(self.out / "best.safetensors", self.evaluated, self.spec, meta)
            # Max F ranks pixels, MAE also weighs calibration; the two bests can be different checkpoints.
            if self.best_mae is None or row["val_mae"] < self.best_mae:
                self.best_mae = row["val_mae"]
                save_checkpoint(self.out / "best_mae.safetensors", self.evaluated, self.spec, meta)
        if self.main:
            self.append_log(row, writer)

    def end_epoch(self, lr: float, alpha: float, writer) -> None:
        total = self.steps_per_epoch()
        self.epoch += 1
        self.step_in_epoch = 0
        row = self.row(lr, alpha, total)
        self.log_row(row, writer, self.epoch % self.opts.val_every == 0 or self.epoch == self.recipe.epochs)
        if self.main and self.epoch % self.opts.save_every == 0:
            save_checkpoint(self.out / f"epoch_{self.epoch:04d}.safetensors", self.evaluated, self.spec,
                            self.training_meta())
        self.save_state()

    def append_log(self, row: dict, writer) -> None:
        path = self.out / "log.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.log_fields)
            if new:
                w.writeheader()
            w.writerow(row)
        if writer is not None:
            for k, v in row.items():
                if k not in ("epoch", "step"):
                    writer.add_scalar(f"epoch/{k}", v, self.global_step)
            writer.flush()

    def tensorboard(self):
        """A SummaryWriter on tb/ (rank 0), its steps the optimizer steps; on resume, events after the checkpoint
        (from a run that went on past it before stopping) are purged."""
        if not self.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard not installed (the \"train\" extra: pip install \"pfanet[train]\"): no event files, "
                     "log.csv only")
            return None
        return SummaryWriter(str(self.out / "tb"), purge_step=self.global_step + 1 if self.state else None)


def evenly_spaced(pairs: list, n: int | None) -> list:
    """n pairs spread evenly over the list (all of them when n is None or not smaller): a fixed validation subset."""
    if not n or n >= len(pairs):
        return pairs
    return [pairs[i * len(pairs) // n] for i in range(n)]


def make_optimizer(model: PFANet, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over the trainable parameters. Weight decay goes to convolution and dense weights only,
    unless `decay_norm_bias`: decaying biases and norm scales pulls them to zero for no regularising gain."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 or recipe.decay_norm_bias else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr(0))
    return torch.optim.SGD(groups, lr=recipe.lr(0), momentum=recipe.momentum)


def train(recipe: Recipe, opts: TrainOptions) -> pathlib.Path:
    """Run (or with opts.resume continue) a training run; returns its folder."""
    return Trainer(recipe, opts).run()


def saved_rng_state(state: dict, rank: int, world: int) -> torch.Tensor | None:
    """The CPU RNG state a process of `world` saved in state.pt, or None when another number of processes saved it.

    A copy: a row of the stacked states is a view at an offset into their storage, which torch.set_rng_state
    misreads ("Invalid mt19937 state", or a crash) for every rank but 0."""
    ranks = state.get("rank_torch_rng")
    if ranks is None:  # written before the per-rank states existed, by a single process
        return state["torch_rng"] if world == 1 else None
    return ranks[rank].clone() if len(ranks) == world else None


# What --reschedule may change in a run under way: its length, rates and sizes, and the batch per process (so that
# a run moved from one process to several under torchrun keeps its images per step) -- not what it trains.
SCHEDULE_FIELDS = ("stages", "size", "size_schedule", "batch_size")


def recipe_for_run(name: str | None, overrides: dict, out: str | os.PathLike, resume: bool,
                   reschedule: bool = False) -> Recipe:
    """The recipe a `pfanet train` invocation means: the named recipe (default cpu-duts) with the overrides applied,
    or, when resuming, the run's own recipe.json, which must come out unchanged by the overrides (so that the run
    continues exactly as it was started).

    With `reschedule` a resumed run takes a new schedule (SCHEDULE_FIELDS) from its current position on: its own
    recipe's with the overrides applied (e.g. --epochs), or, when a recipe is named, that recipe's as the package
    now defines it. The learning rate, alpha and input size are functions of the position, so the run carries on
    along the new curves. Anything else that would change is refused. The replaced recipe.json is kept beside it."""
    from .recipes import RECIPES

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
