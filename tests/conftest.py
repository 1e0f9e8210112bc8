"""Shared fixtures. Real data comes from ../shared/data/ecssd beside the repository; tests that need it skip cleanly
when it is absent."""

from __future__ import annotations

import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
ECSSD = REPO.parent / "shared" / "data" / "ecssd"

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """The onnxruntime backend's exported graphs go to a folder of this session (servers started as subprocesses
    inherit it), never to the user's ~/.cache."""
    import os

    folder = tmp_path_factory.mktemp("pfanet-cache")
    old = os.environ.get("PFANET_CACHE")
    os.environ["PFANET_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("PFANET_CACHE", None)
    else:
        os.environ["PFANET_CACHE"] = old


@pytest.fixture(scope="session")
def ecssd() -> pathlib.Path:
    """The ECSSD folder (images/, masks/, train.txt, val.txt, test.txt). Tests must never read test.txt."""
    if not (ECSSD / "train.txt").is_file():
        pytest.skip(f"ECSSD data not found at {ECSSD}")
    return ECSSD


@pytest.fixture(scope="session")
def ecssd_pairs(ecssd):
    """A function n -> the first n (image, mask) pairs of ECSSD train.txt, as absolute paths."""
    from pfanet.data import read_list_file

    pairs = read_list_file(ecssd / "train.txt")
    return lambda n: pairs[:n]


@pytest.fixture(scope="session")
def ecssd_val_pairs(ecssd):
    from pfanet.data import read_list_file

    pairs = read_list_file(ecssd / "val.txt")
    return lambda n: pairs[:n]


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """A tiny random-weight model (InputSpec size 64) in our format, its fusion layer scaled so the map spreads over
    0..255 and masks have something to split."""
    from pfanet.model import PFANet, PFANetConfig
    from pfanet.transforms import InputSpec
    from pfanet.weights import save_checkpoint

    torch.manual_seed(0)
    model = PFANet(PFANetConfig(dropout=False))
    with torch.no_grad():
        model.fusion.weight *= 8
        model.fusion.bias.fill_(-1.0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_checkpoint(path, model, InputSpec(size=64))
    return path
