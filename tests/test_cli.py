"""The command line's shape: one set of prediction options for every prediction command, `pfanet --version`. (That
the library never imports the command line back, in any form, is tests/test_imports.py's.)"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from pfanet import __version__
from pfanet.cli import build_parser, main, predict_options
from pfanet.options import PredictOptions

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = ["--weights", "w.safetensors", "--device", "cpu", "--backend", "torch", "--flip", "--batch-size", "3",
          "--outputs", "map,cutout", "--threshold", "128", "--format", "webp", "--overwrite"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"pfanet {__version__}"
    run = subprocess.run([sys.executable, "-m", "pfanet", "--version"], capture_output=True, text=True, check=False)
    assert run.returncode == 0 and run.stdout.strip() == f"pfanet {__version__}"


@pytest.mark.parametrize("command", [["predict", "x.jpg", "-o", "out"], ["predict-shard", "x.jpg", "-o", "out"],
                                     ["predict-ray", "--input", "x", "--output", "out"]])
def test_prediction_commands_share_one_set_of_options(command):
    options = predict_options(build_parser().parse_args(command + SHARED))
    assert options == PredictOptions("w.safetensors", "cpu", "torch", 3, ("map", "cutout"), "webp", 128.0, True,
                                     flip=True)


def test_defaults_and_serve():
    parser = build_parser()
    assert predict_options(parser.parse_args(["predict", "x.jpg"])) == PredictOptions()
    assert predict_options(parser.parse_args(["predict-ray", "--input", "x", "--output", "y"])).batch_size == 8
    serve = predict_options(parser.parse_args(["serve", *SHARED[:7]]))  # the model's options only
    assert serve == PredictOptions("w.safetensors", "cpu", "torch", flip=True)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--outputs", "map"])
    assert predict_options(parser.parse_args(["predict", "x.jpg", "--edges"])).kinds == ("map", "edge")


def test_bad_batch_size_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict-shard", "x.jpg", "-o", "out", "--batch-size", "0"])
    assert e.value.code == 2 and "at least 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 1"):
        PredictOptions(batch_size=0)


@pytest.mark.parametrize("command, module, extra", [
    (["serve"], "uvicorn", "serve"),
    (["predict-ray", "--input", "x", "--output", "y"], "ray", "ray"),
    (["evaluate", "--maps", "x", "--masks", "y", "--plots", "p"], "matplotlib", "plots"),
])
def test_a_missing_extra_is_named(command, module, extra, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    assert main(command) == 2
    assert f'pip install "pfanet[{extra}]"' in capsys.readouterr().err


def test_predict_needs_no_extra(weights, tmp_path):
    """The core install predicts: with every extra's modules unimportable, `pfanet predict` still writes a map."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(tmp_path / "a.png")
    blocked = ["fastapi", "uvicorn", "python_multipart", "fastapi_offline", "matplotlib", "ray", "pyarrow",
               "tensorboard", "tensorflow"]
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); from pfanet.cli import main; "
            f"sys.exit(main(['predict', {str(tmp_path / 'a.png')!r}, '-o', {str(tmp_path / 'out')!r}, "
            f"'--weights', {str(weights)!r}, '--no-progress']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "a.png").is_file()


def test_core_dependencies_leave_the_extras_out():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("[")[0] for d in project["dependencies"]}
    extras = project["optional-dependencies"]
    for name in ("train", "serve", "plots", "ray"):
        for dep in extras[name]:
            assert dep.split(">")[0].split("[")[0] not in core, dep
    assert not any(d.startswith("torch") and "<" in d for d in project["dependencies"])


# ---- `pfanet train`: its flags are the fields of Recipe and TrainOptions -------------------------------------------

TRAIN = ["train", "--data", "d.txt", "-o", "run"]


def _train_actions(parser) -> dict:
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {a.dest: a for a in sub.choices["train"]._actions}


def _given(action) -> tuple[list[str], object]:
    """Arguments that give `action` a value other than its default, and that value."""
    kind = action.__class__.__name__
    if kind == "BooleanOptionalAction":
        return [action.option_strings[0]], True
    if kind in ("_StoreTrueAction", "_StoreFalseAction"):
        return [action.option_strings[0]], action.const
    if action.nargs in ("+", "*"):
        return [action.option_strings[-1], "a", "b"], ["a", "b"]
    if action.choices:
        value = next(c for c in reversed(action.choices) if c != action.default)
        return [action.option_strings[-1], value], value
    value = {int: 7, float: 0.5, None: "x"}[action.type]
    return [action.option_strings[-1], str(value)], value


def test_every_recipe_and_train_option_field_is_a_flag_that_goes_back_to_it(tmp_path):
    """Each field of Recipe and TrainOptions reaches `pfanet train`'s command line, and a flag's value lands in its own
    field and in no other (the flags are made from the fields: pfanet.commands.train)."""
    import dataclasses

    from pfanet.commands import train as command
    from pfanet.recipes import RECIPES, Recipe
    from pfanet.training import TrainOptions, recipe_for_run

    parser = build_parser()
    actions = _train_actions(parser)
    recipe_fields = [f.name for f in dataclasses.fields(Recipe)]
    option_fields = [f.name for f in dataclasses.fields(TrainOptions)]
    assert not set(recipe_fields) & set(option_fields)  # one flag namespace
    # the tables only describe fields that exist (none stale), and Recipe.override's keywords are not fields
    assert set(command.RECIPE) | command.BY_NAME_FIELDS <= set(recipe_fields)
    assert set(command.OPTIONS) <= set(option_fields) and not set(command.STAGE_KEYWORDS) & set(recipe_fields)

    plain_overrides = command.recipe_overrides(parser.parse_args(TRAIN))
    assert set(plain_overrides) == set(command.STAGE_KEYWORDS) | set(recipe_fields) - command.BY_NAME_FIELDS
    assert all(v is None for v in plain_overrides.values())  # not given: the recipe's own
    for name in [*command.STAGE_KEYWORDS, *(f for f in recipe_fields if f not in command.BY_NAME_FIELDS)]:
        argv, value = _given(actions[name])
        changed = {k: v for k, v in command.recipe_overrides(parser.parse_args(TRAIN + argv)).items()
                   if v is not None}
        assert changed == {name: value}, (name, argv)
    named = recipe_for_run(parser.parse_args([*TRAIN, "--recipe", "paper"]).recipe, plain_overrides, tmp_path, False)
    assert (named.name, named.description) == ("paper", RECIPES["paper"].description)  # the BY_NAME fields

    plain = dataclasses.asdict(command.train_options(parser.parse_args(TRAIN)))
    assert (plain["train"], plain["out"]) == (["d.txt"], "run")
    assert {k: v for k, v in plain.items() if k not in ("train", "out")} == {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(TrainOptions) if f.name not in ("train", "out")}  # the fields' own defaults
    for name in option_fields:
        argv, value = _given(actions[name])
        got = dataclasses.asdict(command.train_options(parser.parse_args(TRAIN + argv)))
        assert got[name] == value != plain[name], (name, argv)
        assert {k: v for k, v in got.items() if k != name} == {k: v for k, v in plain.items() if k != name}

    # a real run's values, end to end through Recipe.override
    args = parser.parse_args([*TRAIN, "--recipe", "paper", "--epochs", "10", "--iou", "soft", "--ema", "0.5",
                              "--no-dropout", "--size", "64", "--no-progress", "--bf16"])
    recipe = recipe_for_run(args.recipe, command.recipe_overrides(args), tmp_path, False)
    assert (recipe.epochs, recipe.iou, recipe.ema, recipe.dropout, recipe.size) == (10, "soft", 0.5, False, 64)
    options = command.train_options(args)
    assert (options.progress, options.bf16, options.train, options.out) == (False, True, ["d.txt"], "run")


def test_a_new_field_is_a_flag_without_touching_the_command(monkeypatch):
    """Nothing lists the fields by hand: a field added to Recipe or TrainOptions is a flag at once."""
    import dataclasses

    import pfanet.training
    from pfanet.commands import train as command
    from pfanet.recipes import Recipe
    from pfanet.training import TrainOptions

    @dataclasses.dataclass(frozen=True)
    class NewRecipe(Recipe):
        new_knob: int = 3

    @dataclasses.dataclass
    class NewOptions(TrainOptions):
        new_switch: bool = False
        new_level: float | None = None

    monkeypatch.setattr(command, "Recipe", NewRecipe)
    monkeypatch.setattr(pfanet.training, "TrainOptions", NewOptions)
    args = build_parser().parse_args([*TRAIN, "--new-knob", "5", "--new-switch", "--new-level", "0.25"])
    assert command.recipe_overrides(args)["new_knob"] == 5
    options = command.train_options(args)
    assert isinstance(options, NewOptions) and (options.new_switch, options.new_level) == (True, 0.25)
