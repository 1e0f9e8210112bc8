"""benchmarks/project_training.py: a power law fitted to a log.csv's validation columns, and where it meets a target."""

from __future__ import annotations

import csv
import importlib.util
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project():
    spec = importlib.util.spec_from_file_location("project_training", REPO / "benchmarks" / "project_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_exact_power_law_is_recovered(project, tmp_path, capsys):
    # MAE = 0.5 * n^-0.2 reaches 0.060 at n = (0.5 / 0.06)^5; 1 - max F = 2 * n^-0.3 reaches 0.1 at 20^(10/3).
    # The first row (500 images, before --from) is off the law and must be left out.
    log = tmp_path / "log.csv"
    with log.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "images", "val_mae", "val_maxF", "loss"])
        w.writeheader()
        w.writerow({"epoch": 0.05, "images": 500, "val_mae": 0.9, "val_maxF": 0.1, "loss": 1})
        for n in (1000, 2000, 4000, 8000):
            w.writerow({"epoch": n / 10000, "images": n, "val_mae": 0.5 * n ** -0.2, "val_maxF": 1 - 2 * n ** -0.3,
                        "loss": 0.5})
        w.writerow({"epoch": 0.9, "images": 9000, "val_mae": "", "val_maxF": "", "loss": 0.4})  # no validation
    project.main([str(log), "--from", "1000", "--images-per-s", "2", "--epoch", "10000"])
    out = capsys.readouterr().out.splitlines()
    mae_n, f_n = (0.5 / 0.06) ** 5, 20 ** (10 / 3)
    assert out[0].startswith("val_mae: 4 rows, exponent -0.200;") and f"{mae_n:,.0f} images" in out[0]
    assert f"{mae_n / 2 / 3600:,.0f} h at 2.0 images/s" in out[0]
    assert out[1].startswith("val_maxF: 4 rows, exponent -0.300;") and f"{f_n:,.0f} images" in out[1]
    assert "reaches 0.9000" in out[1]


def test_a_curve_that_does_not_improve_says_so(project, tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("images,val_mae\n1000,0.10\n2000,0.11\n4000,0.12\n")
    project.main([str(log)])
    assert "val_mae: not improving" in capsys.readouterr().out
