"""The training loop: `Trainer` puts a run's parts together and runs its steps, calling the callbacks' hooks."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable, Sequence

import torch

from ..data import read_pairs
from ..ema import ModelEMA
from ..loss import training_loss
from ..model import PFANet
from ..recipes import Recipe
from .builders import build_model, epoch_seed, make_optimizer
from .callbacks import Callback, SignalStop, Validation, run_callbacks, validate
from .datasets import EpochSampler, epoch_loader, training_dataset, validation_sets
from .distributed import DistributedEnv
from .loggers import CSVLogger, Logger, Progress, TensorBoardLogger
from .options import TrainOptions
from .state import Checkpointer, RunState, read_state, run_seed, trim_log
from .step import TrainingStopped, TrainStep

log = logging.getLogger(__name__)


class EpochClock:
    """The epoch's training time so far: it runs through steps, data waits and checkpoints, not validation."""

    def __init__(self, seconds: float = 0.0):
        self.before, self.since = seconds, time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.since

    @contextlib.contextmanager
    def paused(self):
        self.before = self.seconds()
        try:
            yield
        finally:
            self.since = time.perf_counter()


class Trainer:
    """One training run (one process of it under torchrun). `run()` trains to the end of the recipe, or until a
    stop rule (--max-steps, --max-minutes, a signal) with a checkpoint; a new Trainer with `resume=True` continues.

    `callbacks` run after the run's own (pfanet.training.callbacks.run_callbacks); `loss_fn` (training_loss's
    signature) and `validate_fn` (validate's) replace the loss and the validation, e.g. in tests.
    """

    def __init__(self, recipe: Recipe, opts: TrainOptions, *, callbacks: Sequence[Callback] = (),
                 loss_fn: Callable = training_loss, validate_fn: Callable = validate):
        self.recipe, self.opts = recipe, opts
        self.out = pathlib.Path(opts.out)
        self.env = env = DistributedEnv.start(opts.device, opts.collective_timeout)
        gpu = env.device.type == "cuda"
        self.channels_last = gpu if opts.channels_last is None else opts.channels_last
        self.bf16 = gpu if opts.bf16 is None else opts.bf16
        saved = read_state(self.out) if opts.resume else None
        self.resumed = saved is not None
        self.seed = run_seed(saved, opts.seed, self.out)

        torch.manual_seed(self.seed)  # a new network's initialisation
        self.model, self.spec = build_model(recipe, env.device, self.channels_last)
        self.optimizer = make_optimizer(self.model, recipe)
        self.ema = ModelEMA(self.model, recipe.ema) if recipe.ema else None
        net = env.wrap(self.model)
        if opts.compile and self.bf16 and env.device.type == "cpu" and env.main:
            log.warning("--compile with bf16 on the CPU: the loss became NaN at step 2 in both runs measured with torch "
                        "2.13 (docs/TRAINING.md, 'Mixed precision'); the eager bf16 step is the measured one")
        self.step = TrainStep(self.model, self.optimizer, recipe, net=torch.compile(net) if opts.compile else net,
                              env=env, bf16=self.bf16, channels_last=self.channels_last, ema=self.ema,
                              loss_fn=loss_fn)

        pairs = [p for source in opts.train for p in read_pairs(source)][: opts.limit or None]
        self.dataset = training_dataset(pairs, recipe, self.spec, self.seed, opts.cache)
        if opts.cache:  # before the DataLoader forks its workers, so that they share one copy
            self.dataset.preload(threads=max(1, opts.workers), progress=env.main and opts.progress)
        self.sampler = EpochSampler(len(pairs), self.seed, env.rank, env.world)
        if self.steps_per_epoch() == 0:
            raise ValueError(f"{len(pairs)} training pairs on {env.world} process(es) do not fill one batch of "
                             f"{recipe.batch_size}")
        self.validation = Validation(validation_sets(opts.val, opts.val_limit), opts.val_every, opts.val_steps,
                                     validate_fn)
        self.callbacks = [*run_callbacks(opts, self.validation), *callbacks]

        self.state = RunState()
        self.checkpointer = Checkpointer(self.out, recipe, self.seed, env, self.model, self.optimizer, self.ema)
        if saved is not None:
            self.checkpointer.restore(saved, self.state, opts.reschedule)
            if env.main:
                trim_log(self.out / "log.csv", self.validation.fields, self.state)
        self.lr, self.alpha = recipe.lr(0), recipe.stage(0).alpha  # the current step's (set by the loop)
        self.clock, self.progress = EpochClock(), Progress(opts.progress, env.main)
        self.loggers: list[Logger] = []
        self.steps_run, self.stopping, self.saved_at = 0, False, None
        self.bad_pairs: set[str] = set()

    # ---- the run ----------------------------------------------------------------------------------------------------

    def run(self) -> pathlib.Path:
        """Train to the end of the recipe (or a stop rule). Returns the run folder."""
        main = self.env.main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.json").write_text(self.recipe.to_json())
        if self.resumed and self.state.epoch >= self.recipe.epochs:
            log.info("%s is complete (%d epochs): nothing to resume", self.out, self.state.epoch)
        elif self.resumed and main:  # tools/train_default.sh waits for "resumed" / "started"
            log.info("resumed %s at epoch %d step %d", self.out, self.state.epoch + 1, self.state.step_in_epoch)
        elif main:
            log.info("started %s", self.out)
        try:
            for cb in self.callbacks:
                cb.on_fit_start(self)
            self.loggers = self.make_loggers() if main else []
            try:
                while self.state.epoch < self.recipe.epochs:
                    if self.run_epoch():
                        break
            finally:
                for logger in self.loggers:
                    logger.close()
            self.env.barrier()  # every process returns once rank 0 has written the run's files (state.pt, ...)
        finally:
            for cb in self.callbacks:
                cb.on_fit_end(self)
            if self.bad_pairs:
                where = f" (process {self.env.rank})" if self.env.world > 1 else ""
                log.warning("%d training pairs could not be used and were skipped%s", len(self.bad_pairs), where)
            self.env.close()
        return self.out

    def run_epoch(self) -> bool:
        """The rest of the current epoch; True when a stop rule ended the run there (after its checkpoint)."""
        state, recipe = self.state, self.recipe
        self.alpha = recipe.stage(state.epoch).alpha
        # checkpoints and validation of this epoch carry the size it trains at
        self.spec = dataclasses.replace(self.spec, size=recipe.size_at(state.epoch))
        if state.step_in_epoch == 0:  # dropout draws from (seed, epoch, rank); mid-epoch, the restored state
            torch.manual_seed(epoch_seed(self.seed, state.epoch, self.env.rank))
            state.start_epoch()
        self.model.train()
        total = self.steps_per_epoch()
        batches = self.progress.epoch(self.loader(), total, state.step_in_epoch,
                                      f"epoch {state.epoch + 1}/{recipe.epochs}")
        self.lr = recipe.lr(state.epoch, state.step_in_epoch, total)
        self.clock = EpochClock(state.epoch_seconds)
        stopped_mid_epoch = False
        for x, y, errors in batches:
            self.lr = recipe.lr(state.epoch, state.step_in_epoch, total)  # per step, from the position alone
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr
            self.report_bad_pairs(errors)
            # Every process must take part in each step (DDP reduces gradients across them).
            if self.env.sum(x is not None)[0] == self.env.world:
                loss, images = self.train_step(x, y, self.alpha)
                state.epoch_loss, state.epoch_steps = state.epoch_loss + loss, state.epoch_steps + 1
                state.epoch_images += images
                self.progress.step(self, loss, images)
                for logger in self.loggers:
                    logger.log_step(state.global_step + 1, {"loss": loss, "lr": self.lr})
                for cb in self.callbacks:
                    cb.on_train_step(self, loss, images)
            else:
                log.warning("epoch %d step %d skipped: a batch had no usable pair", state.epoch + 1,
                            state.step_in_epoch + 1)
            state.step_in_epoch += 1
            state.global_step += 1
            self.steps_run += 1
            wants = [cb.wants_stop(self) for cb in self.callbacks]  # each asked: a rule may note why
            self.stopping = self.env.sum(any(wants))[0] > 0
            if state.step_in_epoch >= total:
                break  # the epoch's end (below) writes the checkpoint, stopping or not
            for cb in self.callbacks:
                cb.on_step_end(self)
            if self.stopping:
                if self.saved_at != state.global_step:  # unless a periodic checkpoint fell on this step
                    self.save()
                stopped_mid_epoch = True
                break
        self.progress.close()
        if not stopped_mid_epoch:  # the epoch's end, also when a rule stops the run there
            state.epoch += 1
            state.step_in_epoch = 0
            for cb in self.callbacks:
                cb.on_epoch_end(self)
            self.save()
        if self.stopping:
            for cb in self.callbacks:
                cb.on_stop(self)
        return self.stopping

    def train_step(self, x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[float, int]:
        """One optimizer step (TrainStep); a NaN/Inf loss stops the run, naming the step."""
        try:
            return self.step(x, y, alpha)
        except TrainingStopped as e:
            raise TrainingStopped(
                f"{e} at epoch {self.state.epoch + 1} step {self.state.step_in_epoch + 1}; stopped without saving, "
                f"so {self.out / 'state.pt'} is still the last good checkpoint (try a lower --lr)") from None

    def save(self) -> None:
        """state.pt and last.safetensors (rank 0 writes; every process calls this at the same step)."""
        self.state.epoch_seconds = self.clock.seconds()
        state = self.checkpointer.state_dict(self.state)
        if state is not None:
            for cb in self.callbacks:
                cb.on_save_checkpoint(self, state)
            self.checkpointer.write(state, self.evaluated, self.spec, self.training_meta())
        self.saved_at = self.state.global_step

    # ---- parts and numbers ------------------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def evaluated(self) -> PFANet:
        """The network that is validated and written to the weights files: the moving average, if the recipe keeps
        one, else the trained weights."""
        return self.model if self.ema is None else self.ema.module

    @property
    def stopped_by(self) -> int | None:
        """The signal that stopped the run, if one did."""
        return next((cb.signum for cb in self.callbacks if isinstance(cb, SignalStop)), None)

    def steps_per_epoch(self) -> int:
        return len(self.sampler.order()) // self.recipe.batch_size

    def images_seen(self, steps: int | None = None) -> int:
        """Images in the run's first `steps` steps (default: all so far), every process's."""
        return (self.state.global_step if steps is None else steps) * self.recipe.batch_size * self.env.world

    def loader(self) -> torch.utils.data.DataLoader:
        """The current epoch's batches from the run's position on."""
        self.dataset.set_epoch(self.state.epoch, self.spec.size)
        self.sampler.set_position(self.state.epoch, self.state.step_in_epoch * self.recipe.batch_size)
        return epoch_loader(self.dataset, self.sampler, self.recipe.batch_size, self.seed, self.opts.workers,
                            pin_memory=self.env.device.type == "cuda")

    def training_meta(self) -> dict:
        """The "training" metadata of the weights files the run writes."""
        return {"recipe": self.recipe.to_dict(), "epoch": self.state.epoch, "step": self.state.global_step,
                "images_seen": self.images_seen(), "seed": self.seed,
                "train": [str(t) for t in self.opts.train], "val": [str(v) for v in self.opts.val]}

    def row(self) -> dict:
        """The log row of the run's current position (the epoch's running loss and speed), without scores."""
        s, total, seconds = self.state, self.steps_per_epoch(), self.clock.seconds()
        return {"epoch": round(s.epoch + s.step_in_epoch / total, 4) if s.step_in_epoch else s.epoch,
                "step": s.global_step, "images": self.images_seen(),
                "loss": s.epoch_loss / s.epoch_steps if s.epoch_steps else float("nan"),
                "lr": self.lr, "alpha": self.alpha, "size": self.spec.size,
                "images_per_s": s.epoch_images / seconds if seconds else float("nan")}

    def log_row(self, row: dict) -> None:
        for logger in self.loggers:
            logger.log_row(self.state.global_step, row)

    def make_loggers(self) -> list[Logger]:
        loggers: list[Logger] = [CSVLogger(self.out / "log.csv", self.validation.fields)]
        tb = TensorBoardLogger.create(self.out / "tb", self.state.global_step if self.resumed else None)
        return loggers + ([tb] if tb is not None else [])

    def report_bad_pairs(self, errors: list[str]) -> None:
        for err in errors:
            if err not in self.bad_pairs:
                self.bad_pairs.add(err)
                log.warning("skipping a pair that cannot be used: %s", err)
