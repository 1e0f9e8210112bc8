"""Scale-out: sharded prediction under torchrun (2 CPU processes on gloo), resumed by plain RANK/WORLD_SIZE
processes; Ray Data's map_batches with PFANetMapper in local mode."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pfanet.distributed_predict import Shard
from pfanet.model import PFANet
from pfanet.options import PredictOptions
from pfanet.outputs import Job
from pfanet.predictor import Predictor
from pfanet.transforms import InputSpec
from pfanet.weights import save_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
NAMES = ["a", "b", "c", "sub/d", "sub/e"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random-weight model working at 64 x 64 and five small images, two of them in a subfolder."""
    root = tmp_path_factory.mktemp("scale")
    torch.manual_seed(0)
    weights = root / "random64.safetensors"
    save_checkpoint(weights, PFANet().eval(), InputSpec(size=64))
    images = root / "images"
    rng = np.random.default_rng(0)
    for i, name in enumerate(NAMES):
        path = images / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(path)
    predictor = Predictor(weights, device="cpu")
    expected = {name: predictor.predict(images / f"{name}.png") for name in NAMES}
    return weights, images, expected


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return env | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""} | extra


def _maps(out: pathlib.Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out).with_suffix("")): np.asarray(Image.open(p)) for p in sorted(out.rglob("*.png"))}


def test_shards_are_disjoint_and_cover_the_sorted_list():
    jobs = [Job(pathlib.Path(f"/x/{n}.jpg"), pathlib.PurePath(n)) for n in "edcba"]
    taken = [[j.name.name for j in Shard(r, 2).take(jobs)] for r in range(2)]
    assert taken == [["a", "c", "e"], ["b", "d"]]
    assert [j.name.name for j in Shard(2, 3).take(jobs)] == ["c"]
    assert Shard.from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Shard(1, 4, 1)
    assert Shard.from_env({}) == Shard(0, 1, 0)
    with pytest.raises(ValueError, match="RANK=4 is outside"):
        Shard.from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_torchrun_two_ranks_then_resume(setup, tmp_path):
    weights, images, expected = setup
    out = tmp_path / "maps"
    args = [str(images), "-o", str(out), "--weights", str(weights), "--device", "cpu", "--no-progress"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "pfanet", "predict-shard", *args],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "all 2 ranks: 5 written" in run.stderr
    maps = _maps(out)
    assert sorted(maps) == NAMES
    for name in NAMES:  # other thread counts and batches: float sums in another order, a gray level at most
        assert np.abs(maps[name].astype(int) - expected[name].astype(int)).max() <= 1, name
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    # Resume without a rendezvous: two plain processes told their rank; all outputs exist, nothing is redone.
    procs = [subprocess.Popen([sys.executable, "-m", "pfanet", "predict-shard", *args], cwd=REPO,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)),
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "rank 0/2: 0 written" in errs[0] and "3 skipped" in errs[0]
    assert "rank 1/2: 0 written" in errs[1] and "2 skipped" in errs[1]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes


def test_mapper_on_a_batch_of_bytes(setup, tmp_path):
    pytest.importorskip("pyarrow")
    from pfanet.ray_predict import PFANetMapper

    weights, images, expected = setup
    mapper = PFANetMapper(str(tmp_path), weights=str(weights), kinds=("map", "mask"), batch_size=2)
    paths = [str(images / "a.png"), "broken.png"]
    batch = {"path": np.array(paths, dtype=object),
             "bytes": np.array([(images / "a.png").read_bytes(), b"not an image"], dtype=object)}
    result = mapper(batch)
    assert list(result["path"]) == paths
    assert result["error"][0] == "" and "broken.png: not an image" in result["error"][1]
    assert np.abs(np.asarray(Image.open(tmp_path / "a.png")).astype(int) - expected["a"].astype(int)).max() <= 1
    assert set(np.unique(np.asarray(Image.open(tmp_path / "a_mask.png")))) <= {0, 255}


def test_ray_data_local_mode(setup, tmp_path, capsys):
    """`pfanet predict-ray` on a local Ray (started by the command), then a resumed run through the library."""
    ray = pytest.importorskip("ray")
    from pfanet.cli import main
    from pfanet.ray_predict import run

    weights, images, expected = setup
    out = tmp_path / "maps"
    try:
        assert main(["predict-ray", "--input", str(images), "--output", str(out), "--weights", str(weights),
                     "--batch-size", "2", "--num-cpus", "1", "--backend", "torch"]) == 0
        assert "5 written" in capsys.readouterr().err
        maps = _maps(out)
        assert sorted(maps) == NAMES
        for name in NAMES:
            assert np.abs(maps[name].astype(int) - expected[name].astype(int)).max() <= 1, name
        assert run(str(images), str(out), PredictOptions(str(weights))) == (0, 5, [])  # resumed: nothing left to do
    finally:
        ray.shutdown()
