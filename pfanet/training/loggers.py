"""Where a run's numbers go, on rank 0: log.csv and TensorBoard behind one interface (`Logger`), and the console
(`Progress`)."""

from __future__ import annotations

import csv
import logging
import pathlib
import time
from typing import Protocol

from tqdm import tqdm

log = logging.getLogger(__name__)

# log.csv: one row per epoch end and per mid-epoch validation (`val_steps`); "epoch" is the run's position in
# epochs (3.5 = half-way through the 4th), "step" and "images" count from the start of the run. val_* scores the
# first validation source (it picks best.safetensors); each further source adds NAME_mae, NAME_maxF columns.
LOG_FIELDS = ("epoch", "step", "images", "loss", "lr", "alpha", "size", "images_per_s", "val_mae", "val_maxF")


class Logger(Protocol):
    """`step` is the optimizer step the numbers belong to, counted from the start of the run."""

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        """After every optimizer step: its loss and learning rate."""

    def log_row(self, step: int, row: dict) -> None:
        """A row of log.csv (LOG_FIELDS and the further validation sources' columns)."""

    def close(self) -> None: ...


class CSVLogger:
    """log.csv, appended a row at a time (a header first in a new file)."""

    def __init__(self, path: pathlib.Path, fields: tuple[str, ...]):
        self.path, self.fields = path, fields

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def log_row(self, step: int, row: dict) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                w.writeheader()
            w.writerow(row)

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Events in tb/: `step/*` every step, `epoch/*` as in log.csv, at the optimizer step."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def create(cls, folder: pathlib.Path, resumed_at: int | None) -> TensorBoardLogger | None:
        """None without TensorBoard. On resume (`resumed_at` the checkpoint's step) the events after the checkpoint,
        from a run that went on past it before stopping, are purged."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard not installed (the \"train\" extra: pip install \"pfanet[train]\"): no event files, "
                     "log.csv only")
            return None
        return cls(SummaryWriter(str(folder), purge_step=None if resumed_at is None else resumed_at + 1))

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(f"step/{k}", v, step)

    def log_row(self, step: int, row: dict) -> None:
        for k, v in row.items():
            if k not in ("epoch", "step"):
                self.writer.add_scalar(f"epoch/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Progress:
    """The console: rank 0's progress bar (epoch, loss, learning rate, images/s), or with the bar off a log line
    every 50 steps ("INFO epoch E step S/N (I images): ..."; tools/train_default.sh's readers grep for it)."""

    EVERY = 50

    def __init__(self, bar: bool, main: bool):
        self.bar_on, self.lines = bar and main, main and not bar
        self.bar = None
        self.seen, self.t0 = 0, time.perf_counter()

    def epoch(self, batches, total: int, done: int, desc: str):
        """The epoch's batches, through the bar; its images/s count from here, in this process."""
        self.bar = tqdm(batches, total=total, initial=done, dynamic_ncols=True, disable=not self.bar_on, desc=desc)
        self.seen, self.t0 = 0, time.perf_counter()
        return self.bar

    def step(self, trainer, loss: float, images: int) -> None:
        """After an optimizer step of the `Trainer`, before the run's position moves past it."""
        self.seen += images
        rate = self.seen / (time.perf_counter() - self.t0)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{trainer.lr:.3g}", img_s=f"{rate:.2f}")
        s = trainer.state
        if self.lines and (s.global_step + 1) % self.EVERY == 0:
            log.info("epoch %d step %d/%d (%d images): loss %.4f lr %.3g, %.2f images/s", s.epoch + 1,
                     s.step_in_epoch + 1, trainer.steps_per_epoch(), trainer.images_seen(s.global_step + 1), loss,
                     trainer.lr, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
