"""The figures the docs quote from committed result files still equal those files.

A quoted figure carries a marker naming where it comes from, in the Markdown beside it (an HTML comment, so it does
not render; after a code block when the figure is inside one):

    <!-- figure: "TEXT" FILE KEY -->

TEXT is the quote as it stands in the doc (it must appear there); FILE is a JSON file, or a .safetensors whose
metadata `pfanet.weights.read_checkpoint` reads, relative to the repository; KEY is a dotted path into it (list
indices as numbers), optionally `*FACTOR` (e.g. `p50_ms*0.001` for seconds). Every number in TEXT must equal the
value (a list's values, in order) to the decimals quoted; every string value must appear in TEXT.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r'<!-- figure: "([^"]+)" (\S+) (\S+) -->')
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def markers() -> list[tuple[str, str, str, str]]:
    return [(doc.name, *m.groups()) for doc in DOCS for m in MARKER.finditer(doc.read_text())]


def lookup(file: str, key: str):
    path = REPO / file
    if path.suffix == ".safetensors":
        from pfanet.weights import read_checkpoint

        value = read_checkpoint(path)[1]
    else:
        value = json.loads(path.read_text())
    key, _, factor = key.partition("*")
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    values = value if isinstance(value, list) else [value]
    return [v * float(factor) if factor and isinstance(v, (int, float)) else v for v in values]


def quoted_equal(text: str, value: float) -> bool:
    """`text` (one number as written, e.g. "1,047" or "0.43") equals `value` rounded to text's decimals."""
    decimals = len(text.partition(".")[2])
    return abs(float(text.replace(",", "")) - value) <= 0.5 * 10**-decimals + 1e-9


def test_the_docs_have_markers():
    assert len(markers()) >= 10


@pytest.mark.parametrize("doc, text, file, key", markers(), ids=lambda v: str(v)[:40])
def test_quoted_figure_equals_its_file(doc, text, file, key):
    body = MARKER.sub("", (REPO / ("docs" if doc != "README.md" else "") / doc).read_text())
    assert text in body, f"{doc}: the marker quotes {text!r}, which the text no longer says"
    values = lookup(file, key)
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    found = NUMBER.findall(text)
    assert len(found) == len(numbers), f"{doc}: {text!r} quotes {found}, {file} {key} holds {values}"
    for q, v in zip(found, numbers, strict=True):
        assert quoted_equal(q, v), f"{doc}: {text!r} says {q}, {file} {key} holds {v}"
    for v in values:
        if isinstance(v, str):
            assert v in text, f"{doc}: {text!r} should say {v!r} ({file} {key})"


def test_quoted_equal_rounds_to_the_quoted_decimals():
    assert quoted_equal("681", 681.03) and quoted_equal("1.006", 1.00643) and quoted_equal("1,047", 1047.38)
    assert not quoted_equal("936", 943.2) and not quoted_equal("0.44", 0.4279)


def test_usage_health_example_is_what_the_server_answers():
    """docs/USAGE.md's `curl .../health` line: the same keys, input convention and default limits as a real /health
    of the shipped model (the values that depend on the machine, device, backend, weights path, are not compared)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pfanet.predictor import DEFAULT_WEIGHTS, Predictor
    from pfanet.serve import create_app

    usage = (REPO / "docs" / "USAGE.md").read_text().splitlines()
    [line] = [usage[i + 1] for i, s in enumerate(usage) if s.endswith("curl -s http://127.0.0.1:8000/health")]
    shown = json.loads(line)
    real = TestClient(create_app(Predictor(DEFAULT_WEIGHTS, device="cpu"))).get("/health").json()
    assert list(shown) == list(real)
    assert shown["input"] == real["input"] and shown["limits"] == real["limits"]
