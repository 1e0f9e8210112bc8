"""tools/gpu_train.py rehearsed on the CPU with a tiny DUTS-TR subset, as the GPU machine's calls will run it.

A copy of this repository stands for "here" (so that `stow` moves its weights, not the real ones). Each call is made
as the device tool makes it: the tree's tracked and untracked-not-ignored files that exist (the stowed weights do
not) plus the carried paths, copied into a folder that stands for the machine, where the exact command `plan`
printed runs with a plain `python3` that has torch, numpy and Pillow but no pfanet installed. What lands in $OUT is
checked against what the device tool brings back (8 files, 16 MiB each). The machine is kept warm between the calls
in one rehearsal and lost in another: call 2 alone, on a fresh machine, still trains.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest
import torch

from pfanet.io import load_image, load_mask
from pfanet.weights import load_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
DUTS = ROOT.parent / "shared" / "data" / "duts-tr"
sys.path.insert(0, str(ROOT / "tools"))
import gpu_train

LIMIT = 64 * 2**20  # what one device call may send


def tree_files(root: pathlib.Path) -> list[str]:
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, check=True).stdout.decode().split("\0")
    return [n for n in names if n]


def copy_call(here: pathlib.Path, machine: pathlib.Path, carry: list[str]) -> int:
    """What a device call puts on the machine; returns the bytes sent. Ignored files an earlier call left there
    (its unpacked parts) stay, as on a machine still warm."""
    sent = 0
    for rel in tree_files(here):
        src = here / rel
        if src.is_file():  # a stowed file is missing from the tree
            (machine / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, machine / rel)
            sent += src.stat().st_size
    for rel in carry:
        if (machine / rel).exists():
            shutil.rmtree(machine / rel)
        shutil.copytree(here / rel, machine / rel)
        sent += gpu_train.folder_bytes(here / rel)
    return sent


@pytest.fixture(scope="module")
def python3(tmp_path_factory) -> pathlib.Path:
    """A folder holding a `python3` like the machine's: this interpreter with its packages but without pfanet (the
    editable install's hook and metadata left out, site processing off), so that pfanet comes from the tree only,
    and without what the machine lacks too: pysodmetrics (call 2 carries it) and TensorFlow (which TensorBoard
    would import: a minute here)."""
    tmp = tmp_path_factory.mktemp("python3")
    site = tmp / "site"
    site.mkdir()
    for folder in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in os.listdir(folder):
            hidden = re.match(r"(__editable__.*pfanet|pfanet\b|py_?sod_?metrics|tensorflow|tf_keras|keras\b)", entry,
                              re.IGNORECASE)
            if not hidden and not (site / entry).exists():
                (site / entry).symlink_to(pathlib.Path(folder) / entry)
    shim = tmp / "bin" / "python3"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site}" exec "{sys.executable}" -S "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    return shim.parent


def on_machine(command: str, machine: pathlib.Path, out: pathlib.Path, python3: pathlib.Path
               ) -> subprocess.CompletedProcess:
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{python3}{os.pathsep}{env['PATH']}", OUT=str(out))
    return subprocess.run(["bash", "-c", command], cwd=machine, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.fixture(scope="module")
def here(tmp_path_factory) -> pathlib.Path:
    """A repository with this one's tracked and untracked-not-ignored files, the shipped weights included."""
    if not (DUTS / "train.txt").is_file():
        pytest.skip(f"DUTS-TR not found at {DUTS}")
    here = tmp_path_factory.mktemp("here")
    for rel in tree_files(ROOT):
        if (ROOT / rel).is_file():
            (here / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, here / rel)
    subprocess.run(["git", "init", "-q"], cwd=here, check=True)
    subprocess.run(["git", "-c", "core.compression=0", "add", "-A"], cwd=here, check=True)  # 50 MB: no zlib
    return here


def gpu_train_here(here: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(here / "tools" / "gpu_train.py"), *args], cwd=here,
                          capture_output=True, text=True, timeout=600, check=False)


def sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_device_calls_rehearsed(here, python3, tmp_path):
    done = gpu_train_here(here, "pack", "--data", str(DUTS / "train.txt"), "--limit", "8", "--val",
                          str(DUTS / "val.txt"), "--val-limit", "2", "--side", "64", "--part-mib", "0.005", "--quiet")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((here / ".gpu/parts/manifest.json").read_text())
    parts = {p: v for p, v in manifest["parts"].items() if p != "val"}
    assert len(parts) >= 3 and sum(v["pairs"] for v in parts.values()) == 8  # whole pairs in each part
    plan = ["plan", "--minutes", "0.05", "--probe-minutes", "0.01", "--size", "64", "--batch-size", "2",
            "--workers", "0"]

    # All of it fits beside the init: one call.
    done = gpu_train_here(here, *plan)
    assert done.returncode == 0, done.stderr
    one = json.loads((here / ".gpu/plan.json").read_text())
    assert [c["call"] for c in one["calls"]] == [2] and one["pairs"]["call2"] == 8
    # A limit that leaves call 2 room for the first parts that fill a batch, as the full pack leaves it room for a
    # third of DUTS-TR: call 1 carries the rest.
    names = list(parts)
    first = next(k for k in range(1, len(names)) if sum(parts[p]["pairs"] for p in names[:k]) >= 2)
    room = one["calls"][0]["bytes"] - sum(parts[p]["bytes"] for p in names[first:]) + gpu_train.MARGIN
    done = gpu_train_here(here, *plan, "--limit-mib", str((room + 100) / 2**20))
    assert done.returncode == 0, done.stderr
    calls = json.loads((here / ".gpu/plan.json").read_text())["calls"]
    assert [c["call"] for c in calls] == [1, 2]
    for c in calls:  # what `plan` printed is what the session issues
        assert f"carry {json.dumps(c['carry'])}, timeout_s {c['timeout_s']}\n  {c['command']}\n" in done.stdout + "\n"
        assert len(c["command"]) <= 2000 and c["timeout_s"] <= 600 and c["bytes"] <= LIMIT

    weights = {p.name: sha(p) for p in (here / "pfanet/weights").iterdir()}
    assert gpu_train_here(here, "stow", "--watchdog-minutes", "10").returncode == 0
    assert not list((here / "pfanet/weights").glob("*")) and gpu_train_here(here, "stow").returncode == 1

    # The machine stays warm between the calls: call 2 trains on every part.
    machine = tmp_path / "machine"
    for c in calls:
        sent = copy_call(here, machine, c["carry"])
        assert sent <= LIMIT and abs(sent - c["bytes"]) < 2**16  # as `plan` counted, without the weights
        out = tmp_path / f"out{c['call']}"
        done = on_machine(c["command"], machine, out, python3)
        assert done.returncode == 0, done.stdout + done.stderr
        assert gpu_train.out_problems(out) == []
    report = json.loads((tmp_path / "out1" / "machine.json").read_text())
    assert pathlib.Path(report["pfanet"]) == machine / "pfanet" and report["pillow_webp"] is True
    assert len((machine / ".gpu/data/duts-tr/train.txt").read_text().splitlines()) == 8
    for module in ("pfanet", "py_sod_metrics"):  # neither is installed there
        bare = on_machine(f"cd / && python3 -c 'import {module}'", machine, tmp_path / module, python3)
        assert "ModuleNotFoundError" in bare.stderr
    back = tmp_path / "out2"
    assert sorted(p.name for p in back.iterdir()) == sorted(
        ["curve.png", "log.csv", "recipe.json", "train.log", "weights.json"]
        + [f"weights.part{k:02d}" for k in range(json.loads((back / "weights.json").read_text())["pieces"])])
    log = (back / "train.log").read_text()
    assert "probe:" in log and "--resume --reschedule" in log  # the schedule fitted to the measured speed

    # Here again: join puts the weights back and rejoins the run's.
    joined = tmp_path / "joined"
    done = gpu_train_here(here, "join", str(back), "-o", str(joined))
    assert done.returncode == 0, done.stderr
    assert {p.name: sha(p) for p in (here / "pfanet/weights").iterdir()} == weights
    info = json.loads((back / "weights.json").read_text())
    model, spec, meta = load_checkpoint(joined / info["name"])
    recipe = meta["training"]["recipe"]
    assert (recipe["name"], recipe["iou"], recipe["size"], recipe["batch_size"]) == ("cpu-duts-iou", "soft", 64, 2)
    assert recipe["init"] == ".gpu/call2/init.safetensors" and spec.size == 64
    assert next(iter(model.state_dict().values())).dtype == torch.float32  # an fp16 file, read as always
    assert info["bytes"] < 40e6 and info["val_scores"]["mae"] > 0
    pieces = sorted(back.glob("weights.part*"))
    bad = tmp_path / "bad"
    shutil.copytree(back, bad)
    (bad / pieces[0].name).write_bytes(pieces[0].read_bytes()[:-1])  # a truncated piece
    done = gpu_train_here(here, "join", str(bad), "-o", str(tmp_path / "joined2"))
    assert done.returncode == 1 and "SHA-256" in done.stderr

    # The machine was lost after call 1: call 2 on a fresh one trains on what it carried.
    assert gpu_train_here(here, "stow", "--watchdog-minutes", "10").returncode == 0
    fresh = tmp_path / "fresh"
    copy_call(here, fresh, calls[-1]["carry"])
    done = on_machine(calls[-1]["command"], fresh, tmp_path / "out-fresh", python3)
    assert done.returncode == 0, done.stdout + done.stderr
    alone = sum(parts[p]["pairs"] for p in names[:first])
    assert len((fresh / ".gpu/data/duts-tr/train.txt").read_text().splitlines()) == alone
    assert gpu_train.out_problems(tmp_path / "out-fresh") == []
    assert gpu_train_here(here, "restore").returncode == 0
    assert {p.name: sha(p) for p in (here / "pfanet/weights").iterdir()} == weights
    assert "nothing stowed" in gpu_train_here(here, "restore").stderr


def test_unpack_transcodes_webp_when_pillow_cannot_read_it(tmp_path, monkeypatch):
    """Pillow without WebP on the machine: its OpenCV decodes the parts into PNG, losslessly."""
    if not (DUTS / "train.txt").is_file():
        pytest.skip(f"DUTS-TR not found at {DUTS}")
    assert gpu_train.main(["pack", "--data", str(DUTS / "train.txt"), "--limit", "2", "--val", str(DUTS / "val.txt"),
                           "--val-limit", "1", "--side", "64", "--jobs", "1", "--out", str(tmp_path / "parts"),
                           "--quiet"]) == 0
    call = tmp_path / "call"
    call.mkdir()
    shutil.copy2(tmp_path / "parts" / "train_000.tar.gz", call)
    (call / "sha256.json").write_text(json.dumps({"train_000.tar.gz": gpu_train.sha256(call / "train_000.tar.gz")}))
    webp = tmp_path / "webp"
    monkeypatch.setattr(gpu_train, "DATA", webp / "duts-tr")
    assert gpu_train.main(["unpack", str(call)]) == 0
    monkeypatch.setattr(gpu_train, "DATA", tmp_path / "png" / "duts-tr")
    monkeypatch.setattr(gpu_train, "pil_reads_webp", lambda: False)
    assert gpu_train.main(["unpack", str(call)]) == 0
    rows = [r.split("\t") for r in (tmp_path / "png/duts-tr/train.txt").read_text().splitlines()]
    assert len(rows) == 2 and all(p.endswith(".png") for r in rows for p in r)
    for img, mask in rows:
        png, orig = tmp_path / "png/duts-tr", webp / "duts-tr"
        assert np.array_equal(load_mask(png / mask), load_mask(orig / mask.replace(".png", ".webp")))
        diff = np.abs(load_image(png / img).astype(int) - load_image(orig / img.replace(".png", ".webp")).astype(int))
        assert diff.mean() < 2  # one lossy bitstream, two decoders' colour conversions


def test_stow_refuses_twice_restores_on_its_own_and_keeps_a_changed_file(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    shutil.copy2(ROOT / "tools" / "gpu_train.py", repo / "tools")
    (repo / "pfanet" / "weights").mkdir(parents=True)
    files = {"pfanet/weights/m.safetensors": b"weights", "pfanet/weights/m.int8.onnx": b"graph"}
    for rel, data in files.items():
        (repo / rel).write_bytes(data)
    (repo / ".gitignore").write_text("/.gpu/\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)

    assert gpu_train_here(repo, "stow", "--watchdog-minutes", "0.02").returncode == 0  # back after 1.2 s
    assert not any((repo / rel).exists() for rel in files)
    done = gpu_train_here(repo, "stow")
    assert done.returncode == 1 and "restore" in done.stderr
    deadline = time.monotonic() + 60
    while (repo / ".gpu/stowed/stowed.json").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert {rel: (repo / rel).read_bytes() for rel in files} == files  # the watchdog put them back

    assert gpu_train_here(repo, "stow", "--watchdog-minutes", "0").returncode == 0
    (repo / "pfanet/weights/m.safetensors").write_bytes(b"another")  # checked out again, then changed
    done = gpu_train_here(repo, "restore")
    assert done.returncode == 1 and "stays at" in done.stderr
    assert (repo / ".gpu/stowed/m.safetensors").read_bytes() == b"weights"
    (repo / "pfanet/weights/m.safetensors").unlink()
    assert gpu_train_here(repo, "restore").returncode == 0
    assert {rel: (repo / rel).read_bytes() for rel in files} == files


def test_packed_backbone_equals_the_hed_import(tmp_path):
    """`plan --start hed` sends the HED VGG16 as this fp16 file."""
    from pfanet.model import PFANet, PFANetConfig
    from pfanet.transforms import HED_INPUT
    from pfanet.weights import load_backbone, save_backbone

    save_backbone("hed", tmp_path / "b.safetensors")
    a, b = PFANet(PFANetConfig()), PFANet(PFANetConfig())
    assert load_backbone(a, "hed") == HED_INPUT == load_backbone(b, str(tmp_path / "b.safetensors"))
    for (k, x), y in zip(a.backbone.state_dict().items(), b.backbone.state_dict().values(), strict=True):
        torch.testing.assert_close(y, x.half().float(), msg=k)
