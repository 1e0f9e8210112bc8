"""`pfanet serve` under load, small: benchmarks/load_test.py's harness (a real server process on loopback, a bounded
pool of clients, valid, invalid and hostile uploads) with 40 requests from 4 clients and the tiny random weights.

The same checks as the full benchmark, each asserted on its own so a failure names what broke.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_benchmark():
    """benchmarks/ is scripts, not a package: load load_test.py by path (registered first, for its dataclasses)."""
    name = "pfanet_bench_load_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "load_test.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


lt = load_benchmark()


@pytest.fixture(scope="module")
def report(weights, ecssd_val_pairs):
    images = [img for img, _ in ecssd_val_pairs(6)]
    # max_rss_ratio=None: the ratio is recorded but not judged by the harness; see test_memory_roughly_flat.
    return lt.run_load(weights, images, requests=40, clients=4, max_upload_mb=1, max_rss_ratio=None,
                       full_warmup=False, progress=False)


def check(report, name: str):
    [found] = [c for c in report.checks if c.name.startswith(name)]
    return found


def test_every_kind_was_sent(report):
    # 40 requests cover every kind once, so each check below saw each kind.
    assert len({r.kind for r in report.results}) == report.config["cases"] <= 40
    assert len(report.results) == 40


def test_valid_input_gets_200_never_5xx(report):
    c = check(report, "valid input")
    assert c.passed, c.detail
    assert all(r.status == 200 for r in report.results if r.kind.startswith(("valid:", "hostile:")))


def test_invalid_input_gets_its_4xx_with_a_json_reason(report):
    c = check(report, "invalid input")
    assert c.passed, c.detail
    invalid = [r for r in report.results if r.kind.startswith("invalid:")]
    assert invalid and all(400 <= r.status < 500 and r.reason for r in invalid)
    # The reasons say what was wrong, in the server's words.
    reasons = {r.kind: r.reason for r in invalid}
    assert "not an image" in reasons["invalid:not an image"]
    assert "pixels" in reasons["invalid:bomb png 50000x50000"]
    assert "limit of 1 MB" in reasons["invalid:over upload limit"]
    assert "limit of 1 MB" in reasons["invalid:over limit, chunked"]


def test_upload_limit_is_413(report):
    c = check(report, "upload and pixel limits")
    assert c.passed, c.detail


def test_no_client_path_reaches_the_file_system(report):
    c = check(report, "no client-provided path")
    assert c.passed, c.detail  # fails, not passes, where strace cannot run (install strace; ptrace allowed)
    assert report.config["strace"] and report.files["traced"]
    assert all(v is None for p, v in report.files["after"].items() if "pfanet-load-" in p)  # unique to this run


def test_request_timeout_is_504(report):
    c = check(report, "request timeout")
    assert c.passed, c.detail


def test_memory_roughly_flat(report):
    # Not the benchmark's 1.2: with 40 requests right after a one-round warm-up, the allocator's first growth (thread
    # arenas, the first of each output kind) falls inside the run and is noise next to a leak. A leak of a decoded
    # image or a map per request would still show: 1.5 x the warm server is hundreds of MiB.
    assert report.rss["ratio"] <= 1.5, report.rss


def test_the_file_system_check_fails_without_strace():
    untraced = lt.Report({"max_upload_mb": 1}, files={"before": {}, "after": {}, "cwd_after": [], "source": [],
                                                      "traced": False})
    [c] = [c for c in lt.judge(untraced, None) if c.name.startswith("no client-provided path")]
    assert not c.passed and "strace could not run" in c.detail


def test_source_check_finds_a_client_name(tmp_path):
    # The static check is not vacuous: a server that saved uploads under the client's name is caught.
    bad = tmp_path / "serve.py"
    bad.write_text("async def predict(file):\n    open(file.filename, 'wb').write(await file.read())\n")
    assert len(lt.serve_source_check(bad)) == 1
    assert lt.serve_source_check() == []
