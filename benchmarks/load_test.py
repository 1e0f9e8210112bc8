"""`pfanet serve` under load: a real server process on loopback, a bounded pool of clients, valid and hostile input.

    python benchmarks/load_test.py                                   # 300 requests, 8 clients, the shipped model
    python benchmarks/load_test.py --requests 40 --clients 4 --weights tiny.safetensors --json out.json

Starts `pfanet serve` as a subprocess on 127.0.0.1 (under `strace -e trace=%file` when strace works, to see every
path the server touches), waits for /health, warms it up, records its resident memory, then sends the requests from
`--clients` threads (one httpx client each, a per-request timeout): real ECSSD val images and generated odd ones
(gray, 16-bit, CMYK, palette, alpha, 1x1, thin, WebP, BMP, TIFF, EXIF-rotated) that must give 200; broken uploads
(not an image, zero bytes, truncated JPEG/PNG, a decompression-bomb PNG header, over the upload limit with and
without Content-Length, wrong field, not multipart, bad parameters, static-file traversal) that must give their 4xx
with a JSON reason; and valid images under hostile names (`../../../../tmp/pwned.png` as the multipart file name, in
form fields and in the query string) that must give 200 and leave no trace on the file system. A second server with
`--timeout 0.001` checks that the per-request timeout answers 504 and the server stays healthy.

Checks (exit status 1 when one fails): valid input never gets a 5xx (every one 200); every invalid upload gets its
4xx with a JSON `detail`; uploads over the limit get 413; memory after the run is within `--max-rss-ratio` (1.2) of
memory after warm-up; no client-provided name reaches the file system (watched targets, the server's working folder,
the strace log, and serve.py's source never reading the client's file name; without strace, as with --no-strace, this
check fails: it cannot see the server's file calls); the timeout gives 504.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Self

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED_WEIGHTS = REPO / "pfanet" / "weights" / "pfanet_duts.safetensors"
ECSSD = REPO.parent / "shared" / "data" / "ecssd"
# The name a path-traversal upload aims at (the example); the run also aims at a name unique to itself.
PWNED = "/tmp/pwned.png"
TRAVERSAL = "../../../../tmp/pwned.png"


# ---------------------------------------------------------------------------------------------------------------
# The server process


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the server binds it by number, so it cannot be handed over)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # Field 4 is the parent pid; the command name (field 2) may hold spaces, so split after its ')'.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
    return kids


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (uvicorn --workers would fork; the memory of every process counts)."""
    try:
        import psutil

        root = psutil.Process(pid)
        return [pid] + [p.pid for p in root.children(recursive=True)]
    except ImportError:
        tree, todo = [], [pid]
        while todo:
            p = todo.pop()
            tree.append(p)
            todo.extend(_children(p))
        return tree


def rss_bytes(pid: int) -> tuple[int, int]:
    """(resident, peak resident) bytes of `pid` and its descendants, from /proc/PID/status (VmRSS, VmHWM)."""
    rss = peak = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            status = pathlib.Path(f"/proc/{p}/status").read_text()
            rss += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024
            peak += int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024
    return rss, peak


def strace_works() -> bool:
    """Whether `strace -f` may trace here (containers often forbid ptrace)."""
    if not shutil.which("strace"):
        return False
    r = subprocess.run(["strace", "-f", "--seccomp-bpf", "-e", "trace=%file", "-o", os.devnull, "true"],
                       check=False, capture_output=True)
    return r.returncode == 0


class ServerProcess:
    """`pfanet serve` in a subprocess on 127.0.0.1, in its own empty working folder under `workdir`.

    `with ServerProcess(weights, workdir) as server: httpx.get(server.url + "/health")`. With `trace`, the server runs
    under `strace -f -e trace=%file` and every file-system call it makes is logged to `server.trace_log`.
    """

    def __init__(self, weights: str | os.PathLike, workdir: pathlib.Path, port: int = 0, timeout_s: float | None = None,
                 max_upload_mb: float | None = None, trace: bool = False, startup_s: float = 300):
        self.workdir = pathlib.Path(workdir)
        self.cwd = self.workdir / "cwd"  # empty: a relative name the server wrote would land here
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / "server.log"
        self.trace_log = self.workdir / "strace.log" if trace else None
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_s = startup_s
        cmd = [sys.executable, "-m", "pfanet.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--weights", str(pathlib.Path(weights).resolve()), "--log-level", "warning"]
        if timeout_s is not None:
            cmd += ["--timeout", str(timeout_s)]
        if max_upload_mb is not None:
            cmd += ["--max-upload-mb", str(max_upload_mb)]
        if trace:
            cmd = ["strace", "-f", "--seccomp-bpf", "-e", "trace=%file", "-o", str(self.trace_log)] + cmd
        self.cmd = cmd
        self.proc: subprocess.Popen | None = None
        self.pid = 0  # the server's Python process (under strace: strace's child), known once it answers
        self.startup_s_taken = 0.0

    def _server_pid(self) -> int:
        if self.trace_log is None:
            return self.proc.pid
        kids = _children(self.proc.pid)
        if len(kids) != 1:
            raise RuntimeError(f"expected one process under strace {self.proc.pid}, found {kids}")
        return kids[0]

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def start(self) -> None:
        """Launch the process (`wait_ready` then waits for /health; two servers may start side by side)."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.started = time.monotonic()

    def wait_ready(self) -> None:
        deadline = self.started + self.startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pfanet serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    self.pid, self.startup_s_taken = self._server_pid(), time.monotonic() - self.started
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pfanet serve did not answer /health within {self.startup_s:g} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.25)

    def __enter__(self) -> Self:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # The server itself gets the signal: strace would detach and leave it running. uvicorn stops cleanly on
        # SIGTERM, and strace exits once its tracee has.
        target = self.pid
        if not target:  # it never answered: under strace, its child is the server
            kids = _children(self.proc.pid) if self.trace_log else []
            target = kids[0] if kids else self.proc.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, sig)
            try:
                self.proc.wait(30)
                return
            except subprocess.TimeoutExpired:
                continue


# ---------------------------------------------------------------------------------------------------------------
# What the clients send


@dataclass(frozen=True)
class Case:
    """One kind of request: `send(client, url, i)` makes the i-th request of this kind; `expect` is the right status.

    Kinds are named `valid:...` (a decodable image: 200), `invalid:...` (a 4xx with a JSON reason) and `hostile:...`
    (a decodable image under a hostile name: 200, and the name must never reach the file system).
    """

    kind: str
    expect: int
    send: Callable[[httpx.Client, str, int], httpx.Response]
    weight: float = 1.0


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def odd_images(seed: int = 0) -> dict[str, bytes]:
    """Decodable images unlike ECSSD's: modes, formats, shapes and EXIF orientation a user's folder may hold."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (61, 97, 3), dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (61, 97), dtype=np.uint8)))
    palette = rgb.quantize(16)
    palette.info["transparency"] = 0
    rotated = Image.Exif()
    rotated[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return {
        "gray-png": encoded(rgb.convert("L"), "PNG"),
        "16bit-png": encoded(Image.fromarray(rng.integers(0, 65536, (50, 80), dtype=np.uint16)), "PNG"),
        "rgba-png": encoded(rgba, "PNG"),
        "palette-gif": encoded(palette, "GIF", transparency=0),
        "cmyk-jpeg": encoded(rgb.convert("CMYK"), "JPEG"),
        "1x1-png": encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
        "thin-1000x7-png": encoded(Image.fromarray(rng.integers(0, 256, (7, 1000, 3), dtype=np.uint8)), "PNG"),
        "webp": encoded(rgb, "WEBP"),
        "bmp": encoded(rgb, "BMP"),
        "tiff": encoded(rgb, "TIFF"),
        "exif-rotated-jpeg": encoded(rgb, "JPEG", exif=rotated),
    }


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header declares width x height 8-bit gray pixels (2.5 GB decoded) with a 1 MB-of-zeros IDAT: the
    start of a decompression bomb; a server must refuse it from the header, before decoding."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + tag + data + zlib.crc32(tag + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(2**20), 9))
            + chunk(b"IEND", b""))


def build_cases(images: list[bytes], max_upload_bytes: int, token: str) -> list[Case]:
    """The request mix: `images` are encoded real photos, `token` marks this run's hostile target names."""
    odd = odd_images()
    png = odd["gray-png"]
    target = f"/tmp/pfanet-load-{token}.png"
    deep = "../" * 12 + target.lstrip("/")
    weights_target = target.removesuffix(".png") + ".safetensors"
    over = bytes(max_upload_bytes + 2**19)

    def upload(data: bytes | Callable[[int], bytes], route: str = "/predict", name: str = "photo.jpg",
               field_name: str = "file", form: dict | None = None, **params) -> Callable:
        def send(client: httpx.Client, url: str, i: int) -> httpx.Response:
            body = data(i) if callable(data) else data
            return client.post(url + route, files={field_name: (name, body, "application/octet-stream")},
                               data=form, params=params)
        return send

    def photo(i: int) -> bytes:
        return images[i % len(images)]

    def chunked_over(client: httpx.Client, url: str, i: int) -> httpx.Response:
        boundary = f"pfanet-load-{token}"

        def body() -> Iterator[bytes]:  # no Content-Length: the server must count the bytes as they arrive
            yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
                   "Content-Type: image/jpeg\r\n\r\n").encode()
            for _ in range(max_upload_bytes // 2**16 + 8):
                yield bytes(2**16)
            yield f"\r\n--{boundary}--\r\n".encode()

        return client.post(url + "/predict", content=body(),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})

    def raw_body(client: httpx.Client, url: str, i: int) -> httpx.Response:
        return client.post(url + "/predict", content=photo(i), headers={"content-type": "image/jpeg"})

    def get(path: str) -> Callable:
        return lambda client, url, i: client.get(url + path)

    cases = [
        Case("valid:ecssd map", 200, upload(photo), 6),
        Case("valid:ecssd mask t=128", 200, upload(photo, output="mask", threshold=128), 2),
        Case("valid:ecssd edge", 200, upload(photo, output="edge")),
        Case("valid:ecssd cutout", 200, upload(photo, output="cutout"), 2),
        Case("valid:ecssd overlay", 200, upload(photo, output="overlay")),
        Case("valid:ecssd /predict/all", 200, upload(photo, "/predict/all"), 2),
        *(Case(f"valid:{name}", 200, upload(data, name=f"odd.{name.rsplit('-', 1)[-1]}")) for name, data in odd.items()),
        Case("invalid:not an image", 415, upload(b"this is not an image\n" * 50)),
        Case("invalid:zero bytes", 415, upload(b"")),
        Case("invalid:truncated jpeg", 415, upload(lambda i: photo(i)[: len(photo(i)) // 3])),
        Case("invalid:truncated png", 415, upload(odd["rgba-png"][: len(odd["rgba-png"]) // 2], name="t.png")),
        Case("invalid:bomb png 50000x50000", 413, upload(bomb_png(), name="bomb.png")),
        Case("invalid:over upload limit", 413, upload(over)),
        Case("invalid:over limit, chunked", 413, chunked_over),
        Case("invalid:wrong field name", 422, upload(png, field_name="image")),
        Case("invalid:not multipart", 422, raw_body),
        Case("invalid:bad output", 422, upload(png, output="alpha")),
        Case("invalid:bad threshold", 422, upload(png, threshold=300)),
        Case("invalid:bad outputs list", 422, upload(png, "/predict/all", outputs="map,alpha")),
        Case("invalid:traversal in output=", 422, upload(png, output=TRAVERSAL)),
        Case("invalid:static ..%2f", 404, get("/static/..%2f..%2fpfanet%2fserve.py")),
        Case("invalid:static to /tmp", 404, get("/static/" + "..%2f" * 12 + "tmp%2fpwned.png")),
        Case("hostile:traversal filename", 200, upload(png, name=TRAVERSAL)),
        Case("hostile:deep/absolute filename", 200,
             lambda client, url, i: upload(png, name=deep if i % 2 else target)(client, url, i)),
        Case("hostile:traversal form fields", 200,
             upload(png, form={"filename": TRAVERSAL, "path": target, "output_path": deep, "weights": weights_target})),
        Case("hostile:traversal query", 200, upload(png, filename=TRAVERSAL, path=target, out=deep,
                                                    weights=weights_target, output_dir="/tmp")),
    ]
    return cases


def schedule(cases: list[Case], n: int, seed: int = 0) -> list[Case]:
    """n requests: every case at least once (when n allows), the rest drawn by weight, in a shuffled order."""
    rng = random.Random(seed)
    first = list(cases[:n])
    todo = first + rng.choices(cases, [c.weight for c in cases], k=n - len(first))
    rng.shuffle(todo)
    return todo


def hostile_targets(token: str) -> list[pathlib.Path]:
    """Where a server that used a client's name would have written: the files the hostile requests aim at."""
    return [pathlib.Path(PWNED), pathlib.Path(f"/tmp/pfanet-load-{token}.png"),
            pathlib.Path(f"/tmp/pfanet-load-{token}.safetensors")]


# ---------------------------------------------------------------------------------------------------------------
# Running and judging


@dataclass
class Result:
    kind: str
    expect: int
    status: int  # 0: no answer (the client's error is in `reason`)
    reason: str  # the JSON `detail` for errors, "" when a 4xx had none
    json_reason: bool
    seconds: float


def send_one(case: Case, client: httpx.Client, url: str, i: int) -> Result:
    t = time.perf_counter()
    try:
        r = case.send(client, url, i)
    except httpx.HTTPError as e:
        return Result(case.kind, case.expect, 0, f"{type(e).__name__}: {e}", False, time.perf_counter() - t)
    seconds = time.perf_counter() - t
    reason, has_json = "", False
    if r.status_code >= 400:
        with contextlib.suppress(ValueError):
            detail = r.json().get("detail")
            reason = detail if isinstance(detail, str) else json.dumps(detail)[:200]
            has_json = r.headers.get("content-type", "").startswith("application/json") and bool(detail)
    return Result(case.kind, case.expect, r.status_code, reason, has_json, seconds)


def fire(url: str, todo: list[Case], clients: int, timeout_s: float, progress: bool = True, desc: str = "requests"
         ) -> tuple[list[Result], float]:
    """Send `todo` from `clients` threads, one httpx client each; returns the results and the wall time."""
    local, made, lock = threading.local(), [], threading.Lock()

    def work(i: int, case: Case) -> Result:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=timeout_s)
            with lock:
                made.append(local.client)
        return send_one(case, local.client, url, i)

    t = time.perf_counter()
    with ThreadPoolExecutor(clients, thread_name_prefix="load-client") as pool:
        futures = [pool.submit(work, i, case) for i, case in enumerate(todo)]
        results = [f.result() for f in tqdm(as_completed(futures), total=len(futures), desc=desc,
                                            disable=not progress, leave=False)]
    wall = time.perf_counter() - t
    for c in made:
        c.close()
    return results, wall


def file_snapshot(paths: list[pathlib.Path]) -> dict[str, list | None]:
    out = {}
    for p in paths:
        try:
            st = p.stat()
            out[str(p)] = [st.st_size, st.st_mtime_ns]
        except FileNotFoundError:
            out[str(p)] = None
    return out


def serve_source_check(path: pathlib.Path = REPO / "pfanet" / "serve.py") -> list[str]:
    """Lines of serve.py that could hand a client's name to the file system: the upload's `filename`, file opens or
    writes, StaticFiles (which resolves the client's path on disk) and file responses other than the page's own
    files (STATIC / ..., assets[name]). Empty is good."""
    suspects = re.compile(r"\.filename\b|\bopen\(|\.write_(bytes|text)\(|\.save\(|\.unlink\(|\.mkdir\(|shutil\.|"
                          r"os\.(remove|rename|replace)\(|StaticFiles\(|FileResponse\((?!STATIC\b|assets\[)")
    return [f"{path.name}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if suspects.search(line.split("#", 1)[0])]


def trace_hits(trace_log: pathlib.Path, markers: list[str]) -> list[str]:
    """strace lines (file-system calls of the server) that name a client-provided path."""
    hits = []
    with open(trace_log, errors="replace") as f:
        for line in f:
            if any(m in line for m in markers):
                hits.append(line.strip())
    return hits


def percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Report:
    config: dict
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0
    rss: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    timeout: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def by_kind(self) -> dict[str, dict]:
        kinds: dict[str, dict] = {}
        for r in self.results:
            k = kinds.setdefault(r.kind, {"expect": r.expect, "n": 0, "status": Counter(), "seconds": [],
                                          "reasons": Counter()})
            k["n"] += 1
            k["status"][r.status] += 1
            k["seconds"].append(r.seconds)
            if r.reason:
                k["reasons"][r.reason[:160]] += 1
        return kinds

    def to_dict(self) -> dict:
        kinds = {kind: {"expect": k["expect"], "n": k["n"], "status": {str(s): c for s, c in sorted(k["status"].items())},
                        **percentiles(k["seconds"]), "reasons": dict(k["reasons"].most_common(3))}
                 for kind, k in self.by_kind().items()}
        ok = [r.seconds for r in self.results if r.status == 200]
        return {"config": self.config, "wall_s": self.wall_s, "requests_per_s": len(self.results) / self.wall_s,
                "latency_200": percentiles(ok), "latency_all": percentiles([r.seconds for r in self.results]),
                "status": {str(s): c for s, c in sorted(Counter(r.status for r in self.results).items())},
                "rss": self.rss, "files": self.files, "timeout": self.timeout, "kinds": kinds,
                "checks": [vars(c) for c in self.checks], "passed": self.passed}

    def table(self) -> str:
        d = self.to_dict()
        lines = ["| kind | expected | n | statuses | p50 ms | p90 ms | max ms |", "|---|---|---|---|---|---|---|"]
        for kind, k in sorted(d["kinds"].items()):
            statuses = ", ".join(f"{s}x{c}" for s, c in k["status"].items())
            lines.append(f"| {kind} | {k['expect']} | {k['n']} | {statuses} | {k['p50_ms']:.0f} | {k['p90_ms']:.0f} "
                         f"| {k['max_ms']:.0f} |")
        lat, rss = d["latency_200"], self.rss
        lines += ["",
                  (f"{len(self.results)} requests from {self.config['clients']} clients in {self.wall_s:.1f} s "
                   f"({d['requests_per_s']:.2f} req/s); statuses {d['status']}"),
                  (f"latency of the 200s: p50 {lat.get('p50_ms', 0):.0f} ms, p90 {lat.get('p90_ms', 0):.0f} ms, "
                   f"p99 {lat.get('p99_ms', 0):.0f} ms, max {lat.get('max_ms', 0):.0f} ms"),
                  (f"server RSS: {rss['warm_mib']:.0f} MiB after warm-up, {rss['after_mib']:.0f} MiB after the run "
                   f"(x{rss['ratio']:.3f}), peak {rss['peak_mib']:.0f} MiB"),
                  ""]
        lines += [f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)


def judge(report: Report, max_rss_ratio: float | None) -> list[Check]:
    """The checks of issue 7, item 4, from what a run recorded."""
    checks = []
    good = [r for r in report.results if r.expect == 200]
    wrong = Counter((r.kind, r.status) for r in good if r.status != 200)
    fivexx = sum(1 for r in good if r.status >= 500 or r.status == 0)
    checks.append(Check("valid input: 200, never 5xx", not wrong,
                        f"{len(good) - sum(wrong.values())}/{len(good)} got 200, {fivexx} got 5xx or no answer"
                        + (f"; wrong: {dict(wrong)}" if wrong else "")))
    bad = [r for r in report.results if r.expect != 200]
    wrong = Counter((r.kind, r.status) for r in bad if r.status != r.expect or not r.json_reason)
    checks.append(Check("invalid input: its 4xx with a JSON reason", not wrong,
                        f"{len(bad) - sum(wrong.values())}/{len(bad)} as expected"
                        + (f"; wrong (kind, status): {dict(wrong)}" if wrong else "")))
    over = [r for r in report.results if r.expect == 413]
    checks.append(Check("upload and pixel limits: 413", bool(over) and all(r.status == 413 for r in over),
                        f"{sum(r.status == 413 for r in over)}/{len(over)} over-limit uploads got 413 "
                        f"(limit {report.config['max_upload_mb']:g} MiB)"))
    if max_rss_ratio is not None:
        checks.append(Check(f"memory after the run <= {max_rss_ratio:g} x after warm-up",
                            report.rss["ratio"] <= max_rss_ratio, f"x{report.rss['ratio']:.3f}"))
    f = report.files
    problems = [p for p, before in f["before"].items() if f["after"][p] != before]
    problems += [f"server cwd holds {n}" for n in f["cwd_after"]]
    problems += [f"serve.py: {line}" for line in f["source"]]
    problems += [f"strace: {line}" for line in f.get("trace_hits", [])[:5]]
    if not f.get("traced"):  # without the trace the check cannot see the server's file calls: it fails, not passes
        problems.append("not traced: strace could not run here (install strace; ptrace must be allowed)")
    checks.append(Check("no client-provided path reaches the file system", not problems,
                        "; ".join(problems) if problems else f"strace of every file call, {len(f['before'])} targets "
                                                             "untouched, cwd empty, serve.py never uses the client's "
                                                             "name"))
    t = report.timeout
    if t:
        ok = all(s == 504 for s in t["statuses"]) and all("longer than" in d for d in t["details"]) and \
            t["health_after"] == 200
        checks.append(Check("request timeout: 504 with a reason, server stays up", ok,
                            f"--timeout {t['timeout_s']:g}: statuses {t['statuses']}, /health after: "
                            f"{t['health_after']}"))
    return checks


def timeout_check(server: ServerProcess, image: bytes, n: int = 3) -> dict:
    """`server` runs with a per-request timeout (`--timeout`) shorter than any real prediction: each upload of a real
    image must get 504 with a reason, and the server must go on answering /health."""
    with httpx.Client(timeout=120) as client:
        timeout_s = client.get(server.url + "/health").json()["limits"]["timeout_s"]
        responses = [client.post(server.url + "/predict", files={"file": ("photo.jpg", image, "image/jpeg")})
                     for _ in range(n)]
        health = client.get(server.url + "/health").status_code
    return {"timeout_s": timeout_s, "statuses": [r.status_code for r in responses],
            "details": [r.json().get("detail", "") if r.status_code >= 400 else "" for r in responses],
            "health_after": health}


def run_load(weights: str | os.PathLike, images: list[pathlib.Path], requests: int = 300, clients: int = 8,
             port: int = 0, max_upload_mb: float | None = None, client_timeout_s: float = 300,
             max_rss_ratio: float | None = 1.2, trace: bool | None = None, check_timeout: bool = True,
             full_warmup: bool = True, progress: bool = True, seed: int = 0) -> Report:
    """Start a server, warm it up, load it, and judge the run (see the module docstring).

    Args:
        images: real photos (valid uploads).
        max_upload_mb: the server's upload limit (None: the server's default).
        max_rss_ratio: the memory check's bound (None: recorded, not checked).
        trace: run the server under strace (None: when strace works here).
        full_warmup: warm up with every kind of request once and two rounds of photos (False: one round of photos).
    """
    trace = strace_works() if trace is None else trace
    token = f"{os.getpid()}-{random.Random().randrange(16**8):08x}"
    photos = [p.read_bytes() for p in images]
    targets = hostile_targets(token)
    with tempfile.TemporaryDirectory(prefix="pfanet-load-") as tmp, contextlib.ExitStack() as stack:
        tmp = pathlib.Path(tmp)
        server = ServerProcess(weights, tmp / "load", port, max_upload_mb=max_upload_mb, trace=trace)
        # The timeout check's server (--timeout shorter than any prediction) starts alongside, then idles in its own
        # process until the load is over: it shares no memory with the measured one.
        slow = ServerProcess(weights, tmp / "timeout", timeout_s=0.001) if check_timeout else None
        for s in filter(None, (server, slow)):
            s.start()
            stack.callback(s.stop)
        for s in filter(None, (server, slow)):
            s.wait_ready()
        health = httpx.get(server.url + "/health").json()
        limits = health["limits"]
        cases = build_cases(photos, int(limits["max_upload_mb"] * 2**20), token)
        config = {"weights": str(weights), "input": health["input"], "requests": requests, "clients": clients,
                  "url": server.url,
                  "max_upload_mb": limits["max_upload_mb"], "server_timeout_s": limits["timeout_s"],
                  "max_queue": limits["max_queue"], "client_timeout_s": client_timeout_s,
                  "images": len(images), "cases": len(cases), "seed": seed, "strace": trace,
                  "cpu_count": os.cpu_count(), "nice": os.nice(0), "startup_s": server.startup_s_taken}
        report = Report(config)
        before = file_snapshot(targets)
        # Warm-up: every kind once, then two rounds of real photos at full concurrency (threads, allocator).
        warm = cases + [cases[0]] * (2 * clients) if full_warmup else [cases[0]] * clients
        _, warm_s = fire(server.url, warm, clients, client_timeout_s, progress, "warm-up")
        config.update(warmup_requests=len(warm), warmup_s=warm_s)
        time.sleep(1)
        warm_rss, _ = rss_bytes(server.pid)
        report.results, report.wall_s = fire(server.url, schedule(cases, requests, seed), clients,
                                             client_timeout_s, progress)
        time.sleep(1)
        after_rss, peak = rss_bytes(server.pid)
        report.rss = {"warm_mib": warm_rss / 2**20, "after_mib": after_rss / 2**20, "peak_mib": peak / 2**20,
                      "ratio": after_rss / warm_rss, "source": "psutil" if _has_psutil() else "/proc/PID/status"}
        server.stop()  # before reading its trace and folder: strace has written everything once it exits
        markers = ["pwned", token]
        report.files = {"before": before, "after": file_snapshot(targets), "traced": trace,
                        "cwd_after": sorted(p.name for p in server.cwd.iterdir()),
                        "source": serve_source_check(),
                        "trace_hits": trace_hits(server.trace_log, markers) if trace else []}
        if slow:
            report.timeout = timeout_check(slow, photos[0])
    report.checks = judge(report, max_rss_ratio)
    return report


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def val_images(data: pathlib.Path, n: int) -> list[pathlib.Path]:
    """The first n images of ECSSD val.txt (never test.txt)."""
    from pfanet.data import read_list_file

    return [img for img, _ in read_list_file(data / "val.txt")[:n]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="requests after the warm-up (default 300)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8, the server's queue)")
    ap.add_argument("--weights", default=str(SHIPPED_WEIGHTS), help="model weights (default: the shipped model)")
    ap.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    ap.add_argument("--data", default=str(ECSSD), help="ECSSD folder; its val.txt images are the valid photos")
    ap.add_argument("--images", type=int, default=20, help="how many val images to send (default 20)")
    ap.add_argument("--max-upload-mb", type=float, help="the server's upload limit (default: the server's, 20)")
    ap.add_argument("--client-timeout", type=float, default=300, help="seconds a client waits per request")
    ap.add_argument("--max-rss-ratio", type=float, default=1.2, help="memory after / after warm-up (default 1.2)")
    ap.add_argument("--no-strace", action="store_true", help="do not run the server under strace")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = ap.parse_args(argv)

    report = run_load(args.weights, val_images(pathlib.Path(args.data), args.images), args.requests, args.clients,
                      args.port, args.max_upload_mb, args.client_timeout, args.max_rss_ratio,
                      trace=False if args.no_strace else None)
    print(report.table())
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
