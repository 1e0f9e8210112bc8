"""`pfanet serve`: a real uvicorn server on 127.0.0.1 and real HTTP requests (httpx).

Every output kind is checked against the Predictor and against independent computations; limits, bad uploads and
bad parameters get the promised 4xx JSON; concurrent requests each get their own image's result; a full queue gets
503 and a slow prediction 504.
"""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from reference import laplace_edges

from pfanet.predictor import Predictor
from pfanet.serve import BackgroundServer, create_app

MAX_UPLOAD_MB = 1
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def predictor(weights):
    return Predictor(weights, device="cpu")


@pytest.fixture(scope="module")
def url(predictor):
    app = create_app(predictor, max_upload_mb=MAX_UPLOAD_MB, max_pixels=MAX_PIXELS, timeout_s=300, max_queue=8)
    with BackgroundServer(app) as base:
        yield base


@pytest.fixture(scope="module")
def images(ecssd_pairs):
    return [img for img, _ in ecssd_pairs(4)]


def post(url: str, data: bytes, path: str = "/predict", **params) -> httpx.Response:
    return httpx.post(url + path, files={"file": ("photo.jpg", data, "image/jpeg")}, params=params, timeout=300)


def png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_health(url):
    r = httpx.get(url + "/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["input"]["size"] == 64 and body["flip"] is False
    assert body["limits"]["max_upload_mb"] == MAX_UPLOAD_MB and body["limits"]["max_pixels"] == MAX_PIXELS


def test_every_output_kind(url, predictor, images):
    path = images[0]
    data = path.read_bytes()
    rgb = np.asarray(Image.open(path).convert("RGB"))
    expected = predictor.predict(path)

    saliency = png(post(url, data))  # output=map is the default
    np.testing.assert_array_equal(saliency, expected)

    r = post(url, data, output="mask")
    mask = png(r)
    threshold = min(2 * expected.mean(), 255)
    np.testing.assert_array_equal(mask, np.where(expected >= threshold, 255, 0))
    assert float(r.headers["x-threshold"]) == pytest.approx(threshold, abs=0.01)

    edge = png(post(url, data, output="edge"))
    assert np.abs(edge.astype(int) - laplace_edges(expected)).max() <= 1

    cut = png(post(url, data, output="cutout"))
    assert cut.shape == rgb.shape[:2] + (4,)
    np.testing.assert_array_equal(cut[:, :, :3], rgb)
    np.testing.assert_array_equal(cut[:, :, 3], expected)

    over = png(post(url, data, output="overlay")).astype(int)
    assert over.shape == rgb.shape
    high = expected > np.percentile(expected, 90)  # tinted red where the map is high
    assert (over[high, 0] - rgb[high, 0]).mean() > 0 > (over[high, 1] - rgb[high, 1]).mean()


def test_fixed_threshold(url, predictor, images):
    expected = predictor.predict(images[1])
    r = post(url, images[1].read_bytes(), output="mask", threshold=140)
    np.testing.assert_array_equal(png(r), np.where(expected >= 140, 255, 0))
    assert r.headers["x-threshold"] == "140.00"


def test_several_outputs_from_one_request(url, predictor, images):
    r = post(url, images[2].read_bytes(), "/predict/all", outputs="map,cutout")
    assert r.status_code == 200, r.text
    body = r.json()
    h, w = np.asarray(Image.open(images[2])).shape[:2]
    assert (body["height"], body["width"]) == (h, w) and set(body["images"]) == {"map", "cutout"}
    saliency = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"]["map"]))))
    np.testing.assert_array_equal(saliency, predictor.predict(images[2]))


def test_docs_and_page(url):
    docs = httpx.get(url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = httpx.get(url + "/openapi.json").json()
    assert {"/predict", "/predict/all", "/health"} <= set(spec["paths"])
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(url + asset).status_code == 200
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)  # nothing loaded from elsewhere
    script = httpx.get(url + "/static/app.js").text
    assert "http://" not in script and "https://" not in script


def test_too_large_upload_is_413(url):
    r = post(url, os.urandom(int(1.5 * MAX_UPLOAD_MB * 2**20)))  # refused from its Content-Length
    assert r.status_code == 413
    assert "limit of 1 MB" in r.json()["detail"]

    boundary = "pfanet-test-boundary"

    def chunks():  # no Content-Length: the body is counted as it comes and cut off at the limit
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
               "Content-Type: image/jpeg\r\n\r\n").encode()
        for _ in range(24):
            yield os.urandom(2**16)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = httpx.post(url + "/predict", content=chunks(), timeout=300,
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "limit of 1 MB" in r.json()["detail"]


def test_too_many_pixels_is_413(url):
    buf = io.BytesIO()
    Image.new("L", (1200, 1000)).save(buf, "PNG")  # 1.2 MP: a few kB of file, over the pixel limit
    r = post(url, buf.getvalue())
    assert r.status_code == 413
    assert "pixels" in r.json()["detail"]


def test_not_an_image_is_415(url, images):
    data = images[0].read_bytes()
    for bad in (b"hello, this is text", b"", data[: len(data) // 3]):
        r = post(url, bad)
        assert r.status_code == 415, (bad[:20], r.text)
        assert r.json()["detail"].startswith("upload:")


def test_bad_parameters_are_422(url, images):
    data = images[0].read_bytes()
    assert post(url, data, output="alpha").status_code == 422
    assert post(url, data, threshold=300).status_code == 422
    assert post(url, data, "/predict/all", outputs="map,alpha").status_code == 422
    missing = httpx.post(url + "/predict", data={"other": "x"})
    assert missing.status_code == 422 and "file" in missing.text


def test_concurrent_requests_get_their_own_results(url, predictor, images):
    expected = [predictor.predict(p) for p in images]
    with ThreadPoolExecutor(len(images)) as pool:
        responses = list(pool.map(lambda p: post(url, p.read_bytes()), images))
    for r, m in zip(responses, expected, strict=True):
        np.testing.assert_array_equal(png(r), m)


class GatedPredictor:
    """The real predictor, held at the forward pass until `gate` opens: makes 'busy' and 'slow' reproducible."""

    def __init__(self, predictor: Predictor):
        self.predictor, self.gate, self.entered = predictor, threading.Event(), threading.Event()
        self.device, self.spec, self.source = predictor.device, predictor.spec, predictor.source

    def predict_rgb(self, rgbs):
        self.entered.set()
        self.gate.wait(60)
        return self.predictor.predict_rgb(rgbs)


def test_full_queue_is_503_and_slow_is_504(predictor, images):
    gated = GatedPredictor(predictor)
    app = create_app(gated, timeout_s=1, max_queue=1)
    data = images[0].read_bytes()
    with BackgroundServer(app) as base, ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, base, data)
        assert gated.entered.wait(60)
        busy = post(base, data)
        assert busy.status_code == 503 and "busy" in busy.json()["detail"] and busy.headers["retry-after"]
        slow = first.result()
        assert slow.status_code == 504 and "longer than 1 s" in slow.json()["detail"]
        app.state.service.timeout_s = 300  # the last request below may take its time on a busy machine
        gated.gate.set()
        deadline = time.monotonic() + 60  # the slot frees when the abandoned prediction ends
        while (r := post(base, data)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.status_code == 200


@pytest.mark.slow
def test_the_serve_command(weights):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pfanet.cli", "serve", "--port", str(port), "--weights",
                             str(weights), "--log-level", "warning"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "pfanet serve did not start"
                time.sleep(0.5)
        assert r.status_code == 200 and r.json()["weights"] == str(weights)
        assert r.json()["backend"] == "onnxruntime"  # --backend auto on the CPU: the fastest faithful path
    finally:
        proc.terminate()
        proc.wait(30)
