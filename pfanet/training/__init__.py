"""Training PFANet: recipes, resumable run folders, validation, logs; one process or several under torchrun.

The parts, one module each:
    options     TrainOptions: the data, the run folder and the mechanics (what does not change the result)
    builders    the network and the optimizer from a recipe (no data needed); epoch_seed, the one seed derivation
    distributed DistributedEnv: world, rank, device, the process group and the collectives the loop uses
    datasets    the training set, each process's share of an epoch's order, the loader, the validation subsets
    step        TrainStep: one optimizer step (forward, the recipe's loss, the NaN check, backward, EMA)
    state       RunState (where the run is), Checkpointer (state.pt, last/best files), recipe_for_run
    callbacks   the hooks, and validation, checkpoints, time and step budgets and signals as callbacks
    loggers     log.csv and TensorBoard behind one interface; the console's progress bar or log lines
    loop        Trainer: the parts put together, the epochs and steps, the hooks called

A run folder holds:
    recipe.json            the recipe, as run
    state.pt               weights + optimizer + schedule position + RNG states (tensors and numbers only, read
                           with weights_only=True), written atomically every epoch, every `save_steps` steps, at
                           the end and on SIGINT/SIGTERM
    last.safetensors       the latest weights in our format; best.safetensors the best on validation (max F),
                           best_mae.safetensors the lowest MAE (with a recipe `ema`, these and the epoch files hold
                           the moving average, which is what is validated; state.pt keeps both)
    epoch_NNNN.safetensors every `save_every` epochs
    log.csv, tb/           per-epoch CSV log and TensorBoard events

Reproducibility: the epoch's sample order comes from (seed, epoch), each sample's augmentation from (seed, epoch,
index) and dropout from a generator seeded with (seed, epoch, rank) and saved mid-epoch, so a run that is stopped and
resumed ends with exactly the weights of one that was not.

Under torchrun every process takes every world-th sample of the epoch's order and runs `batch_size` of them per step;
DistributedDataParallel averages the gradients, so N processes at batch b compute what one process at batch N x b
does. Only rank 0 writes files.
"""

from .builders import build_model, epoch_seed, freeze_blocks, make_optimizer
from .callbacks import (
    Callback,
    EpochWeights,
    MaxSteps,
    PeriodicCheckpoint,
    SignalStop,
    TimeBudget,
    Validation,
    run_callbacks,
    validate,
)
from .datasets import EpochSampler, epoch_loader, evenly_spaced, training_dataset, validation_sets
from .distributed import DistributedEnv
from .loggers import LOG_FIELDS, CSVLogger, Logger, Progress, TensorBoardLogger
from .loop import Trainer
from .options import TrainOptions
from .state import SCHEDULE_FIELDS, Checkpointer, RunState, recipe_for_run, saved_rng_state, trim_log
from .step import TrainingStopped, TrainStep

__all__ = [
    "LOG_FIELDS", "SCHEDULE_FIELDS", "CSVLogger", "Callback", "Checkpointer", "DistributedEnv", "EpochSampler",
    "EpochWeights", "Logger", "MaxSteps", "PeriodicCheckpoint", "Progress", "RunState", "SignalStop",
    "TensorBoardLogger", "TimeBudget", "TrainOptions", "TrainStep", "Trainer", "TrainingStopped", "Validation",
    "build_model", "epoch_loader", "epoch_seed", "evenly_spaced", "freeze_blocks", "make_optimizer",
    "recipe_for_run", "run_callbacks", "saved_rng_state", "training_dataset", "trim_log", "validate",
    "validation_sets",
]
