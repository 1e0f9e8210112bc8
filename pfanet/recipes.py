"""Training recipes as data: named, printed and saved with every run, every field overridable from the CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

from .loss import IOU_MODES

LR_DECAYS = ("none", "official", "cosine")
OPTIMIZERS = ("sgd", "adamw")
# What a mask pixel m (0..255) becomes as a training target:
#   "official": m / max(mask), as the official code (a mask whose brightest pixel is 200 still reaches 1);
#   "soft":     m / 255, so a grey edge stays a probability and the 0.5 level is the evaluation's threshold 128;
#   "binary":   1 where m > 128 (pysodmetrics binarises ground truth exactly so), else 0.
TARGETS = ("official", "soft", "binary")
# How the target is resampled to the network's size:
#   "nearest":  nearest neighbour with floor (source floor(i * side / size)), as the official cv2 INTER_NEAREST;
#               the target then sits (side / size - 1) / 2 source pixels up-left of the image's bilinear
#               half-pixel grid, about half an output pixel at DUTS-TR's downscaling;
#   "bilinear": the image's own bilinear half-pixel taps, so image and target are on one grid.
TARGET_RESIZES = ("nearest", "bilinear")


@dataclasses.dataclass(frozen=True)
class Stage:
    """Epochs [previous stage's end, until) train with this loss alpha and base learning rate."""

    until: int
    alpha: float
    lr: float


def parse_stages(text: str) -> tuple[Stage, ...]:
    """"UNTIL:ALPHA:LR,..." -> stages, e.g. "25:1.0:1e-2,50:0.7:1e-3" (the paper's two stages)."""
    stages = []
    for part in text.split(","):
        fields = part.strip().split(":")
        if len(fields) != 3:
            raise ValueError(f"stage {part!r}: expected UNTIL:ALPHA:LR, e.g. 25:1.0:1e-2")
        stages.append(Stage(int(fields[0]), float(fields[1]), float(fields[2])))
    return tuple(stages)


def parse_size_schedule(text: str) -> tuple[tuple[int, int], ...]:
    """"UNTIL:SIZE,..." -> ((until, size), ...), e.g. "14:128,17:192": epochs 1-14 at 128, 15-17 at 192."""
    if not text.strip():
        return ()
    out = []
    for part in text.split(","):
        fields = part.strip().split(":")
        if len(fields) != 2 or not all(f.strip().isdigit() for f in fields):
            raise ValueError(f"size_schedule {part!r}: expected UNTIL:SIZE, e.g. 14:128")
        out.append((int(fields[0]), int(fields[1])))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides what a training run computes (the mechanics, such as workers, live elsewhere).

    `batch_size` is per process: under torchrun with N processes the global batch is N x batch_size.
    """

    name: str
    stages: tuple[Stage, ...]
    batch_size: int
    size: int = 256
    lr_decay: str = "none"  # see `lr`
    momentum: float = 0.9
    weight_decay: float = 0.0
    dropout: bool = True
    norm: str = "per-image"
    edge_mode: str = "relu"
    iou: str = "none"  # an IoU term added to the paper's loss (pfanet.loss.IOU_MODES; not in the paper)
    ca_regulariser: bool = True
    backbone: str = "hed"
    freeze_blocks: int = 0  # VGG blocks 1..n kept fixed (0: all trainable)
    augment: bool = True
    saturation: bool = False  # the paper's saturation jitter (not in the official code)
    init: str = ""  # a whole-PFANet weights file to start from (fine-tuning); then `backbone` is not read
    optimizer: str = "sgd"
    warmup_steps: int = 0  # linear warm-up of the learning rate from 0 over the first N steps
    decay_norm_bias: bool = False  # weight decay also on biases and norm weights (off: convolution/dense weights only)
    targets: str = "official"  # see TARGETS
    target_resize: str = "nearest"  # see TARGET_RESIZES
    size_schedule: str = ""  # "UNTIL:SIZE,..." input sizes of the epochs before `size`, e.g. "14:128,17:192"
    # BatchNorm's running-statistics update rate under norm "batch" (Keras' momentum 0.99 is 0.01 here). The
    # running statistics are what prediction uses; at 0.01 they lag a fast-changing network by hundreds of steps
    # (cpu-duts at 0.01 after 200 steps, 16 DUTS-TR val images: MAE 0.32 with them, 0.16 with the batch's own).
    bn_momentum: float = 0.01
    # Validate, keep and ship an exponential moving average of the weights with this decay (pfanet.ema; 0: the
    # weights themselves). Training itself is the same either way.
    ema: float = 0.0
    description: str = ""

    def __post_init__(self):
        problems = []
        if not self.stages:
            problems.append("no stages")
        ends = [s.until for s in self.stages]
        if any(b < a for a, b in itertools.pairwise(ends)) or (ends and ends[-1] < 1):
            problems.append(f"stage ends {ends} must be non-decreasing and reach at least 1 epoch")
        for s in self.stages:
            if not 0.0 <= s.alpha <= 1.0:
                problems.append(f"alpha {s.alpha} is outside [0, 1]")
            if not s.lr > 0:
                problems.append(f"learning rate {s.lr} must be positive")
        if self.batch_size < 1:
            problems.append(f"batch_size {self.batch_size} must be at least 1")
        if self.size < 32 or self.size % 32:
            problems.append(f"size {self.size} must be a positive multiple of 32")
        if self.lr_decay not in LR_DECAYS:
            problems.append(f"lr_decay {self.lr_decay!r} is not one of {LR_DECAYS}")
        if not 0 <= self.freeze_blocks <= 5:
            problems.append(f"freeze_blocks {self.freeze_blocks} is outside 0..5")
        for field, allowed in (("optimizer", OPTIMIZERS), ("targets", TARGETS), ("target_resize", TARGET_RESIZES),
                               ("iou", IOU_MODES)):
            if getattr(self, field) not in allowed:
                problems.append(f"{field} {getattr(self, field)!r} is not one of {allowed}")
        if not 0 < self.bn_momentum <= 1:
            problems.append(f"bn_momentum {self.bn_momentum} is outside (0, 1]")
        if not 0 <= self.ema < 1:
            problems.append(f"ema {self.ema} is outside [0, 1)")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps {self.warmup_steps} must be at least 0")
        try:
            for until, size in parse_size_schedule(self.size_schedule):
                if size < 32 or size % 32:
                    problems.append(f"size_schedule size {size} must be a positive multiple of 32")
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError(f"recipe {self.name!r}: " + "; ".join(problems))

    @property
    def epochs(self) -> int:
        return self.stages[-1].until

    def stage(self, epoch: int) -> Stage:
        for s in self.stages:
            if epoch < s.until:
                return s
        return self.stages[-1]

    def size_at(self, epoch: int) -> int:
        """Input size of a (0-based) epoch: the size schedule's, then `size` (the size the model ships at)."""
        for until, size in parse_size_schedule(self.size_schedule):
            if epoch < until:
                return size
        return self.size

    def lr(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        """Learning rate at step `step` of a (0-based) epoch: the stage's base rate, decayed by `lr_decay`, times
        the warm-up ramp. With t = epoch + step / steps_per_epoch (the run's position in epochs):

        - "none": constant within a stage;
        - "official": the official train.py's per-epoch step decay, lr * 0.5 ** floor((epoch + 1) / (epochs / 8))
          (halved 8 times over the run; with its 50 epochs, every 6.25);
        - "cosine": lr * (1 + cos(pi * t / epochs)) / 2, updated every step (a DUTS-TR epoch is hours on a CPU).

        A function of the position alone, so a resumed run follows the schedule exactly.
        """
        s = self.stage(epoch)
        t = epoch + step / steps_per_epoch
        if self.lr_decay == "official":
            rate = s.lr * 0.5 ** math.floor((epoch + 1) / (self.epochs / 8))
        elif self.lr_decay == "cosine":
            rate = s.lr * 0.5 * (1 + math.cos(math.pi * t / self.epochs))
        else:
            rate = s.lr
        global_step = epoch * steps_per_epoch + step
        if global_step < self.warmup_steps:
            rate *= (global_step + 1) / self.warmup_steps
        return rate

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        """From `to_dict` output (e.g. a run's recipe.json); fields added later take their defaults."""
        d = dict(d)
        d["stages"] = tuple(Stage(**s) for s in d["stages"])
        return cls(**d)

    def override(self, **changes) -> Recipe:
        """A copy with some fields replaced (None means "keep").

        Besides the fields themselves: `stages` may be a "UNTIL:ALPHA:LR,..." string; `epochs` stretches the stages
        proportionally to the new length; `alpha` sets one alpha for every stage; `lr` sets the first stage's base
        rate and scales the later stages' by the same factor (the paper's 1e-2 then 1e-3 keeps its 10x step).
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        stages = changes.pop("stages", self.stages)
        stages = list(parse_stages(stages) if isinstance(stages, str) else stages)
        if "epochs" in changes:
            total = changes.pop("epochs")
            if total < 1:
                raise ValueError(f"epochs must be at least 1, got {total}")
            old = stages[-1].until
            ends = [min(total, max(1, round(s.until * total / old))) for s in stages]
            ends[-1] = total
            stages = [dataclasses.replace(s, until=e) for s, e in zip(stages, ends)]
        if "alpha" in changes:
            alpha = changes.pop("alpha")
            stages = [dataclasses.replace(s, alpha=alpha) for s in stages]
        if "lr" in changes:
            scale = changes.pop("lr") / stages[0].lr
            stages = [dataclasses.replace(s, lr=s.lr * scale) for s in stages]
        return dataclasses.replace(self, stages=tuple(stages), **changes)

    def differences(self, other: Recipe, ignore: tuple[str, ...] = ()) -> list[str]:
        """"field: mine -> other's" for each field that differs (the description and `ignore` aside)."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]} -> {b[k]}" for k in a if k != "description" and k not in ignore and a[k] != b[k]]


CPU_DUTS = Recipe(
    "cpu-duts", stages=(Stage(3, 1.0, 2e-4), Stage(4, 0.7, 2e-4)), batch_size=8, size=160,
    size_schedule="3:128", lr_decay="cosine", warmup_steps=200, optimizer="adamw", weight_decay=1e-2,
    norm="batch", bn_momentum=0.1, freeze_blocks=2, backbone="hed", targets="soft", target_resize="bilinear",
    description="The default model: DUTS-TR on a 2-core CPU from the HED VGG16 in about 12 hours "
                "(docs/TRAINING.md gives the reasons for each choice). AdamW 2e-4 with 200 warm-up steps and a "
                "per-step cosine over 4 epochs (40,200 images), standard BatchNorm (running statistics at "
                "momentum 0.1), blocks 1-2 frozen, epochs 1-3 at 128x128 with alpha 1.0, epoch 4 at 160 (the "
                "size it ships at) with alpha 0.7, soft targets (mask/255) on the image's grid.",
)


RECIPES = {
    "paper": Recipe(
        "paper", stages=(Stage(25, 1.0, 1e-2), Stage(50, 0.7, 1e-3)), batch_size=22, size=256,
        backbone="imagenet",
        description="Paper Sec. 4.2: stage 1 alpha=1.0 lr 1e-2, stage 2 alpha=0.7 lr 1e-3, batch 22, 256x256. "
                    "The paper trains 'until the loss converges'; 25 + 25 epochs is our choice.",
    ),
    "official": Recipe(
        "official", stages=(Stage(50, 0.7, 1e-2),), batch_size=15, size=256, lr_decay="official",
        backbone="imagenet",
        description="Official train.py: SGD lr 1e-2 momentum 0.9, batch 15, 50 epochs, "
                    "lr = 1e-2 * 0.5^floor((epoch+1)/6.25), alpha 0.7, dropout.",
    ),
    "cpu-duts": CPU_DUTS,
    "cpu-duts-192": CPU_DUTS.override(
        name="cpu-duts-192", stages=(Stage(3, 0.7, 1e-4),), size=192, size_schedule="",
        description="Second phase of the default model, the rest of the 12-hour CPU budget: pass --init with "
                    "cpu-duts' final checkpoint (4 epochs ran in about 7 hours on an AVX2 CPU). Three epochs at "
                    "192x192 (borders are where the 160-px model loses most), alpha 0.7, AdamW restarted at 1e-4 "
                    "with 200 warm-up steps and a per-step cosine; otherwise cpu-duts. Run with --bf16 "
                    "--channels-last on a CPU with AVX512_BF16 or AMX (2.3x there).",
    ),
    "cpu-duts-iou": CPU_DUTS.override(
        name="cpu-duts-iou", stages=(Stage(24, 0.7, 1e-4),), size=192, size_schedule="", iou="soft", ema=0.99,
        description="The default model's campaign (issue 20, from 2026-12-06): pass --init with the shipped model. "
                    "The paper's loss plus 1 - soft IoU (BASNet), and the moving average of the weights (decay "
                    "0.99) validated and shipped: from the shipped model, 4,000 DUTS-TR images, they gave DUTS-TR "
                    "val (200) MAE 0.0997 -> 0.0759 and max F 0.8685 -> 0.8725 over the paper's loss alone "
                    "(docs/TRAINING.md, 'The campaign'). 24 epochs (about 241,000 images) at 192x192, alpha 0.7, "
                    "AdamW 1e-4 with 200 warm-up steps and a per-step cosine; otherwise cpu-duts. Run with --bf16 "
                    "--channels-last on a CPU with AVX512_BF16 or AMX.",
    ),
    "cpu-ecssd": Recipe(
        "cpu-ecssd", stages=(Stage(3, 1.0, 1e-2), Stage(12, 0.7, 1e-2)), batch_size=8, size=192,
        lr_decay="cosine", weight_decay=5e-4, freeze_blocks=3, backbone="hed",
        description="The shipped model: ECSSD train (700 images) on a 2-core CPU from the HED VGG16. Blocks 1-3 "
                    "frozen (the costliest backward, at high resolution), 192x192, alpha 1.0 for 3 epochs then 0.7, "
                    "cosine lr over 12 epochs.",
    ),
    "cpu-ecssd-ft": Recipe(
        "cpu-ecssd-ft", stages=(Stage(6, 1.0, 5e-3),), batch_size=8, size=192, lr_decay="cosine",
        weight_decay=5e-4, freeze_blocks=3, backbone="hed",
        description="Second phase of the shipped model: pass --init with cpu-ecssd's best epoch (3, chosen on val); "
                    "alpha stays 1.0 (cpu-ecssd's switch to 0.7 set val back), lr 5e-3 cosine over 6 epochs.",
    ),
}
