"""What a run needs beyond its recipe: the data, the run folder and the mechanics, none of which changes the result."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TrainOptions:
    """The `pfanet train` mechanics (`Recipe` holds everything that decides what the run computes)."""

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
