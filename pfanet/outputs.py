"""What a saliency map becomes for people: the map itself, a binary mask, its edge map, a transparent cut-out and an
overlay; how they are encoded and written; and batch prediction over files and folders (`pfanet predict`).

Every rendering starts from the uint8 map `Predictor` returns (already at the image's size) and the decoded RGB image,
so the server, the CLI and the Python API all produce the same pixels. The four prediction paths (files and folders,
stdin, the HTTP server, Ray) decode with `pfanet.io.load_image` and hand the images to one pipeline,
`predict_outputs` (predict -> render -> encode); each then delivers the bytes its own way.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import io
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from PIL import Image
from tqdm import tqdm

from .io import IMAGE_EXTENSIONS, ImageError, atomic_write, list_images, load_image

OUTPUT_KINDS = ("map", "mask", "edge", "cutout", "overlay")
# File name suffix after the input's stem: <stem>.png, <stem>_mask.png, ...
SUFFIXES = {"map": "", "mask": "_mask", "edge": "_edge", "cutout": "_cutout", "overlay": "_overlay"}
FORMATS = ("png", "webp")
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp"}  # the server answers in png (pfanet.serve)
OVERLAY_COLOUR = np.array([255, 40, 40], np.float32)  # salient pixels are tinted red ...
OVERLAY_STRENGTH = 0.55  # ... by at most this much, in proportion to the map


def parse_kinds(text: str) -> tuple[str, ...]:
    """ "map,mask" -> ("map", "mask"), in the given order without repeats; unknown names are an error."""
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in OUTPUT_KINDS]
    if unknown or not kinds:
        given = ", ".join(unknown) or "(none given)"
        raise ValueError(f"unknown output {given}; choose from {', '.join(OUTPUT_KINDS)}")
    return kinds


def adaptive_threshold(saliency: np.ndarray) -> float:
    """Twice the mean of the map (the usual adaptive threshold of saliency evaluation), clipped to [1, 255].

    The lower clip keeps an all-black map an empty mask instead of an all-white one.
    """
    return float(np.clip(2.0 * saliency.mean(dtype=np.float64), 1.0, 255.0))


def mask(saliency: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Binary mask (0 or 255): pixels whose map value is >= `threshold` (0..255; None = adaptive)."""
    t = adaptive_threshold(saliency) if threshold is None else float(threshold)
    return np.where(saliency >= t, 255, 0).astype(np.uint8)


def cutout(rgb: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """RGBA image: the input's colours with the saliency map as alpha (a soft, transparent cut-out)."""
    return np.dstack([rgb, saliency])


def overlay(rgb: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """RGB image tinted towards `OVERLAY_COLOUR` where the map is high, to see at a glance what was found."""
    a = saliency.astype(np.float32)[:, :, None] * (OVERLAY_STRENGTH / 255)
    return (rgb.astype(np.float32) * (1 - a) + OVERLAY_COLOUR * a + 0.5).astype(np.uint8)


def render(rgb: np.ndarray, saliency: np.ndarray, kinds: Sequence[str], threshold: float | None = None
           ) -> dict[str, np.ndarray]:
    """The requested renderings of one prediction, by kind."""
    from .transforms import edge_map  # here: transforms imports torch, which the CLI's parser should not wait for

    if rgb.shape[:2] != saliency.shape:
        raise ValueError(f"image {rgb.shape[:2]} and map {saliency.shape} differ in size")
    make = {
        "map": lambda: saliency,
        "mask": lambda: mask(saliency, threshold),
        "edge": lambda: edge_map(saliency),
        "cutout": lambda: cutout(rgb, saliency),
        "overlay": lambda: overlay(rgb, saliency),
    }
    return {k: make[k]() for k in kinds}


def encode(image: np.ndarray, fmt: str = "png") -> bytes:
    """uint8 (H, W), (H, W, 3) or (H, W, 4) -> PNG or lossless WebP bytes (lossless keeps masks binary; `exact`
    keeps the colours under a cut-out's transparent pixels, which WebP would otherwise drop)."""
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, "PNG")
    elif fmt == "webp":
        Image.fromarray(image).save(buf, "WEBP", lossless=True, exact=True)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class Rendered:
    """One image's outputs, ready to deliver: the image's size, the mask threshold used, each kind's encoded bytes."""

    width: int
    height: int
    threshold: float  # the one given, or the adaptive threshold of this map
    files: dict[str, bytes]  # kind -> PNG or WebP bytes, in the order asked


def predict_outputs(predictor, rgbs: Sequence[np.ndarray], kinds: Sequence[str], fmt: str = "png",
                    threshold: float | None = None) -> list[Rendered]:
    """Decoded (H, W, 3) images -> their outputs, encoded: one forward pass, then render and encode each.

    The pipeline every prediction path shares (`predict_files`, `predict_bytes`, the server, the Ray mapper); they
    differ only in how images arrive and where the bytes go.
    """
    maps = predictor.predict_rgb(rgbs)
    out = []
    for rgb, saliency in zip(rgbs, maps, strict=True):
        images = render(rgb, saliency, kinds, threshold)
        used = adaptive_threshold(saliency) if threshold is None else float(threshold)
        out.append(Rendered(rgb.shape[1], rgb.shape[0], used, {k: encode(v, fmt) for k, v in images.items()}))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Batch prediction over files (`pfanet predict`)


@dataclasses.dataclass(frozen=True)
class Job:
    """One input file and where its outputs go: `name` is the output path without suffix, relative to the output
    folder (the stem for a file given by name; the path under the folder for files found in a folder)."""

    source: pathlib.Path
    name: pathlib.PurePath


@dataclasses.dataclass
class Summary:
    """What a batch run did; each failure is a message that starts with the input it is about."""

    written: int = 0
    skipped: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)


def _glob_base(pattern: str) -> pathlib.Path:
    """The leading folders of a glob pattern that contain no wildcard: outputs mirror the paths below it."""
    parts = pathlib.Path(pattern).parts
    base = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        base.append(part)
    return pathlib.Path(*base) if base else pathlib.Path(".")


def collect_jobs(inputs: Sequence[str]) -> tuple[list[Job], list[str]]:
    """Files, folders (searched recursively) and glob patterns -> jobs, plus a message for each input that cannot run.

    Files found in a folder or by a pattern keep their path below it (photos/a/x.jpg -> OUT/a/x.png), so equal names
    in different subfolders do not clash. Names that still clash (x.jpg and x.png; two folders with the same layout)
    are reported, never silently overwritten. A file reached twice is predicted once.
    """
    found: list[Job] = []
    problems: list[str] = []
    for arg in inputs:
        path = pathlib.Path(arg)
        if path.is_dir():
            files = list_images(path, recursive=True)
            if not files:
                problems.append(f"{arg}: no images in this folder")
            found += [Job(f, f.relative_to(path).with_suffix("")) for f in files]
        elif path.is_file():
            found.append(Job(path, pathlib.PurePath(path.stem)))
        elif glob.has_magic(arg):
            base = _glob_base(arg)
            files = sorted(pathlib.Path(m) for m in glob.glob(arg, recursive=True))
            files = [f for f in files if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
            if not files:
                problems.append(f"{arg}: no image matches this pattern")
            found += [Job(f, f.relative_to(base).with_suffix("")) for f in files]
        else:
            problems.append(f"{arg}: no such file or folder")

    jobs, seen, owner = [], set(), {}
    for job in found:
        real = job.source.resolve()
        if real in seen:
            continue
        seen.add(real)
        if job.name in owner:
            problems.append(f"{job.source}: its outputs would be named {job.name}, like those of {owner[job.name]}; "
                            "predict it separately into another output folder")
            continue
        owner[job.name] = job.source
        jobs.append(job)
    return jobs, problems


def output_paths(out_dir: pathlib.Path, name: pathlib.PurePath, kinds: Sequence[str], fmt: str
                 ) -> dict[str, pathlib.Path]:
    """Where each output of one input goes: OUT/<name><suffix>.<fmt>."""
    return {k: out_dir / name.parent / f"{name.name}{SUFFIXES[k]}.{fmt}" for k in kinds}


def pending_jobs(jobs: Sequence[Job], out_dir: pathlib.Path, kinds: Sequence[str], fmt: str, overwrite: bool
                 ) -> list[Job]:
    """The jobs still to do: those missing at least one requested output (all of them with `overwrite`)."""
    if overwrite:
        return list(jobs)
    return [j for j in jobs if not all(p.is_file() for p in output_paths(out_dir, j.name, kinds, fmt).values())]


def _decode_ahead(pool: ThreadPoolExecutor, jobs: Sequence[Job], ahead: int
                  ) -> Iterator[tuple[Job, np.ndarray | ImageError]]:
    """Decode in the thread pool, at most `ahead` images in flight (memory stays bounded on big folders), in order."""
    queue: collections.deque[tuple[Job, Future]] = collections.deque()
    todo = iter(jobs)
    for job in todo:
        queue.append((job, pool.submit(load_image, job.source)))
        if len(queue) >= ahead:
            break
    while queue:
        job, fut = queue.popleft()
        nxt = next(todo, None)
        if nxt is not None:
            queue.append((nxt, pool.submit(load_image, nxt.source)))
        try:
            rgb = fut.result()
        except ImageError as e:
            rgb = e
        except Exception as e:  # noqa: BLE001 -- an unexpected decoder failure is one bad file, not the end of the run
            rgb = ImageError(f"{job.source}: cannot decode ({type(e).__name__}: {e})")
        yield job, rgb


def predict_files(predictor, jobs: Sequence[Job], out_dir: str | os.PathLike, kinds: Sequence[str] = ("map",),
                  fmt: str = "png", threshold: float | None = None, workers: int = 4, progress: bool = True
                  ) -> Summary:
    """Predict `jobs` in batches of `predictor.batch_size` and write their outputs under `out_dir`.

    Decoding runs in `workers` threads ahead of the forward passes. A file that cannot be decoded or written is
    reported in the summary (and at once on stderr) and the rest go on.
    """
    out_dir = pathlib.Path(out_dir)
    summary = Summary()
    batch_size = max(1, predictor.batch_size)
    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=len(jobs), unit="img", disable=not progress,
                                                           desc="predict") as bar:
        def fail(problem: str) -> None:
            summary.failures.append(problem)
            bar.write(f"failed: {problem}", file=sys.stderr)
            bar.update()

        decoded = _decode_ahead(pool, jobs, ahead=2 * batch_size)
        while batch := [item for _, item in zip(range(batch_size), decoded)]:
            good = []
            for job, rgb in batch:
                if isinstance(rgb, ImageError):
                    fail(str(rgb))
                else:
                    good.append((job, rgb))
            rendered = predict_outputs(predictor, [rgb for _, rgb in good], kinds, fmt, threshold)
            for (job, _), result in zip(good, rendered, strict=True):
                try:
                    paths = output_paths(out_dir, job.name, kinds, fmt)
                    for kind, data in result.files.items():
                        atomic_write(paths[kind], data)
                except OSError as e:
                    fail(f"{job.source}: cannot write outputs ({e})")
                    continue
                summary.written += 1
                bar.update()
    return summary


def predict_bytes(predictor, data: bytes, kind: str = "map", fmt: str = "png", threshold: float | None = None,
                  name: str = "<stdin>") -> bytes:
    """Encoded image bytes -> one encoded output (stdin to stdout)."""
    return predict_outputs(predictor, [load_image(data, name=name)], [kind], fmt, threshold)[0].files[kind]


def predict_paths(inputs: Sequence[str], out_dir: str | os.PathLike, make_predictor, kinds: Sequence[str] = ("map",),
                  fmt: str = "png", threshold: float | None = None, overwrite: bool = False, workers: int = 4,
                  progress: bool = True) -> Summary:
    """`pfanet predict` over files, folders and patterns: collect, skip what is done, predict the rest.

    `make_predictor()` is called only when something is left to do, so re-running a finished job loads no model.
    """
    jobs, problems = collect_jobs(inputs)
    todo = pending_jobs(jobs, pathlib.Path(out_dir), kinds, fmt, overwrite)
    summary = Summary()
    if todo:
        summary = predict_files(make_predictor(), todo, out_dir, kinds, fmt, threshold, workers, progress)
    summary.skipped = len(jobs) - len(todo)
    summary.failures[:0] = problems
    return summary
