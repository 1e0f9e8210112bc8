"""Training: recipes, resumable checkpoints, validation, logs; one process or several under torchrun.

A run folder holds:
    recipe.json          the recipe, as run
    state.pt             weights + optimizer + scheduler position + RNG state (tensors only, read weights_only=True)
    last.safetensors     the latest weights in our format; best.safetensors the best on validation
    epoch_NNNN.safetensors every `save_every` epochs
    log.csv, tb/         per-epoch CSV log and TensorBoard events
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import pathlib
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .data import Augment, SaliencyDataset, collate, read_pairs
from .loss import activity_regulariser, edge_hold_loss
from .model import PFANet, PFANetConfig
from .recipes import Recipe
from .transforms import InputSpec
from .weights import atomic_write, load_backbone, save_checkpoint

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainOptions:
    """What a run needs beyond the recipe: data, output, and the mechanics."""

    train: list[str]
    out: str
    val: list[str] = dataclasses.field(default_factory=list)
    val_every: int = 1
    save_every: int = 5
    save_steps: int = 0  # also write state.pt every N steps within an epoch (0: only at epoch ends)
    resume: bool = False
    seed: int = 0
    workers: int = 2
    cache: bool = False
    max_steps: int | None = None  # stop after this many optimizer steps in this process (tests, probes)
    device: str | None = None
    compile: bool = False
    channels_last: bool | None = None  # default: on a GPU
    bf16: bool | None = None  # autocast; default: on a GPU
    limit: int | None = None  # use only the first N training pairs


class EpochSampler(torch.utils.data.Sampler):
    """The epoch's permutation from (seed, epoch), this rank's share of it, from a given position onwards.

    Deterministic, so a run resumed mid-epoch sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.n // self.world  # drop the remainder so ranks do the same number of steps
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self):
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return len(self.order()) - self.start


def setup_distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def freeze_blocks(model: PFANet, n: int) -> None:
    for name, conv in model.backbone.convs.items():
        if int(name[4]) <= n:
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
    def __init__(self, recipe: Recipe, opts: TrainOptions):
        self.recipe, self.opts = recipe, opts
        self.rank, self.world = setup_distributed()
        self.main = self.rank == 0
        if opts.device:
            self.device = torch.device(opts.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            self.device = torch.device("cpu")
        gpu = self.device.type == "cuda"
        self.channels_last = gpu if opts.channels_last is None else opts.channels_last
        self.bf16 = gpu if opts.bf16 is None else opts.bf16
        self.out = pathlib.Path(opts.out)
        self.stop_signal: int | None = None

        torch.manual_seed(opts.seed)
        config = PFANetConfig(dropout=recipe.dropout, norm=recipe.norm)
        self.model = PFANet(config)
        self.spec = dataclasses.replace(load_backbone(self.model, recipe.backbone), size=recipe.size)
        freeze_blocks(self.model, recipe.freeze_blocks)
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=recipe.lr(0), momentum=recipe.momentum,
                                         weight_decay=recipe.weight_decay)
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(self.model)
        if opts.compile:
            self.net = torch.compile(self.net)

        pairs = read_pairs(opts.train[0]) if len(opts.train) == 1 else sum((read_pairs(t) for t in opts.train), [])
        if opts.limit:
            pairs = pairs[: opts.limit]
        augment = Augment(saturation=(0.5, 1.5) if recipe.saturation else None) if recipe.augment else None
        self.dataset = SaliencyDataset(pairs, self.spec, augment, seed=opts.seed, cache=opts.cache)
        self.sampler = EpochSampler(len(pairs), opts.seed, self.rank, self.world)
        self.val_pairs = sum((read_pairs(v) for v in opts.val), [])
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best: float | None = None
        self.bad_pairs: set[str] = set()

    # ---- checkpoints ------------------------------------------------------------------------------------------------

    def training_meta(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "epoch": self.epoch, "seed": self.opts.seed,
                "train": [str(t) for t in self.opts.train], "val": [str(v) for v in self.opts.val]}

    def save_state(self) -> None:
        """state.pt (resumable) and last.safetensors, both written atomically."""
        if not self.main:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "torch_rng": torch.get_rng_state(),
            "best": self.best if self.best is not None else float("nan"),
            "recipe": self.recipe.to_json(),
        }
        atomic_write(self.out / "state.pt", lambda tmp: torch.save(state, tmp))
        save_checkpoint(self.out / "last.safetensors", self.model, self.spec, self.training_meta())

    def load_state(self) -> None:
        path = self.out / "state.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: nothing to resume (no state.pt in {self.out})")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if json.loads(state["recipe"]) != json.loads(self.recipe.to_json()):
            raise ValueError(f"{path}: the run was started with a different recipe; resume with the same settings")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.best = None if math.isnan(state["best"]) else state["best"]
        torch.set_rng_state(state["torch_rng"])

    # ---- the loop ---------------------------------------------------------------------------------------------------

    def loader(self) -> torch.utils.data.DataLoader:
        self.dataset.set_epoch(self.epoch)
        self.sampler.set_position(self.epoch, self.step_in_epoch * self.recipe.batch_size)
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.recipe.batch_size, sampler=self.sampler, collate_fn=collate,
            num_workers=self.opts.workers, drop_last=True, persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            logits = self.net(x)
        loss = edge_hold_loss(logits.float(), y, alpha, edge_mode=self.recipe.edge_mode)
        if self.recipe.ca_regulariser:
            loss = loss + activity_regulariser(self.model.channel_attention_weights())
        return loss

    def handle_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def run(self) -> pathlib.Path:
        """Train to the end of the recipe (or max_steps / a signal). Returns the run folder."""
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.json").write_text(self.recipe.to_json())
        if self.opts.resume:
            self.load_state()
            log.info("resumed %s at epoch %d step %d", self.out, self.epoch, self.step_in_epoch)
        old_handlers = {s: signal.signal(s, self.handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.loop()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if self.bad_pairs and self.main:
                log.warning("%d training pairs could not be used and were skipped", len(self.bad_pairs))
        return self.out

    def loop(self) -> None:
        steps_here = 0
        writer = self.tensorboard()
        while self.epoch < self.recipe.epochs:
            stage = self.recipe.stage(self.epoch)
            lr = self.recipe.lr(self.epoch)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            if self.step_in_epoch == 0:  # dropout draws from (seed, epoch); mid-epoch, the restored RNG state
                torch.manual_seed(self.opts.seed * 100_003 + self.epoch)
            self.model.train()
            loader = self.loader()
            total_steps = len(self.sampler.order()) // self.recipe.batch_size
            bar = tqdm(loader, total=total_steps, initial=self.step_in_epoch, disable=not self.main,
                       desc=f"epoch {self.epoch + 1}/{self.recipe.epochs}", dynamic_ncols=True)
            losses, seen, t0 = [], 0, time.perf_counter()
            for x, y, errors in bar:
                for err in errors:
                    if err not in self.bad_pairs:
                        self.bad_pairs.add(err)
                        log.warning("skipping bad pair: %s", err)
                if x is not None:
                    loss = self.loss(x, y, stage.alpha)
                    if not torch.isfinite(loss):
                        raise TrainingStopped(
                            f"loss became {loss.item()} at epoch {self.epoch + 1} step {self.step_in_epoch + 1}; "
                            f"the last good checkpoint is kept in {self.out}")
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    losses.append(loss.item())
                    seen += len(x) * self.world
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{lr:.2g}",
                                    img_s=f"{seen / (time.perf_counter() - t0):.2f}")
                self.step_in_epoch += 1
                self.global_step += 1
                steps_here += 1
                if self.opts.save_steps and self.step_in_epoch % self.opts.save_steps == 0:
                    self.save_state()
                if self.stop_signal is not None or (self.opts.max_steps and steps_here >= self.opts.max_steps):
                    self.save_state()
                    if self.stop_signal is not None:
                        log.warning("signal %d: checkpoint written to %s, stopping", self.stop_signal, self.out)
                    return
            bar.close()
            self.end_epoch(np.mean(losses) if losses else float("nan"), lr, stage.alpha,
                           seen / (time.perf_counter() - t0), writer)

    def end_epoch(self, train_loss: float, lr: float, alpha: float, img_s: float, writer) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        row = {"epoch": self.epoch, "loss": train_loss, "lr": lr, "alpha": alpha, "images_per_s": img_s}
        if self.main and self.val_pairs and (self.epoch % self.opts.val_every == 0 or self.epoch == self.recipe.epochs):
            scores = validate(self.model, self.spec, self.val_pairs, self.device)
            row.update({"val_mae": scores["mae"], "val_maxF": scores["maxF"]})
            if self.best is None or scores["maxF"] > self.best:
                self.best = scores["maxF"]
                save_checkpoint(self.out / "best.safetensors", self.model, self.spec,
                                {**self.training_meta(), "val": {"mae": scores["mae"], "maxF": scores["maxF"]}})
            log.info("epoch %d: loss %.4f  val MAE %.4f  max F %.4f", self.epoch, train_loss, scores["mae"],
                     scores["maxF"])
        if self.main:
            self.append_log(row, writer)
            if self.epoch % self.opts.save_every == 0:
                save_checkpoint(self.out / f"epoch_{self.epoch:04d}.safetensors", self.model, self.spec,
                                self.training_meta())
        self.save_state()

    def append_log(self, row: dict, writer) -> None:
        path = self.out / "log.csv"
        fields = ["epoch", "loss", "lr", "alpha", "images_per_s", "val_mae", "val_maxF"]
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new:
                w.writeheader()
            w.writerow(row)
        if writer is not None:
            for k, v in row.items():
                if k != "epoch":
                    writer.add_scalar(k, v, self.epoch)
            writer.flush()

    def tensorboard(self):
        if not self.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard not installed: no event files, log.csv only")
            return None
        return SummaryWriter(str(self.out / "tb"))


def train(recipe: Recipe, opts: TrainOptions) -> pathlib.Path:
    return Trainer(recipe, opts).run()
