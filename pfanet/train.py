"""Training's public face: `from pfanet.train import Trainer, TrainOptions, ...` keeps working for the code and
scripts written against it. The parts live in pfanet.training, one module each (its docstring lists them)."""

from .training import (
    LOG_FIELDS,
    SCHEDULE_FIELDS,
    Callback,
    EpochSampler,
    Trainer,
    TrainingStopped,
    TrainOptions,
    TrainStep,
    build_model,
    epoch_seed,
    evenly_spaced,
    freeze_blocks,
    make_optimizer,
    recipe_for_run,
    saved_rng_state,
    validate,
)

__all__ = [
    "LOG_FIELDS", "SCHEDULE_FIELDS", "Callback", "EpochSampler", "TrainOptions", "TrainStep", "Trainer",
    "TrainingStopped", "build_model", "epoch_seed", "evenly_spaced", "freeze_blocks", "make_optimizer",
    "recipe_for_run", "saved_rng_state", "validate",
]
