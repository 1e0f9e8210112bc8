"""What happens around the steps of a run, as callbacks: validation and the best checkpoints, periodic checkpoints,
and the stop rules (a step budget, a time budget, SIGINT/SIGTERM).

The loop calls every callback's hooks on every process, in the order of `Trainer.callbacks` (the run's own, made
from its options, then the caller's); `trainer` is the `pfanet.training.loop.Trainer`. Rank 0 alone writes files
and validates: the other processes wait in the next collective.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import torch

from ..model import PFANet
from ..transforms import InputSpec
from .loggers import LOG_FIELDS

log = logging.getLogger(__name__)


class Callback:
    """Hooks into the loop, all optional."""

    def on_fit_start(self, trainer) -> None:
        """run() begins (resumed or not)."""

    def on_train_step(self, trainer, loss: float, images: int) -> None:
        """After each optimizer step (a step whose batches all failed to load has none), before the position moves:
        the loss (mean over processes) and the images of the step (all processes)."""

    def wants_stop(self, trainer) -> bool:
        """Asked after every step once the position has moved; any process's yes stops every process there, with a
        checkpoint."""
        return False

    def on_step_end(self, trainer) -> None:
        """After each step within an epoch, the stop decided (`trainer.stopping`). The epoch's last step is followed
        by on_epoch_end instead."""

    def on_epoch_end(self, trainer) -> None:
        """The position has moved to the next epoch; state.pt is written after these hooks."""

    def on_save_checkpoint(self, trainer, state: dict) -> None:
        """Rank 0, just before `state` is written to state.pt."""

    def on_stop(self, trainer) -> None:
        """The run stopped before the recipe's end (a stop rule), after its checkpoint."""

    def on_fit_end(self, trainer) -> None:
        """run() ends, also by an error."""


@torch.inference_mode()
def validate(model: PFANet, spec: InputSpec, pairs, device) -> dict[str, float]:
    """MAE and max F (pysodmetrics) of the model on validation pairs, maps at the mask's size."""
    from ..evaluate import score_pairs  # evaluation owns the metrics
    from ..predictor import Predictor

    was_training = model.training
    predictor = Predictor(model=model, spec=spec, device=str(device))
    try:
        return score_pairs(predictor, pairs, metrics=("mae", "maxF"))
    finally:
        model.train(was_training)


class Validation(Callback):
    """The rows of log.csv, and the validation in them.

    A row at every epoch's end, validated every `every_epochs` epochs and after the last, and a validated row every
    `every_steps` steps within an epoch. Rank 0 scores the evaluated network (the moving average, if the recipe keeps
    one) on each source with `validate_fn`; the first source's max F keeps best.safetensors, its MAE
    best_mae.safetensors (max F ranks pixels, MAE also weighs calibration: the two bests can be different
    checkpoints). Validation time is not training time: the epoch's clock stops meanwhile.
    """

    def __init__(self, sets: dict[str, list], every_epochs: int = 1, every_steps: int = 0,
                 validate_fn=validate):
        self.sets, self.every_epochs, self.every_steps, self.validate_fn = sets, every_epochs, every_steps, validate_fn

    @property
    def fields(self) -> tuple[str, ...]:
        """log.csv's columns: LOG_FIELDS, then NAME_mae, NAME_maxF for each source after the first."""
        return LOG_FIELDS + tuple(f"{name}_{m}" for name in list(self.sets)[1:] for m in ("mae", "maxF"))

    def on_step_end(self, trainer) -> None:
        if self.every_steps and trainer.state.global_step % self.every_steps == 0:
            self.log_row(trainer, validate=True)

    def on_epoch_end(self, trainer) -> None:
        epoch = trainer.state.epoch
        due = bool(self.every_epochs) and epoch % self.every_epochs == 0
        self.log_row(trainer, validate=due or epoch == trainer.recipe.epochs)

    def log_row(self, trainer, validate: bool) -> None:
        """The row of the run's current position, scored first if `validate`."""
        with trainer.clock.paused():
            row = trainer.row()
            if validate and trainer.env.main and self.sets:
                self.score(trainer, row)
            trainer.log_row(row)

    def score(self, trainer, row: dict) -> None:
        for i, (name, pairs) in enumerate(self.sets.items()):
            scores = self.validate_fn(trainer.evaluated, trainer.spec, pairs, trainer.env.device)
            prefix = "val" if i == 0 else name
            row.update({f"{prefix}_mae": scores["mae"], f"{prefix}_maxF": scores["maxF"]})
            log.info("epoch %.2f (%d images): %s MAE %.4f  max F %.4f", row["epoch"], row["images"], name,
                     scores["mae"], scores["maxF"])
        meta = {**trainer.training_meta(), "val_scores": {"mae": row["val_mae"], "maxF": row["val_maxF"]}}
        state = trainer.state
        if state.best is None or row["val_maxF"] > state.best:
            state.best = row["val_maxF"]
            trainer.checkpointer.save_weights("best.safetensors", trainer.evaluated, trainer.spec, meta)
        if state.best_mae is None or row["val_mae"] < state.best_mae:
            state.best_mae = row["val_mae"]
            trainer.checkpointer.save_weights("best_mae.safetensors", trainer.evaluated, trainer.spec, meta)


class PeriodicCheckpoint(Callback):
    """state.pt and last.safetensors every `every_steps` steps within an epoch (every epoch's end has them anyway)."""

    def __init__(self, every_steps: int):
        self.every_steps = every_steps

    def on_step_end(self, trainer) -> None:
        if trainer.state.step_in_epoch % self.every_steps == 0:
            trainer.save()


class EpochWeights(Callback):
    """epoch_NNNN.safetensors every `every_epochs` epochs."""

    def __init__(self, every_epochs: int):
        self.every_epochs = every_epochs

    def on_epoch_end(self, trainer) -> None:
        epoch = trainer.state.epoch
        if trainer.env.main and epoch % self.every_epochs == 0:
            trainer.checkpointer.save_weights(f"epoch_{epoch:04d}.safetensors", trainer.evaluated, trainer.spec,
                                              trainer.training_meta())


class MaxSteps(Callback):
    """Stop after `steps` steps of this process (--max-steps)."""

    def __init__(self, steps: int):
        self.steps = steps

    def wants_stop(self, trainer) -> bool:
        return trainer.steps_run >= self.steps


class TimeBudget(Callback):
    """Stop after `minutes` of this process's run (--max-minutes: a rented machine's time), scored where it got to:
    a validated row (and the best files) before the checkpoint, unless the epoch's end validates anyway."""

    def __init__(self, minutes: float, validation: Validation):
        self.minutes, self.validation = minutes, validation
        self.started, self.time_up = time.perf_counter(), False

    def on_fit_start(self, trainer) -> None:
        self.started, self.time_up = time.perf_counter(), False

    def wants_stop(self, trainer) -> bool:
        self.time_up = time.perf_counter() - self.started > 60 * self.minutes
        return self.time_up

    def on_step_end(self, trainer) -> None:
        if self.time_up:
            self.validation.log_row(trainer, validate=True)


class SignalStop(Callback):
    """SIGINT (Ctrl-C) and SIGTERM let the current step finish; the run then stops on every process with a
    checkpoint. A second signal stops at once: the handlers from before the run are back after the first."""

    def __init__(self):
        self.signum: int | None = None  # the signal that stopped the run
        self.old_handlers: dict = {}

    def on_fit_start(self, trainer) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers can be set there only
            self.old_handlers = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame) -> None:
        self.signum = signum
        log.warning("signal %d: stopping after this step with a checkpoint (a second one stops at once)", signum)
        self.restore()

    def restore(self) -> None:
        for s, h in self.old_handlers.items():
            signal.signal(s, h)

    def wants_stop(self, trainer) -> bool:
        return self.signum is not None

    def on_stop(self, trainer) -> None:
        if self.signum is not None and trainer.env.main:
            log.warning("stopped by signal %d at epoch %d step %d; checkpoint in %s (continue with --resume)",
                        self.signum, trainer.state.epoch + 1, trainer.state.step_in_epoch, trainer.out)

    def on_fit_end(self, trainer) -> None:
        self.restore()


def run_callbacks(opts, validation: Validation) -> list[Callback]:
    """A run's own callbacks, from its TrainOptions, in the order their hooks run: the log rows (and validation)
    first, then the stop rules (the time budget's row after the regular one), then the checkpoints."""
    callbacks: list[Callback] = [validation]
    if opts.max_minutes:
        callbacks.append(TimeBudget(opts.max_minutes, validation))
    if opts.max_steps:
        callbacks.append(MaxSteps(opts.max_steps))
    callbacks.append(SignalStop())
    if opts.save_steps:
        callbacks.append(PeriodicCheckpoint(opts.save_steps))
    if opts.save_every:
        callbacks.append(EpochWeights(opts.save_every))
    return callbacks
