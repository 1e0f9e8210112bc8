"""`pfanet evaluate` on real ECSSD masks: every metric equal to a direct single-process pysodmetrics run, maxF_pr
against a brute-force numpy computation, resizing, bad files reported and skipped, the outputs, and a model."""

from __future__ import annotations

import csv
import json
import logging
import pathlib
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pfanet import evaluate as ev
from pfanet.cli import main

N = 10
METHODS = ("blur", "noise", "constant")


def make_map(kind: str, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "blur":
        return np.asarray(Image.fromarray(gt).filter(ImageFilter.GaussianBlur(5)))
    if kind == "noise":
        return np.clip(gt * 0.5 + rng.normal(70, 45, gt.shape), 0, 255).astype(np.uint8)
    return np.full(gt.shape, 128, np.uint8)


@pytest.fixture(scope="module")
def maps(tmp_path_factory, ecssd_val_pairs):
    """<tmp>/ecssd-val/masks (links to N real val masks) and <tmp>/<method>/ maps of the same stems."""
    root = tmp_path_factory.mktemp("ev")
    masks = root / "ecssd-val" / "masks"
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for _, mask in ecssd_val_pairs(N):
        (masks / mask.name).symlink_to(mask)
        gt = np.asarray(Image.open(mask).convert("L"))
        for kind in METHODS:
            (root / kind).mkdir(exist_ok=True)
            Image.fromarray(make_map(kind, gt, rng)).save(root / kind / f"{mask.stem}.png")
    return root, masks


def read_gray(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def reference(pairs) -> dict[str, float]:
    """A plain single-process pysodmetrics run over (map array, mask path), with its classic classes."""
    import py_sod_metrics as sod

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fmeasure announces its successor FmeasureV2
        fm = sod.Fmeasure()
    mae, sm, em, wfm = sod.MAE(), sod.Smeasure(), sod.Emeasure(), sod.WeightedFmeasure()
    for pred, mask in pairs:
        gt = read_gray(mask)
        for m in (fm, mae, sm, em, wfm):
            m.step(pred=pred, gt=gt)
    f, e = fm.get_results()["fm"], em.get_results()["em"]
    return {"mae": mae.get_results()["mae"], "maxF": f["curve"].max(), "meanF": f["curve"].mean(), "adpF": f["adp"],
            "Sm": sm.get_results()["sm"], "maxE": e["curve"].max(), "meanE": e["curve"].mean(), "adpE": e["adp"],
            "wF": wfm.get_results()["wfm"]}


def folder_pairs(folder: pathlib.Path, masks: pathlib.Path):
    return [(read_gray(folder / f"{m.stem}.png"), m) for m in sorted(masks.iterdir())]


def assert_matches(scores: ev.Scores, ref: dict[str, float]) -> None:
    for k, v in ref.items():
        assert scores.metrics[k] == pytest.approx(v, abs=1e-9, rel=0), k


def test_every_metric_equals_pysodmetrics_in_parallel(maps):
    root, masks = maps
    methods = {k: root / k for k in METHODS}
    parallel = ev.evaluate_folders(methods, masks, workers=2, progress=False)  # 2 chunks per method
    serial = ev.evaluate_folders(methods, masks, workers=0, progress=False)
    assert list(parallel) == list(METHODS) and list(parallel["blur"]) == ["ecssd-val"]
    for k in METHODS:
        s = parallel[k]["ecssd-val"]
        assert s.n == N and s.skipped == 0
        assert_matches(s, reference(folder_pairs(root / k, masks)))
        assert s.metrics == serial[k]["ecssd-val"].metrics  # merged from processes: identical, not just close
    # The metrics tell the methods apart as expected, so the comparison above is not between constants.
    blur, noise = parallel["blur"]["ecssd-val"].metrics, parallel["noise"]["ecssd-val"].metrics
    assert blur["mae"] < noise["mae"] and blur["Sm"] > noise["Sm"]


def brute_force_pr(pairs) -> tuple[np.ndarray, np.ndarray]:
    """Mean precision and recall at thresholds 0..255, one binarisation at a time (maps min-max normalised and
    masks cut at 128, as pysodmetrics prepares them)."""
    ps, rs = [], []
    for pred, mask in pairs:
        gt = read_gray(mask) > 128
        x = pred / 255
        if x.max() > x.min():
            x = (x - x.min()) / (x.max() - x.min())
        q = (x * 255).astype(np.uint8)
        p, r = np.zeros(256), np.zeros(256)
        for t in range(256):
            b = q >= t
            tp = np.count_nonzero(b & gt)
            p[t] = tp / np.count_nonzero(b) if b.any() else 0.0
            r[t] = tp / np.count_nonzero(gt) if gt.any() else 0.0
        ps.append(p)
        rs.append(r)
    return np.mean(ps, axis=0), np.mean(rs, axis=0)


def test_maxF_pr_against_numpy(maps):
    root, masks = maps
    report = ev.evaluate_folders({k: root / k for k in ("blur", "noise")}, masks, workers=0, progress=False)
    differs = False
    for k in ("blur", "noise"):
        s = report[k]["ecssd-val"]
        p, r = brute_force_pr(folder_pairs(root / k, masks))
        np.testing.assert_allclose(s.precision, p, rtol=0, atol=1e-12)  # curves in ascending threshold order
        np.testing.assert_allclose(s.recall, r, rtol=0, atol=1e-12)
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.nan_to_num(1.3 * p * r / (0.3 * p + r))
        assert s.metrics["maxF_pr"] == pytest.approx(f.max(), abs=1e-12)
        differs |= abs(s.metrics["maxF_pr"] - s.metrics["maxF"]) > 1e-6
    assert differs  # the two conventions are different numbers on real data


def test_map_of_another_size_is_resized_with_a_warning(maps, tmp_path, caplog):
    import cv2

    root, masks = maps
    small = tmp_path / "small"
    small.mkdir()
    first = min(masks.iterdir())
    for m in sorted(masks.iterdir()):
        pred = read_gray(root / "blur" / f"{m.stem}.png")
        if m == first:
            pred = pred[::2, ::2].copy()
        Image.fromarray(pred).save(small / f"{m.stem}.png")
    with caplog.at_level(logging.WARNING):
        s = ev.evaluate_folders({"small": small}, masks, workers=0, progress=False)["small"]["ecssd-val"]
    assert any(str(small / f"{first.stem}.png") in r.message and "resized" in r.message for r in caplog.records)
    assert s.n == N
    pairs = folder_pairs(small, masks)
    gt = read_gray(first)
    pairs[0] = (cv2.resize(pairs[0][0], (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_LINEAR), first)
    assert_matches(s, reference(pairs))


def test_missing_and_unreadable_files_are_reported_and_skipped(maps, tmp_path, caplog, capsys):
    root, masks = maps
    stems = sorted(m.stem for m in masks.iterdir())
    gappy, bad_masks = tmp_path / "gappy", tmp_path / "bad" / "masks"
    gappy.mkdir()
    bad_masks.mkdir(parents=True)
    for m in masks.iterdir():
        (bad_masks / m.name).symlink_to(m.resolve())
    (bad_masks / "zz_broken.png").write_bytes(b"not a png")  # an unreadable mask ...
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(gappy / "zz_broken.png")  # ... with a map
    for stem in stems[2:]:
        (gappy / f"{stem}.png").write_bytes((root / "noise" / f"{stem}.png").read_bytes())
    (gappy / f"{stems[1]}.png").write_bytes(b"\x89PNG truncated")  # an unreadable map; stems[0] has none
    with caplog.at_level(logging.WARNING):
        rc = main(["evaluate", "--maps", f"gappy={gappy}", "--masks", str(bad_masks), "--json",
                   str(tmp_path / "m.json"), "--workers", "2", "--no-progress"])
    assert rc == 1  # the rest is scored and written; the status says that something was skipped
    log = "\n".join(r.message for r in caplog.records)
    for path in (gappy / stems[0], gappy / f"{stems[1]}.png", bad_masks / "zz_broken.png"):
        assert str(path) in log
    assert "3 maps or masks skipped" in capsys.readouterr().err
    got = json.loads((tmp_path / "m.json").read_text())["gappy"]["bad"]
    assert got["n"] == N - 2
    ref = reference([(read_gray(gappy / f"{s}.png"), masks / f"{s}.png") for s in stems[2:]])
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-9, rel=0), k


def test_json_markdown_csv_and_plots(maps, tmp_path, capsys):
    root, masks = maps
    args = ["evaluate", "--maps", *(f"{k}={root / k}" for k in METHODS), "--masks", str(masks), "--workers", "0",
            "--no-progress", "--json", str(tmp_path / "m.json"), "--plots", str(tmp_path / "plots")]
    assert main([*args, "--table", str(tmp_path / "m.md")]) == 0
    screen = capsys.readouterr().out
    data = json.loads((tmp_path / "m.json").read_text())
    keys = {"mae", "maxF", "maxF_pr", "meanF", "adpF", "Sm", "maxE", "meanE", "adpE", "wF", "n"}
    assert list(data) == list(METHODS)
    for k in METHODS:
        assert set(data[k]["ecssd-val"]) == keys
        ref = reference(folder_pairs(root / k, masks))
        assert data[k]["ecssd-val"]["mae"] == pytest.approx(ref["mae"], abs=1e-9)
        assert any(line.startswith(k) and f"{ref['mae']:.4f}" in line for line in screen.splitlines())
    md = (tmp_path / "m.md").read_text().splitlines()
    assert md[0].startswith("| method | dataset | mae | maxF | maxF_pr |") and set(md[1]) <= set("|-:")
    assert len(md) == 2 + len(METHODS) and md[3].startswith("| noise | ecssd-val |")
    assert main([*args, "--table", str(tmp_path / "m.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert [r["method"] for r in rows] == list(METHODS)
    for r in rows:
        for k in keys:
            assert float(r[k]) == pytest.approx(data[r["method"]]["ecssd-val"][k], abs=1e-12)
    for kind in ("pr", "fm"):
        png = tmp_path / "plots" / f"ecssd-val_{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            assert min(im.size) > 100 and np.asarray(im.convert("L")).std() > 0


def test_bad_arguments_are_errors(maps, tmp_path, capsys):
    root, masks = maps
    assert main(["evaluate", "--maps", str(root / "blur")]) == 2  # no --masks
    assert main(["evaluate", "--maps", str(root / "blur"), "--masks", str(masks), "--table", "x.txt"]) == 2
    assert main(["evaluate", "--maps", f"a={root / 'blur'}", f"a={root / 'noise'}", "--masks", str(masks)]) == 2
    assert main(["evaluate", "--maps", str(tmp_path / "nowhere"), "--masks", str(masks)]) == 2
    err = capsys.readouterr().err
    assert "--masks" in err and ".md" in err and "'a'" in err and "nowhere" in err


def test_model_weights_on_a_list_file(ecssd_val_pairs, tmp_path):
    import torch

    from pfanet import InputSpec, PFANet
    from pfanet.predictor import Predictor
    from pfanet.weights import save_checkpoint

    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    save_checkpoint(weights, PFANet(), InputSpec(size=64))
    pairs = ecssd_val_pairs(3)
    listing = tmp_path / "three.txt"
    listing.write_text("".join(f"{i}\t{m}\n" for i, m in pairs))
    rc = main(["evaluate", "--weights", str(weights), "--data", str(listing), "--json", str(tmp_path / "m.json"),
               "--save-maps", str(tmp_path / "maps"), "--workers", "1", "--no-progress"])
    assert rc == 0
    got = json.loads((tmp_path / "m.json").read_text())["tiny"][f"{tmp_path.name}-three"]
    assert got["n"] == 3
    saved = tmp_path / "maps" / f"{tmp_path.name}-three"
    predictor = Predictor(weights, device="cpu")
    first = predictor.predict(pairs[0][0])
    np.testing.assert_array_equal(read_gray(saved / f"{pairs[0][0].stem}.png"), first)  # the Predictor's map
    ref = reference([(read_gray(saved / f"{i.stem}.png"), m) for i, m in pairs])
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-9, rel=0), k
    assert ev.score_pairs(predictor, pairs) == pytest.approx({"mae": got["mae"], "maxF": got["maxF"], "n": 3})
