"""Training recipes as data: named, printed and saved with every run, every field overridable from the CLI."""

from __future__ import annotations

import dataclasses
import json
import math


@dataclasses.dataclass(frozen=True)
class Stage:
    """Epochs [previous stage's end, until) train with this loss alpha and base learning rate."""

    until: int
    alpha: float
    lr: float


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    stages: tuple[Stage, ...]
    batch_size: int
    size: int = 256
    lr_decay: str = "none"  # "none" | "official": lr * 0.5 ** floor((epoch + 1) / 6.25) | "cosine" over the run
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
    description: str = ""

    @property
    def epochs(self) -> int:
        return self.stages[-1].until

    def stage(self, epoch: int) -> Stage:
        for s in self.stages:
            if epoch < s.until:
                return s
        return self.stages[-1]

    def lr(self, epoch: int) -> float:
        """Learning rate of a (0-based) epoch."""
        s = self.stage(epoch)
        if self.lr_decay == "official":
            return s.lr * 0.5 ** math.floor((epoch + 1) / 6.25)
        if self.lr_decay == "cosine":
            return s.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        if self.lr_decay != "none":
            raise ValueError(f"unknown lr_decay {self.lr_decay!r}")
        return s.lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d)
        d["stages"] = tuple(Stage(**s) for s in d["stages"])
        return cls(**d)

    def override(self, **changes) -> "Recipe":
        """A copy with some fields replaced; `epochs`, `alpha` and `lr` reshape the stages."""
        changes = {k: v for k, v in changes.items() if v is not None}
        stages = list(self.stages)
        if "epochs" in changes:  # stretch the stages proportionally to the new length
            total = changes.pop("epochs")
            ends = [max(1, round(s.until * total / self.epochs)) for s in stages]
            ends[-1] = total
            stages = [dataclasses.replace(s, until=e) for s, e in zip(stages, ends)]
        if "alpha" in changes:  # one alpha for every stage
            alpha = changes.pop("alpha")
            stages = [dataclasses.replace(s, alpha=alpha) for s in stages]
        if "lr" in changes:
            scale = changes.pop("lr") / stages[0].lr
            stages = [dataclasses.replace(s, lr=s.lr * scale) for s in stages]
        return dataclasses.replace(self, stages=tuple(stages), **changes)


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
}
