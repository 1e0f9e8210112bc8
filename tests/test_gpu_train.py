"""tools/gpu_train.py dry-run on the CPU with a tiny subset: pack, the device calls' plan, unpack as parts arrive,
the training command (paper recipe from the packed HED backbone), bring-back in pieces and the checked rejoin."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from pfanet.weights import load_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_train


@pytest.fixture(scope="module")
def packed(tmp_path_factory, ecssd):
    out = tmp_path_factory.mktemp("gpu") / "pack"
    assert gpu_train.main(["pack", "--data", str(ecssd / "train.txt"), "--limit", "4", "--val", str(ecssd / "val.txt"),
                           "--val-limit", "2", "--side", "96", "--part-mib", "8", "--out", str(out), "--quiet"]) == 0
    return out


def test_pack_cuts_one_checked_stream_into_parts(packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    parts = sorted(packed.glob("part_*"))
    assert [p.name for p in parts] == list(manifest["parts"]) and len(parts) >= 3  # a 29 MB backbone in 8 MiB parts
    assert all(p.stat().st_size <= 8 * 2**20 for p in parts)
    assert manifest["pairs"] == {"train": 4, "val": 2}


def test_unpack_as_parts_arrive_then_train_bring_back_and_join(packed, tmp_path, capsys):
    arrived, dst = tmp_path / "arrived", tmp_path / "data"
    arrived.mkdir()
    shutil.copy2(packed / "manifest.json", arrived)
    parts = sorted(packed.glob("part_*"))
    shutil.copy2(parts[0], arrived)  # the first call brings one part
    assert gpu_train.main(["unpack", "--pack", str(arrived), "--to", str(dst)]) == 0
    assert "still to come" in capsys.readouterr().err and not (dst / "train.txt").exists()
    (arrived / parts[0].name).unlink()  # gone from the next call's tree, already appended
    for p in parts[1:]:
        shutil.copy2(p, arrived)
    assert gpu_train.main(["unpack", "--pack", str(arrived), "--to", str(dst)]) == 0
    rows = (dst / "train.txt").read_text().splitlines()
    assert len(rows) == 4 and all((dst / path).is_file() for r in rows for path in r.split("\t"))
    # A damaged part is refused by name.
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    (bad / parts[1].name).write_bytes(b"x" + (bad / parts[1].name).read_bytes()[1:])
    assert gpu_train.main(["unpack", "--pack", str(bad), "--to", str(tmp_path / "bad-data")]) == 1
    assert parts[1].name in capsys.readouterr().err

    # The training command of the last call, on the CPU (one step: a tiny time budget), from the packed backbone.
    run = tmp_path / "run"
    cmd = gpu_train.train_command(0.001, 1, str(run), device="cpu", data=str(dst)) + ["--batch-size", "2",
                                                                                       "--size", "64"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    _, spec, meta = load_checkpoint(run / "last.safetensors")
    assert meta["training"]["recipe"]["name"] == "paper" and spec.channel_order == "BGR"  # HED's convention kept

    back = tmp_path / "out"
    assert gpu_train.main(["bring-back", str(run), "-o", str(back), "--piece-bytes", str(15 * 2**20)]) == 0
    pieces = sorted(back.glob("weights.part*"))
    assert len(pieces) >= 2 and all(p.stat().st_size <= 15 * 2**20 for p in pieces)
    assert gpu_train.main(["join", str(back), "-o", str(tmp_path / "joined")]) == 0
    name = json.loads((back / "weights.json").read_text())["name"]
    assert (tmp_path / "joined" / name).read_bytes() == (run / name).read_bytes()
    assert (tmp_path / "joined" / "log.csv").is_file()
    pieces[0].write_bytes(pieces[0].read_bytes()[:-1])  # a truncated piece
    assert gpu_train.main(["join", str(back), "-o", str(tmp_path / "joined2")]) == 1
    assert "SHA-256" in capsys.readouterr().err


def test_plan_fits_each_call_under_the_transfer_limit(packed, capsys, monkeypatch):
    monkeypatch.setattr(gpu_train, "tracked_size", lambda: 40 * 2**20)  # e.g. the shipped weights in the tree
    monkeypatch.setattr(gpu_train, "ROOT", packed.parent)  # the pack as if at the repository's .gpu/
    assert gpu_train.main(["plan", "--pack", packed.name, "--minutes", "5"]) == 0
    out = capsys.readouterr().out
    calls = [json.loads(line.split("carry ", 1)[1].split("]", 1)[0] + "]") for line in out.splitlines()
             if line.startswith("call ")]
    sizes = [sum((packed.parent / c).stat().st_size for c in carry if c.split("/")[-1].startswith("part_"))
             for carry in calls]
    assert len(calls) >= 2 and all(s <= 64 * 2**20 - 40 * 2**20 for s in sizes)
    assert sum(len([c for c in carry if "part_" in c]) for carry in calls) == len(list(packed.glob("part_*")))
    assert "pfanet train --recipe paper" in out.split("call ")[-1] and "bring-back" in out.split("call ")[-1]
    # A tree too large for any part is said plainly.
    monkeypatch.setattr(gpu_train, "tracked_size", lambda: 60 * 2**20)
    assert gpu_train.main(["plan", "--pack", packed.name]) == 1
    assert "no room" in capsys.readouterr().err


def test_packed_backbone_equals_the_hed_import(tmp_path):
    from pfanet.model import PFANet, PFANetConfig
    from pfanet.transforms import HED_INPUT
    from pfanet.weights import load_backbone, save_backbone

    save_backbone("hed", tmp_path / "b.safetensors")
    a, b = PFANet(PFANetConfig()), PFANet(PFANetConfig())
    assert load_backbone(a, "hed") == HED_INPUT == load_backbone(b, str(tmp_path / "b.safetensors"))
    for (k, x), y in zip(a.backbone.state_dict().items(), b.backbone.state_dict().values()):
        torch.testing.assert_close(y, x.half().float(), msg=k)
