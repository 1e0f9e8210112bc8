"""Bad input at every entry point, from one corpus of awkward files (`write_corpus`): `pfanet predict`, `pfanet
evaluate` (a model on a list file, and folders of maps against masks), training data (`read_pairs` ->
`SaliencyDataset`, and one `pfanet train` run) and the server's /predict.

The promise checked for each file at each entry point: a bad file gets an error that names it and the problem, every
good file is still processed (its outputs exist, at its own size), and the exit status says that something failed.

The 20000 x 10 and 10 x 20000 images are kept apart (`extreme/`) and have tests of their own, whose names contain
"20000", so that `-k 'not 20000'` leaves them out where pre-processing would need a 20000 x 20000 square.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import pathlib
import struct
import sys
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from pfanet import cli
from pfanet.data import SaliencyDataset, read_pairs
from pfanet.transforms import InputSpec

UNICODE_NAME = "a b é 猫"  # spaces and non-ASCII characters in one file name
SPEC = InputSpec(size=32)


# --- the corpus -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One image/mask pair of the corpus and what every entry point must make of it.

    Attributes:
        id: the test id.
        image: the image file (absent for a list entry naming a missing file).
        mask: its ground-truth mask (absent likewise).
        bad: the file an error must name, or None when the pair is usable.
        problem: words the error must contain (lower case).
        size: (height, width) of a good image: its outputs must have this size.
        resized: the mask has another size than the image; training refuses the pair, evaluation resizes the map to
            the mask (its documented behaviour, as pysodmetrics users do) and warns.
    """

    id: str
    image: pathlib.Path
    mask: pathlib.Path
    bad: pathlib.Path | None = None
    problem: str = ""
    size: tuple[int, int] = (0, 0)
    resized: bool = False

    @property
    def image_bad(self) -> bool:
        """The image itself cannot be used (so predict and serve refuse it too)."""
        return self.bad == self.image


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An (h, w, 3) uint8 image with structure (a bright disc on a gradient) and some noise."""
    yy, xx = np.mgrid[:h, :w]
    disc = ((yy - h / 2) ** 2 / max(h / 3, 1) ** 2 + (xx - w / 2) ** 2 / max(w / 3, 1) ** 2) < 1
    base = np.stack([xx * 200 // max(w, 1), yy * 200 // max(h, 1), np.full((h, w), 60)], axis=2) + disc[..., None] * 55
    noise = np.random.default_rng(seed).integers(0, 40, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def disc_mask(h: int, w: int) -> np.ndarray:
    return np.where(picture(h, w)[:, :, 2] > 100, 255, 0).astype(np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG of width x height, written chunk by chunk (never as an array): 20000 x 20000 is a 48 kB
    file that would decode to 400 million pixels (1.2 GB as RGB)."""
    packer = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's bits
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit grey, deflate, no filter, not interlaced
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def encoded(image: Image.Image | np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(buf, fmt, **options)
    return buf.getvalue()


def truncated(data: bytes) -> bytes:
    """The first two thirds of a file: headers intact, pixel data cut off."""
    return data[: len(data) * 2 // 3]


H, W = 24, 32  # the ordinary images' size
RGB = picture(H, W)
ALPHA = np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1))
LETTER = b"Dear user,\nthis file is a letter, not a picture.\n" * 20

# Image files: name -> (its bytes, the words its error must contain; "" for a good file).
IMAGE_FILES: dict[str, tuple[Callable[[], bytes], str]] = {
    "zero_bytes.jpg": (lambda: b"", "empty file"),
    "truncated_jpeg.jpg": (lambda: truncated(encoded(picture(48, 64, 1), "JPEG", quality=90)), "truncated"),
    "truncated_png.png": (lambda: truncated(encoded(RGB)), "truncated"),
    "not_an_image.png": (lambda: LETTER, "not an image"),
    "bomb.png": (lambda: bomb_png(20000, 20000), "over the limit"),
    "one_pixel.png": (lambda: encoded(picture(1, 1)), ""),
    "gray16.png": (lambda: encoded(RGB[:, :, 0].astype(np.uint16) * 257), ""),
    "cmyk.jpg": (lambda: encoded(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95), ""),
    "palette.png": (lambda: encoded(Image.fromarray(RGB).convert("P")), ""),
    "palette_transparent.png": (lambda: encoded(Image.fromarray(RGB).convert("P"), transparency=0), ""),
    "rgba.png": (lambda: encoded(np.dstack([RGB, ALPHA])), ""),
    "la.png": (lambda: encoded(np.dstack([RGB[:, :, 1], ALPHA])), ""),
    f"{UNICODE_NAME}.png": (lambda: encoded(RGB), ""),
}
# Masks of an ordinary H x W image: stem -> (the mask's bytes, the words its error must contain; "" for a good mask).
MASK_FILES: dict[str, tuple[Callable[[], bytes], str]] = {
    "mask_all_black": (lambda: encoded(np.zeros((H, W), np.uint8)), ""),
    "mask_16bit": (lambda: encoded(disc_mask(H, W).astype(np.uint16) * 257), ""),
    "mask_rgb": (lambda: encoded(np.repeat(disc_mask(H, W)[:, :, None], 3, axis=2)), ""),
    "mask_size_mismatch": (lambda: encoded(disc_mask(20, 20)), "20x20"),
    "mask_zero_bytes": (lambda: b"", "empty file"),
}
MISSING = ("missing_image", "missing_mask")  # list-file entries naming a file that is not there
EXTREME = {"wide_20000x10": (10, 20000), "tall_10x20000": (20000, 10)}  # stem -> (height, width)
CASE_IDS = [pathlib.PurePath(name).stem for name in IMAGE_FILES] + list(MASK_FILES) + list(MISSING)
BAD_IMAGE_IDS = [pathlib.PurePath(name).stem for name, (_, problem) in IMAGE_FILES.items() if problem]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Where `write_corpus` put the files, and the cases by id."""

    root: pathlib.Path
    images: pathlib.Path  # every image file of `cases`
    masks: pathlib.Path  # the masks, named by their image's stem
    list_file: pathlib.Path  # "image<TAB>mask" per case (tabs: the names have spaces)
    cases: dict[str, Case]
    extreme: dict[str, Case]  # 20000 x 10 and 10 x 20000, in root/extreme

    def bad(self) -> list[Case]:
        return [c for c in self.cases.values() if c.bad is not None]


def write_corpus(root: pathlib.Path) -> Corpus:
    """Write the awkward files under root (images/, masks/, extreme/, list.txt) and say what each must do.

    Bad: a zero-byte .jpg, a truncated JPEG and PNG, text named .png, a decompression bomb, list entries naming a
    missing image or mask, a zero-byte mask, a mask of another size than its image. Good: 1 x 1, 16-bit grey, CMYK
    JPEG, palette PNGs with and without transparency, RGBA, LA, a name with spaces and non-ASCII characters, and
    all-black, 16-bit and RGB masks; 20000 x 10 and 10 x 20000 in extreme/.
    """
    images, masks, extreme = root / "images", root / "masks", root / "extreme"
    for d in (images, masks, extreme):
        d.mkdir(parents=True)
    cases = {}
    for name, (make, problem) in IMAGE_FILES.items():
        image = images / name
        image.write_bytes(make())
        size = (8, 8) if problem else Image.open(image).size[::-1]  # a bad image still has a mask, of any size
        mask = masks / f"{image.stem}.png"
        mask.write_bytes(encoded(disc_mask(*size)))
        cases[image.stem] = Case(image.stem, image, mask, image if problem else None, problem, size)
    for stem, (make, problem) in MASK_FILES.items():
        image, mask = images / f"{stem}.png", masks / f"{stem}.png"
        image.write_bytes(encoded(RGB))
        mask.write_bytes(make())
        cases[stem] = Case(stem, image, mask, mask if problem else None, problem, (H, W),
                           resized=stem == "mask_size_mismatch")
    # The missing image's mask exists (for evaluation by folders: a mask without its map); so does the other's image.
    image, mask = images / "missing_image.jpg", masks / "missing_image.png"
    mask.write_bytes(encoded(disc_mask(H, W)))
    cases["missing_image"] = Case("missing_image", image, mask, image, "no such file")
    image, mask = images / "missing_mask.png", masks / "gone" / "missing_mask.png"
    image.write_bytes(encoded(RGB))
    cases["missing_mask"] = Case("missing_mask", image, mask, mask, "no such file", (H, W))
    assert list(cases) == CASE_IDS

    far = {}
    for stem, (h, w) in EXTREME.items():
        image, mask = extreme / f"{stem}.png", extreme / f"{stem}_mask.png"
        image.write_bytes(encoded(picture(h, w)))
        mask.write_bytes(encoded(disc_mask(h, w)))
        far[stem] = Case(stem, image, mask, size=(h, w))

    list_file = root / "list.txt"
    list_file.write_text("".join(f"{c.image}\t{c.mask}\n" for c in cases.values()), encoding="utf-8")
    return Corpus(root, images, masks, list_file, cases, far)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


class Messages(logging.Handler):
    """Collects pfanet's warnings (evaluation and training report bad files through logging) while a command runs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclasses.dataclass
class Run:
    """A command's exit status, what it said (stderr, then its warnings), and where its outputs went."""

    status: int
    said: str
    out: pathlib.Path | None = None
    scores: dict | None = None

    def lines_about(self, path: pathlib.Path) -> list[str]:
        return [line for line in self.said.splitlines() if str(path) in line]

    def assert_reported(self, case: Case) -> None:
        """Some line names the case's bad file and its problem."""
        lines = self.lines_about(case.bad)
        assert any(case.problem in line.lower() for line in lines), (case.problem, lines or self.said)

    def assert_resized(self, case: Case) -> None:
        """A warning says that the map of the case's image was resized to its mask's size, naming both."""
        assert any("resized" in line and str(case.mask) in line for line in self.lines_about(case.image)), self.said

    def assert_silent_about(self, case: Case) -> None:
        assert not self.lines_about(case.image) and not self.lines_about(case.mask), self.said


def run_cli(*args) -> Run:
    """`pfanet ARGS` in this process."""
    err, messages = io.StringIO(), Messages()
    logger = logging.getLogger("pfanet")
    logger.addHandler(messages)
    try:
        with contextlib.redirect_stderr(err):
            status = cli.main([str(a) for a in args])
    finally:
        logger.removeHandler(messages)
    return Run(status, err.getvalue() + "\n".join(messages.lines))


def size_of(path: pathlib.Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size[::-1]


def test_the_corpus_holds_what_it_claims(corpus):
    """The files really are the awkward kinds named (as Pillow reads them), so the tests below test those kinds."""
    modes = {"one_pixel": "RGB", "gray16": "I;16", "cmyk": "CMYK", "palette": "P", "palette_transparent": "P",
             "rgba": "RGBA", "la": "LA", "mask_16bit": "I;16", "mask_rgb": "RGB"}
    for case_id, mode in modes.items():
        path = corpus.cases[case_id].mask if case_id.startswith("mask") else corpus.cases[case_id].image
        with Image.open(path) as im:
            assert im.mode == mode, case_id
            assert ("transparency" in im.info) == (case_id == "palette_transparent"), case_id
    bomb = corpus.cases["bomb"].image
    assert bomb.stat().st_size < 100_000
    with Image.open(bomb) as im:  # Pillow's own bomb check is off once pfanet.io is imported; pfanet checks itself
        assert im.size == (20000, 20000)
    assert size_of(corpus.cases["mask_size_mismatch"].mask) != size_of(corpus.cases["mask_size_mismatch"].image)
    assert not np.asarray(Image.open(corpus.cases["mask_all_black"].mask)).any()
    on_disk = {p.name for p in corpus.images.iterdir()}
    assert on_disk == {c.image.name for c in corpus.cases.values() if c.image.exists()}
    assert {size_of(c.image) for c in corpus.extreme.values()} == {(10, 20000), (20000, 10)}


# --- pfanet predict -------------------------------------------------------------------------------------------------

KINDS = ("map", "mask", "edge", "cutout", "overlay")


def predict_outputs(out: pathlib.Path, stem: str) -> list[pathlib.Path]:
    return [out / f"{stem}{'' if k == 'map' else '_' + k}.png" for k in KINDS]


@pytest.fixture(scope="module")
def predicted(corpus, weights, tmp_path_factory) -> Run:
    """One `pfanet predict` over the corpus folder and the missing file, every output kind."""
    out = tmp_path_factory.mktemp("predicted")
    run = run_cli("predict", corpus.images, corpus.cases["missing_image"].image, "--weights", weights, "-o", out,
                  "--outputs", ",".join(KINDS), "--no-progress")
    return dataclasses.replace(run, out=out)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_predict(predicted, corpus, case_id):
    case = corpus.cases[case_id]
    outputs = predict_outputs(predicted.out, case.image.stem)
    if case.image_bad:
        summary = Run(predicted.status, predicted.said[predicted.said.index(" failed:") :])  # the list at the end
        summary.assert_reported(case)
        assert not any(p.exists() for p in outputs)
    else:
        assert not predicted.lines_about(case.image)
        for path in outputs:
            assert size_of(path) == case.size, path


def test_predict_exit_status_and_summary(predicted, corpus):
    n_bad = sum(c.image_bad for c in corpus.cases.values())
    assert predicted.status == 1
    assert f"{len(corpus.cases) - n_bad} written" in predicted.said and f"{n_bad} failed:" in predicted.said
    assert "Traceback" not in predicted.said


@pytest.mark.parametrize("case_id", BAD_IMAGE_IDS)
def test_predict_stdin(monkeypatch, corpus, weights, case_id):
    """One image on stdin: a bad one is an error naming <stdin> and the problem, status 2, nothing on stdout."""
    case = corpus.cases[case_id]
    stdin, stdout = io.TextIOWrapper(io.BytesIO(case.image.read_bytes())), io.TextIOWrapper(io.BytesIO())
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    run = run_cli("predict", "-", "--weights", weights)
    assert run.status == 2 and not stdout.buffer.getvalue()
    assert "error: <stdin>: " in run.said and case.problem in run.said.lower(), run.said


# --- pfanet evaluate: a model on a list file -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated_model(corpus, weights, tmp_path_factory) -> Run:
    """`pfanet evaluate` of the tiny model on the corpus list file; `out` holds the maps it saved."""
    out = tmp_path_factory.mktemp("evaluated")
    run = run_cli("evaluate", "--weights", weights, "--data", corpus.list_file, "--save-maps", out / "maps",
                  "--json", out / "scores.json", "--workers", "0", "--no-progress")
    dataset = f"{corpus.root.name}-list"
    scores = json.loads((out / "scores.json").read_text())["tiny"][dataset]
    return dataclasses.replace(run, out=out / "maps" / dataset, scores=scores)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_evaluate_model_on_a_list_file(evaluated_model, corpus, case_id):
    case = corpus.cases[case_id]
    saved = evaluated_model.out / f"{case.image.stem}.png"
    if case.resized:  # documented: a map of another size than its mask is resized to the mask's size, with a warning
        evaluated_model.assert_resized(case)
        assert size_of(saved) == size_of(case.mask)
    elif case.bad is not None:
        evaluated_model.assert_reported(case)
        assert not saved.exists()
    else:
        evaluated_model.assert_silent_about(case)
        assert size_of(saved) == case.size


def test_evaluate_model_counts(evaluated_model, corpus):
    skipped = [c for c in corpus.bad() if not c.resized]
    assert evaluated_model.status == 1  # scored and written; the status says what was skipped (listed on stderr)
    assert f"{len(skipped)} maps or masks skipped" in evaluated_model.said
    assert evaluated_model.scores["n"] == len(corpus.cases) - len(skipped)
    assert all(v is not None and np.isfinite(v) for v in evaluated_model.scores.values())


# --- pfanet evaluate: folders of maps against masks ------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated_folders(corpus, tmp_path_factory) -> Run:
    """The corpus images scored as a method's maps (decoded as masks are) against the corpus masks, by file stem."""
    out = tmp_path_factory.mktemp("folders")
    run = run_cli("evaluate", "--maps", f"corpus={corpus.images}", "--masks", corpus.masks, "--json",
                  out / "scores.json", "--workers", "2", "--no-progress")
    return dataclasses.replace(run, scores=json.loads((out / "scores.json").read_text())["corpus"][corpus.root.name])


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_evaluate_folders(evaluated_folders, corpus, case_id):
    case = corpus.cases[case_id]
    if case_id == "missing_image":  # a mask without its map
        assert any("no map" in line for line in evaluated_folders.lines_about(case.mask)), evaluated_folders.said
    elif case_id == "missing_mask":  # a map without a mask: not scored, counted in one warning (a folder may hold more)
        assert not evaluated_folders.lines_about(case.image)
        assert "1 maps in" in evaluated_folders.said and "not among the masks" in evaluated_folders.said
    elif case.resized:
        evaluated_folders.assert_resized(case)
    elif case.bad is not None:
        evaluated_folders.assert_reported(case)
    else:
        evaluated_folders.assert_silent_about(case)


def test_evaluate_folders_counts(evaluated_folders, corpus):
    skipped = [c for c in corpus.bad() if not c.resized and c.id != "missing_mask"]
    assert evaluated_folders.status == 1
    assert f"{len(skipped)} maps or masks skipped" in evaluated_folders.said
    assert evaluated_folders.scores["n"] == len(corpus.cases) - len(skipped) - 1  # nor the map without a mask
    assert all(v is not None and np.isfinite(v) for v in evaluated_folders.scores.values())


# --- training data -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples(corpus) -> dict[str, tuple[torch.Tensor, torch.Tensor, str | None]]:
    """SaliencyDataset's (input, target, error) for each pair of the corpus list file."""
    pairs = read_pairs(corpus.list_file)
    assert [(i.name, m.name) for i, m in pairs] == [(c.image.name, c.mask.name) for c in corpus.cases.values()]
    dataset = SaliencyDataset(pairs, SPEC)
    return {case_id: dataset[i] for i, case_id in enumerate(corpus.cases)}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_training_pairs(samples, corpus, case_id):
    x, y, error = samples[case_id]
    case = corpus.cases[case_id]
    if case.bad is not None:
        assert error is not None and str(case.bad) in error and case.problem in error.lower(), error
        return
    assert error is None
    assert x.shape == (3, SPEC.size, SPEC.size) and torch.isfinite(x).all()
    assert y.shape == (1, SPEC.size, SPEC.size) and y.min() >= 0 and y.max() <= 1
    if case.size == (H, W):  # padded to 32 x 32 with 4 rows above and below, no resizing: the mask / its maximum
        expected = np.zeros((H, W)) if case_id == "mask_all_black" else disc_mask(H, W) / 255
        np.testing.assert_array_equal(y[0, 4:28].numpy(), expected)


def test_training_run_skips_and_counts_bad_pairs(corpus, tmp_path):
    run = run_cli("train", "--data", corpus.list_file, "-o", tmp_path / "run", "--size", "32", "--batch-size", "10",
                  "--epochs", "1", "--workers", "0", "--no-progress")
    assert run.status == 0, run.said
    for case in corpus.bad():
        run.assert_reported(case)
    assert f"{len(corpus.bad())} training pairs could not be used and were skipped" in run.said
    assert (tmp_path / "run" / "state.pt").is_file()


# --- the server --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(weights):
    pytest.importorskip("httpx")
    with warnings.catch_warnings():  # Starlette would rather have httpx2 behind its TestClient; httpx still works
        warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient` is deprecated")
        from fastapi.testclient import TestClient

    from pfanet.predictor import Predictor
    from pfanet.serve import create_app

    with TestClient(create_app(Predictor(weights, device="cpu"), max_upload_mb=1, timeout_s=300)) as c:
        yield c


def upload(client, path: pathlib.Path):
    """POST the file to /predict under its own name (spaces, non-ASCII and all)."""
    return client.post("/predict", files={"file": (path.name, path.read_bytes(), "application/octet-stream")})


@pytest.mark.parametrize("case_id", [c for c in CASE_IDS if c != "missing_image"])  # nothing to upload
def test_serve(client, corpus, case_id):
    case = corpus.cases[case_id]
    r = upload(client, case.image)
    if case.image_bad:
        assert r.status_code == (413 if case_id == "bomb" else 415), r.text
        detail = r.json()["detail"]
        assert detail.startswith("upload: ") and case.problem in detail.lower(), detail  # never the client's name
    else:
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(r.content)).size[::-1] == case.size


# --- 20000 x 10 and 10 x 20000: only where pre-processing is memory-bounded ---------------------------------------


@pytest.mark.parametrize("case_id", list(EXTREME))
def test_20000_predict(corpus, weights, tmp_path, case_id):
    case = corpus.extreme[case_id]
    run = run_cli("predict", case.image, "--weights", weights, "-o", tmp_path, "--outputs", ",".join(KINDS),
                  "--no-progress")
    assert run.status == 0, run.said
    for path in predict_outputs(tmp_path, case.image.stem):
        assert size_of(path) == case.size, path


@pytest.mark.parametrize("case_id", list(EXTREME))
def test_20000_serve(client, corpus, case_id):
    case = corpus.extreme[case_id]
    r = upload(client, case.image)
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size[::-1] == case.size


@pytest.mark.parametrize("case_id", list(EXTREME))
def test_20000_evaluate_and_training_pair(corpus, weights, tmp_path, case_id):
    case = corpus.extreme[case_id]
    listing = tmp_path / "one.txt"
    listing.write_text(f"{case.image}\t{case.mask}\n")
    run = run_cli("evaluate", "--weights", weights, "--data", listing, "--save-maps", tmp_path / "maps",
                  "--workers", "0", "--no-progress")
    assert run.status == 0 and "skipped" not in run.said, run.said
    assert size_of(tmp_path / "maps" / f"{tmp_path.name}-one" / f"{case.image.stem}.png") == case.size
    x, y, error = SaliencyDataset(read_pairs(listing), SPEC)[0]
    assert error is None and x.shape == (3, SPEC.size, SPEC.size) and torch.isfinite(x).all()
    assert y.shape == (1, SPEC.size, SPEC.size) and 0 < y.sum() < SPEC.size**2
