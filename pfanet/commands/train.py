"""`pfanet train`: a named recipe, every value overridable, under torchrun too (`pfanet.training`).

The flags are made from the fields of `Recipe` (what a run computes: the "recipe overrides") and of `TrainOptions`
(data, run folder, mechanics). A field's type and default give its flag's type, action and default; `RECIPE`,
`OPTIONS` and `STAGE_KEYWORDS` add what they cannot say (help, choices, a metavar, another spelling), so a field added
to either class is a flag at once, and each flag's value goes back to its field by name (`recipe_overrides`,
`train_options`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from ..loss import EDGE_MODES, IOU_MODES
from ..model import NORM_MODES
from ..recipes import LR_DECAYS, OPTIMIZERS, RECIPES, TARGET_RESIZES, TARGETS, Recipe


@dataclasses.dataclass(frozen=True)
class Flag:
    """What a field's flag needs beyond the field's type and default."""

    help: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    names: tuple[str, ...] = ()  # its spellings, when not --field-name
    top: bool = False  # a TrainOptions field among the command's own flags rather than under "mechanics"


# Recipe fields. A field without an entry gets a bare flag (--field-name, its type, no help).
RECIPE = {
    "stages": Flag("the stages in full, e.g. 25:1.0:1e-2,50:0.7:1e-3 (the paper's)", metavar="UNTIL:ALPHA:LR,..."),
    "size": Flag("training resolution (multiple of 32)"),
    "lr_decay": Flag("cosine is updated every step", choices=LR_DECAYS),
    "warmup_steps": Flag("linear learning-rate warm-up over the first N steps"),
    "optimizer": Flag(choices=OPTIMIZERS),
    "decay_norm_bias": Flag("weight decay also on biases and norm weights (default: off)"),
    "targets": Flag("mask -> target: official mask/max, soft mask/255, binary mask>128 (as evaluation)",
                    choices=TARGETS),
    "target_resize": Flag("nearest (official; half an output pixel off the image) or bilinear (on the image's grid)",
                          choices=TARGET_RESIZES),
    "size_schedule": Flag("input sizes before the final --size, e.g. 14:128,17:192 (epochs 1-14 at 128, 15-17 at "
                          "192)", metavar="UNTIL:SIZE,..."),
    "bn_momentum": Flag("BatchNorm running-statistics rate under --norm batch (default 0.01, Keras' 0.99)"),
    "norm": Flag(choices=NORM_MODES),
    "edge_mode": Flag("relu (official) or abs (paper Eq. 9)", choices=EDGE_MODES),
    "iou": Flag("add an IoU term to the paper's loss: soft (BASNet) or structure (F3Net); default none",
                choices=IOU_MODES),
    "ema": Flag("validate, keep and ship a moving average of the weights with this decay (e.g. 0.99; 0: off, the "
                "default)", metavar="DECAY"),
    "backbone": Flag("hed | imagenet | a .weights.h5 / torchvision .pth / .safetensors file"),
    "freeze_blocks": Flag("keep VGG blocks 1..N fixed"),
    "init": Flag("start from a PFANet weights file (.safetensors/.h5/.pth) instead of a bare backbone: fine-tuning"),
    "saturation": Flag("the paper's saturation jitter"),
    "ca_regulariser": Flag("the official activity regulariser on the channel attention"),
}
# Recipe fields a named recipe sets as a whole: chosen with --recipe, never overridden one by one.
BY_NAME = Flag("named recipe (default cpu-duts, the default model's)", choices=tuple(sorted(RECIPES)),
               names=("--recipe",))
BY_NAME_FIELDS = frozenset({"name", "description"})
# Recipe.override's own keywords beside the fields: they reshape `stages`. (keyword: (type, flag))
STAGE_KEYWORDS = {
    "epochs": (int, Flag("total epochs (the stages are stretched to fit)")),
    "lr": (float, Flag("base learning rate (later stages scale with it)")),
    "alpha": (float, Flag("edge loss weight alpha for every stage")),
}
# TrainOptions fields. A field without an entry gets a bare flag under "mechanics".
OPTIONS = {
    "train": Flag("training data: list files ('image mask' per line) or benchmark folders", metavar="LIST_OR_DIR",
                  names=("--data",), top=True),
    "out": Flag("run folder (checkpoints, logs)", names=("-o", "--out"), top=True),
    "val": Flag("validation data (MAE, max F)", metavar="LIST_OR_DIR", top=True),
    "resume": Flag("continue the run in --out from its state.pt, with its recipe.json and seed", top=True),
    "reschedule": Flag("with --resume: take a new schedule (stages/epochs, size, size schedule, batch per process) "
                       "-- the run's own with the overrides, or --recipe's as now defined -- from the run's current "
                       "position on; nothing else may change", top=True),
    "val_every": Flag("validate every N epochs (default 1)"),
    "val_steps": Flag("also validate every N steps within an epoch (default 0: epoch ends only)"),
    "val_limit": Flag("validate on N evenly spaced pairs of each --val source"),
    "save_every": Flag("keep epoch_N.safetensors every N epochs (default 5)"),
    "save_steps": Flag("also checkpoint every N steps within an epoch (default 0: epoch ends only)"),
    "seed": Flag("default 0; on --resume the run's own"),
    "workers": Flag("DataLoader decoding processes (default 2)"),
    "cache": Flag("keep decoded images in memory"),
    "max_steps": Flag("stop (with a checkpoint) after N steps in this process"),
    "max_minutes": Flag("stop (with a checkpoint) after M minutes of training in this process (a rented GPU's time)"),
    "limit": Flag("use only the first N training pairs"),
    "device": Flag("cpu, cuda, cuda:1 ... (default: cuda when present)"),
    "compile": Flag("torch.compile the network"),
    "channels_last": Flag("default: on a GPU"),
    "bf16": Flag("bf16 autocast; default: on a GPU"),
    "progress": Flag("no progress bar"),
    "collective_timeout": Flag("under torchrun, how long a rank waits for the others, e.g. while rank 0 validates "
                               "(default 7200)", metavar="SECONDS"),
}


def add(sub) -> None:
    from ..training import TrainOptions

    p = sub.add_parser(
        "train", help="train PFANet",
        description="Train PFANet with a named recipe; every recipe value can be overridden. Runs under torchrun "
                    "for several processes (DistributedDataParallel; only rank 0 writes).",
        epilog="recipes:\n" + "\n".join(f"  {k}: {r.description}" for k, r in RECIPES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(p, "recipe", str, BY_NAME, override=True)
    g = p.add_argument_group("recipe overrides")
    for keyword, (kind, flag) in STAGE_KEYWORDS.items():
        add_flag(g, keyword, kind, flag, override=True)
    hints = typing.get_type_hints(Recipe)
    for field in dataclasses.fields(Recipe):
        if field.name not in BY_NAME_FIELDS:
            add_flag(g, field.name, hints[field.name], RECIPE.get(field.name, Flag()), override=True)
    m = p.add_argument_group("mechanics")
    hints = typing.get_type_hints(TrainOptions)
    for field in dataclasses.fields(TrainOptions):
        flag = OPTIONS.get(field.name, Flag())
        add_flag(p if flag.top else m, field.name, hints[field.name], flag, default=_default(field))
    p.set_defaults(func=run)


def add_flag(group, name: str, kind, flag: Flag, override: bool = False, default=dataclasses.MISSING) -> None:
    """One field as a flag. Its type says the action: a bool is a switch, a list takes several values, a number
    its type, anything else a string (`stages` is parsed by `Recipe.override`). A recipe override defaults to None
    (keep the recipe's; a bool gets --x and --no-x); a TrainOptions field to its own default, and is required
    without one. A bool that is on by default is turned off with --no-NAME."""
    base, optional = _base(kind)
    names = flag.names or (f"--{name.replace('_', '-')}",)
    extra = {k: v for k, v in {"help": flag.help, "choices": flag.choices, "metavar": flag.metavar}.items()
             if v is not None}
    required = not override and default is dataclasses.MISSING
    value = None if override or required else default
    if base is bool and (override or optional):
        group.add_argument(*names, dest=name, action=argparse.BooleanOptionalAction, default=value, **extra)
    elif base is bool and default:
        group.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false", **extra)
    elif base is bool:
        group.add_argument(*names, dest=name, action="store_true", **extra)
    elif base is list:
        group.add_argument(*names, dest=name, nargs="+" if required else "*", required=required, default=value,
                           **extra)
    else:
        group.add_argument(*names, dest=name, type=None if base is str else base, required=required, default=value,
                           **extra)


def _base(kind) -> tuple[type, bool]:
    """A field's annotation -> (bool, int, float, list or str; whether None is allowed too)."""
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        others = [k for k in typing.get_args(kind) if k is not type(None)]
        return _base(others[0])[0], len(others) < len(typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return list, False
    return (kind if kind in (bool, int, float) else str), False


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def recipe_overrides(args) -> dict:
    """The recipe overrides as `Recipe.override` takes them (None: not given, keep the recipe's)."""
    names = [*STAGE_KEYWORDS, *(f.name for f in dataclasses.fields(Recipe) if f.name not in BY_NAME_FIELDS)]
    return {k: getattr(args, k) for k in names}


def train_options(args):
    """The `TrainOptions` the flags give (each flag's destination is its field's name)."""
    from ..training import TrainOptions

    return TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)})


def run(args) -> int:
    """Exit status: 0 done (or --max-steps reached), 2 bad arguments or data, 3 the loss became NaN/Inf,
    128 + N stopped by signal N (SIGINT 130, SIGTERM 143) with a checkpoint to --resume from."""
    from ..train import Trainer, TrainingStopped, recipe_for_run

    overrides = recipe_overrides(args)
    opts = train_options(args)
    try:
        recipe = recipe_for_run(args.recipe, overrides, args.out, args.resume, args.reschedule)
        print(f"recipe {recipe.name}:\n{recipe.to_json()}", file=sys.stderr)
        trainer = Trainer(recipe, opts)
        trainer.run()
    except ValueError as e:  # a recipe or option that cannot work, named in the message
        print(f"pfanet train: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"pfanet train: {e}", file=sys.stderr)
        return 3
    print(f"run folder: {args.out}", file=sys.stderr)
    return 128 + trainer.stopped_by if trainer.stopped_by else 0
