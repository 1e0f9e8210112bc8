"""The web page of `pfanet serve`, driven in headless Chromium (Debian's `chromium` through Playwright; no browser is
downloaded). A person's path: pick an image, see map, mask and cut-out, download each. And /docs, rendered with every
request off this server refused (no network).

Chromium is `chromium` on the PATH, the rule .ci/run installs by. Skipped when Playwright or chromium is absent
(`apt-get install chromium`); CI fails before the tests when it cannot install it.
"""

from __future__ import annotations

import io
import shutil
import types

import numpy as np
import pytest
from PIL import Image

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("no chromium on the PATH (apt-get install chromium)", allow_module_level=True)

from pfanet.predictor import Predictor
from pfanet.serve import BackgroundServer, create_app

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
KINDS = {"map": "", "mask": "_mask", "cutout": "_cutout"}
PNG_SIGNATURE = list(b"\x89PNG\r\n\x1a\n")


@pytest.fixture(scope="module")
def predictor(weights):
    return Predictor(weights, device="cpu")


@pytest.fixture(scope="module")
def url(predictor):
    with BackgroundServer(create_app(predictor, timeout_s=300)) as base:
        yield base


@pytest.fixture(scope="module")
def browser(url):
    """A page on the server, with every request it makes and every console error recorded."""
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = chromium.new_context(accept_downloads=True).new_page()
        seen = types.SimpleNamespace(page=page, requests=[], errors=[])
        page.on("request", lambda r: seen.requests.append(r.url))
        page.on("console", lambda m: m.type == "error" and seen.errors.append(m.text))
        page.on("pageerror", lambda e: seen.errors.append(str(e)))
        page.goto(url + "/")
        yield seen
        chromium.close()


def test_pick_an_image_see_and_download_the_results(browser, url, predictor, ecssd_pairs, tmp_path):
    page = browser.page
    image = ecssd_pairs(1)[0][0]
    width, height = Image.open(image).size
    page.set_input_files("#file", str(image))
    for kind in KINDS:  # each result image is shown once decoded
        page.wait_for_selector(f"#img-{kind}[src^='blob:']", timeout=120_000)
        sync_api.expect(page.locator(f"#img-{kind}")).to_have_js_property("complete", True)
    assert page.is_visible("#results")
    assert f"{width} × {height}" in page.inner_text("#status")

    for kind, suffix in KINDS.items():
        shown = page.evaluate(
            "async id => { const im = document.getElementById(id); const r = await fetch(im.src); "
            "const b = new Uint8Array(await r.arrayBuffer()); "
            "return {w: im.naturalWidth, h: im.naturalHeight, head: Array.from(b.slice(0, 8))}; }", f"img-{kind}")
        assert (shown["w"], shown["h"]) == (width, height) and shown["head"] == PNG_SIGNATURE

        with page.expect_download() as info:
            page.click(f"#dl-{kind}")
        download = info.value
        assert download.suggested_filename == f"{image.stem}{suffix}.png"
        saved = tmp_path / download.suggested_filename
        download.save_as(saved)
        got = Image.open(saved)
        assert got.format == "PNG" and got.size == (width, height)
        if kind == "map":
            np.testing.assert_array_equal(np.asarray(got), predictor.predict(image))
        if kind == "mask":
            assert set(np.unique(np.asarray(got))) <= {0, 255}
        if kind == "cutout":
            assert got.mode == "RGBA"

    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert not browser.errors, browser.errors  # CSP violations and script errors show up here
    foreign = [u for u in browser.requests if not u.startswith((url, "blob:", "data:"))]
    assert not foreign, f"the page contacted other origins: {foreign}"


def test_a_non_image_shows_the_servers_message(browser):
    page = browser.page
    page.set_input_files("#file", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"})
    page.wait_for_selector("#status.error", timeout=60_000)
    assert "not an image" in page.inner_text("#status")


def test_fixed_threshold_from_the_page(browser, ecssd_pairs, predictor):
    page = browser.page
    image = ecssd_pairs(1)[0][0]
    page.set_input_files("#file", str(image))
    status = sync_api.expect(page.locator("#status"))
    status.to_contain_text("threshold", timeout=120_000)
    page.uncheck("#adaptive")  # predicts again with the slider's value (128)
    status.to_contain_text("threshold 128.0", timeout=120_000)
    data = page.evaluate(
        "async () => { const r = await fetch(document.getElementById('img-mask').src); "
        "return Array.from(new Uint8Array(await r.arrayBuffer())); }")
    mask = np.asarray(Image.open(io.BytesIO(bytes(data))))
    np.testing.assert_array_equal(mask, np.where(predictor.predict(image) >= 128, 255, 0))


def test_docs_render_offline(browser, url):
    """Swagger UI at /docs with the network cut: every request to another origin is refused and recorded."""
    context = browser.page.context.browser.new_context()  # a fresh page in the same Chromium
    page = context.new_page()
    foreign, errors = [], []
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
               else (foreign.append(route.request.url), route.abort()))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/docs")
    sync_api.expect(page.locator(".swagger-ui .info .title")).to_contain_text("PFANet", timeout=60_000)
    sync_api.expect(page.locator(".opblock-summary-path", has_text="/predict/all")).to_be_visible()
    context.close()
    assert not foreign, f"the docs asked for other origins: {foreign}"
    assert not errors, errors
