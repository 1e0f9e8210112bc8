"""Training recipes as data: named, printed and saved with every run, every field overridable from the CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

LR_DECAYS = ("none", "official", "cosine")


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
    ca_regulariser: bool = True
    backbone: str = "hed"
    freeze_blocks: int = 0  # VGG blocks 1..n kept fixed (0: all trainable)
    augment: bool = True
    saturation: bool = False  # the paper's saturation jitter (not in the official code)
    init: str = ""  # a whole-PFANet weights file to start from (fine-tuning); then `backbone` is not read
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

    def lr(self, epoch: int) -> float:
        """Learning rate of a (0-based) epoch: the stage's base rate, decayed by `lr_decay`:

        - "none": constant within a stage;
        - "official": the official train.py's step decay, lr * 0.5 ** floor((epoch + 1) / (epochs / 8)) (halved
          8 times over the run; with its 50 epochs, every 6.25);
        - "cosine": lr * (1 + cos(pi * epoch / epochs)) / 2 over the whole run.
        """
        s = self.stage(epoch)
        if self.lr_decay == "official":
            return s.lr * 0.5 ** math.floor((epoch + 1) / (self.epochs / 8))
        if self.lr_decay == "cosine":
            return s.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        return s.lr

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

    def differences(self, other: Recipe) -> list[str]:
        """"field: mine -> other's" for each field that differs (the description aside)."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]} -> {b[k]}" for k in a if k != "description" and a[k] != b[k]]


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
