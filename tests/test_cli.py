"""The command line's shape: one set of prediction options for every prediction command, runners that never import
the CLI back, `pfanet --version`."""

from __future__ import annotations

import ast
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


def test_no_library_module_imports_the_cli():
    """The CLI dispatches to the runners, never the other way round."""
    for path in sorted((REPO / "pfanet").glob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("cli", "pfanet.cli"), f"{path.name} imports the command line"


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
