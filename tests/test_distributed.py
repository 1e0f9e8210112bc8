"""Training under torchrun: 2 CPU processes on gloo (DistributedDataParallel), each with its share of the epoch.

Checks that only rank 0 writes into the run folder (every file operation of each process is recorded with an audit
hook), that both ranks end with identical weights, and that 2 processes at batch 2 compute what one process at
batch 4 does (per-image normalisation makes the network batch-independent; dropout is off), also when stopped after
one step and resumed.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from pfanet.recipes import RECIPES
from pfanet.train import EpochSampler, Trainer, TrainOptions

WORKER = textwrap.dedent("""
    import json, os, pathlib, sys, time

    run_dir = os.path.abspath(sys.argv[2])
    written = []  # this process's file operations inside the run folder

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND)) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            if not writes:
                return
        elif event not in ("os.rename", "os.mkdir", "os.remove", "os.rmdir"):
            return
        for path in args[:2] if event == "os.rename" else args[:1]:  # a rename writes its destination
            if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(run_dir):
                written.append(f"{event} {os.fsdecode(path)}")

    sys.addaudithook(audit)

    import torch
    from pfanet.recipes import RECIPES
    from pfanet.train import Trainer, TrainOptions

    recipe = RECIPES["cpu-ecssd"].override(size=32, batch_size=2, epochs=1, dropout=False)
    options = TrainOptions(train=[sys.argv[1]], out=run_dir, val=[sys.argv[4]], workers=1, progress=False)
    results = pathlib.Path(sys.argv[3])
    if sys.argv[5:] == ["stop"]:  # one step; process 0 writes its files late, and run() must wait for them
        from pfanet.training import Callback

        class LateWrite(Callback):
            def on_save_checkpoint(self, trainer, state):  # process 0, just before it writes state.pt
                time.sleep(3)

        trainer = Trainer(recipe, TrainOptions(**{**vars(options), "max_steps": 1}), callbacks=[LateWrite()])
        trainer.run()
        (results / f"rank{trainer.rank}.stopped").write_text(str((pathlib.Path(run_dir) / "state.pt").is_file()))
        sys.exit()
    options.resume = sys.argv[5:] == ["resume"]
    trainer = Trainer(recipe, options)
    trainer.run()
    torch.save(trainer.model.state_dict(), results / f"rank{trainer.rank}.pt")
    (results / f"rank{trainer.rank}.json").write_text(json.dumps(written))
""")


def test_each_rank_takes_every_world_th_sample_of_the_epoch_order():
    one = EpochSampler(9, seed=4)
    ranks = [EpochSampler(9, seed=4, rank=r, world=2) for r in range(2)]
    for s in (one, *ranks):
        s.set_position(epoch=3, start=0)
    order = one.order()
    assert sorted(order) == list(range(9))
    assert ranks[0].order() == order[0:8:2] and ranks[1].order() == order[1:8:2]  # the 9th is left out
    ranks[1].set_position(epoch=3, start=2)  # resuming after one step of 2
    assert list(ranks[1]) == order[1:8:2][2:] and len(ranks[1]) == 2
    one.set_position(epoch=4, start=0)
    assert one.order() != order


def torchrun_two(tmp_path, worker: str, train_pairs, val_pairs, *args: str, timeout: float):
    """Write the training and validation lists and the worker script, and run the script under torchrun as two CPU
    processes (one thread each: two cores): (train.txt, val.txt, the finished process)."""
    torchrun = pathlib.Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip(f"no torchrun beside {sys.executable}")
    data, val = tmp_path / "train.txt", tmp_path / "val.txt"
    data.write_text("".join(f"{i}\t{m}\n" for i, m in train_pairs))
    val.write_text("".join(f"{i}\t{m}\n" for i, m in val_pairs))
    (tmp_path / "worker.py").write_text(worker)
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(tmp_path / "worker.py"),
                           *(a.format(train=data, val=val) for a in args)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout, check=False)
    return data, val, proc


def test_torchrun_two_cpu_processes(tmp_path, ecssd_pairs, ecssd_val_pairs):
    results = tmp_path / "results"
    results.mkdir()
    run_dir = tmp_path / "run"
    data, _, proc = torchrun_two(tmp_path, WORKER, ecssd_pairs(8), ecssd_val_pairs(1),
                                 "{train}", str(run_dir), str(results), "{val}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    rank0, rank1 = (json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1 == []  # rank 1 wrote nothing in the run folder
    for name in ("state.pt", "last.safetensors", "best.safetensors", "log.csv", "recipe.json"):
        assert any(w.endswith(f"{os.sep}{name}") for w in rank0), (name, rank0)
    for name in ("state.pt", "last.safetensors", "best.safetensors", "recipe.json", "log.csv"):
        assert (run_dir / name).is_file(), name
    state = torch.load(run_dir / "state.pt", weights_only=True)
    assert (state["epoch"], state["global_step"], state["world"]) == (1, 2, 2)  # 8 pairs / 2 ranks / batch 2

    w0, w1 = (torch.load(results / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(torch.equal(w0[k], state["model"][k]) for k in w0)

    # One process at batch 4 sees the same 4 images per step and must reach the same weights (up to rounding).
    recipe = RECIPES["cpu-ecssd"].override(size=32, batch_size=4, epochs=1, dropout=False)
    single = Trainer(recipe, TrainOptions(train=[str(data)], out=str(tmp_path / "single"), workers=0,
                                          progress=False))
    single.run()
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(w0[k], v, rtol=1e-4, atol=1e-6, msg=k)
    initial = Trainer(recipe, TrainOptions(train=[str(data)], out=str(tmp_path / "init"), progress=False))
    assert not torch.allclose(initial.model.fusion.weight, w0["fusion.weight"])  # training did move the weights

    # Stopped after one step, then resumed by a new launch (as tools/train_default.sh does), the run ends where the
    # uninterrupted one did. Each process's run() returns only once process 0 has written state.pt.
    for step in ("stop", "resume"):
        _, _, proc = torchrun_two(tmp_path, WORKER, ecssd_pairs(8), ecssd_val_pairs(1),
                                  "{train}", str(tmp_path / "resumed"), str(results), "{val}", step, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert [(results / f"rank{r}.stopped").read_text() for r in (0, 1)] == ["True", "True"]
    for k, v in torch.load(results / "rank1.pt", weights_only=True).items():
        torch.testing.assert_close(v, w0[k], rtol=1e-4, atol=1e-6, msg=k)


SLOW_VALIDATION = textwrap.dedent("""
    import os, pathlib, sys, time
    import pfanet.train as train
    from pfanet.recipes import RECIPES

    said = pathlib.Path(sys.argv[5])

    def slow_validate(*args, **kwargs):  # rank 0 validates; the other rank waits in the next collective
        (said / "validating").touch()
        time.sleep(600)

    recipe = RECIPES["cpu-ecssd"].override(size=32, batch_size=2, epochs=1, dropout=False)
    options = train.TrainOptions(train=[sys.argv[1]], out=sys.argv[2], val=[sys.argv[3]], workers=0, progress=False,
                                 collective_timeout=float(sys.argv[4]))
    trainer = train.Trainer(recipe, options, validate_fn=slow_validate)
    try:
        trainer.run()
    except Exception as e:
        (said / f"rank{trainer.rank}_error.txt").write_text(f"{type(e).__name__}: {e}")
        raise
""")


def test_the_waiting_rank_gives_up_after_the_collective_timeout(tmp_path, ecssd_pairs, ecssd_val_pairs):
    """Rank 0 validates (here for 10 minutes) while rank 1 waits in a collective: the wait is bounded by
    TrainOptions.collective_timeout (--collective-timeout, default 2 h), not by the process group's default. With 20 s
    the waiting rank fails with a timeout long before the validation would end."""
    _, _, proc = torchrun_two(tmp_path, SLOW_VALIDATION, ecssd_pairs(4), ecssd_val_pairs(1),
                              "{train}", str(tmp_path / "run"), "{val}", "20", str(tmp_path), timeout=400)
    assert proc.returncode != 0
    assert (tmp_path / "validating").is_file(), proc.stderr[-3000:]  # rank 0 got as far as validating
    error = (tmp_path / "rank1_error.txt").read_text()
    assert "Timed out" in error and "20000ms" in error, error
