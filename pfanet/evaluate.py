"""Evaluation of saliency maps against ground-truth masks with the community's reference metrics (pysodmetrics).

Two sources of maps, one scoring path:
- a model (`evaluate_model`): a Predictor runs on the images of one or more datasets;
- folders of maps (`evaluate_folders`): any methods' saved maps, paired with the masks by file stem.

Maps and masks are uint8 at the mask's size (a map of another size is resized to it, with a warning); pysodmetrics
binarises masks at 128 and min-max normalises maps. Images are scored in worker processes, each stepping its own
pysodmetrics objects over a chunk; the per-image results come back and are merged, in dataset order, into one set of
objects whose `get_results` then averages exactly the arrays a single-process pass would average: the numbers are
identical, bit for bit.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .io import ImageError, list_images, load_image, load_mask

log = logging.getLogger(__name__)

BETA2 = 0.3  # beta^2 of the F-measure (Achanta et al. 2009), as every SOD paper reports it
# Metric key -> the pysodmetrics family that computes it.
METRIC_FAMILY = {"mae": "mae", "maxF": "fm", "maxF_pr": "fm", "meanF": "fm", "adpF": "fm", "Sm": "sm",
                 "maxE": "em", "meanE": "em", "adpE": "em", "wF": "wfm"}
METRICS = tuple(METRIC_FAMILY)
FAMILIES = ("mae", "fm", "sm", "em", "wfm")
# Folder names that say "the masks of a dataset" rather than naming the dataset.
GENERIC_MASK_DIRS = {"masks", "mask", "gt", "gts", "groundtruth", "ground_truth", "ground-truth", "labels",
                     "annotation"}
CHUNK = 8  # images per task sent to a worker process


# --------------------------------------------------------------------------------------------------------------------
# Metrics


def max_f_from_pr(precision: np.ndarray, recall: np.ndarray, beta2: float = BETA2) -> float:
    """max over thresholds of F(mean precision, mean recall): the MATLAB evaluation toolbox's max F.

    pysodmetrics' max F instead averages the per-image F curves, then takes the maximum.
    """
    num = (1 + beta2) * precision * recall
    den = beta2 * precision + recall
    f = np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)
    return float(f.max())


@dataclasses.dataclass
class Scores:
    """One method on one dataset: the metrics, the n images behind them, and the curves for plots (thresholds
    0..255 ascending, each averaged over images; empty when the F-measure family was not computed)."""

    metrics: dict[str, float]
    n: int
    precision: np.ndarray
    recall: np.ndarray
    fmeasure: np.ndarray
    skipped: int = 0

    def as_dict(self) -> dict[str, float | int | None]:
        """The JSON form: metrics (None where undefined, e.g. no image scored) and n."""
        d = {k: (None if math.isnan(v) else v) for k, v in self.metrics.items()}
        d["n"] = self.n
        return d


class SODMetrics:
    """pysodmetrics' MAE, F-measure (with precision and recall curves), S-measure, E-measure and weighted F for one
    method on one dataset, whose per-image results can be moved between processes and merged.

    Args:
        families: which pysodmetrics families to compute ("mae", "fm", "sm", "em", "wfm").
    """

    def __init__(self, families: Iterable[str] = FAMILIES):
        import py_sod_metrics as sod

        self.families = tuple(families)
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown metric families {sorted(unknown)}; known: {FAMILIES}")
        self.n = 0
        self.mae = sod.MAE() if "mae" in self.families else None
        self.sm = sod.Smeasure() if "sm" in self.families else None
        self.em = sod.Emeasure() if "em" in self.families else None
        self.wfm = sod.WeightedFmeasure() if "wfm" in self.families else None
        self.fm_handlers = {}
        self.fm = None
        if "fm" in self.families:
            # FmeasureV2 is the maintained form of pysodmetrics' Fmeasure (same numbers, no deprecation warning).
            self.fm_handlers = {"f": sod.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=BETA2),
                                "p": sod.PrecisionHandler(with_dynamic=True, with_adaptive=False),
                                "r": sod.RecallHandler(with_dynamic=True, with_adaptive=False)}
            self.fm = sod.FmeasureV2(dict(self.fm_handlers))

    def step(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one uint8 map and its uint8 mask (same size)."""
        from py_sod_metrics.utils import validate_and_normalize_input

        # Normalise once (mask > 128, map min-max to [0, 1], exactly pysodmetrics' prepare_data) instead of 5 times.
        pred, gt = validate_and_normalize_input(pred, gt, normalize=True)
        for m in (self.mae, self.sm, self.em, self.wfm, self.fm):
            if m is not None:
                m.step(pred=pred, gt=gt, normalize=False)
        self.n += 1

    def _per_image(self) -> dict[str, list]:
        """The live per-image lists pysodmetrics keeps and averages in get_results (the one place that names them)."""
        lists: dict[str, list] = {}
        if self.mae is not None:
            lists["mae"] = self.mae.maes
        if self.sm is not None:
            lists["sm"] = self.sm.sms
        if self.em is not None:
            lists["em.adaptive"], lists["em.curve"] = self.em.adaptive_ems, self.em.changeable_ems
        if self.wfm is not None:
            lists["wfm"] = self.wfm.weighted_fms
        for name, h in self.fm_handlers.items():
            lists[f"fm.{name}.dynamic"] = h.dynamic_results
            if h.adaptive_results is not None:
                lists[f"fm.{name}.adaptive"] = h.adaptive_results
        return lists

    def state(self) -> dict:
        """Per-image results so far, to send to another process and `merge` there."""
        return {"n": self.n, "lists": {k: list(v) for k, v in self._per_image().items()}}

    def merge(self, state: dict) -> None:
        """Append another instance's per-image results (call in dataset order for results identical to one pass)."""
        mine = self._per_image()
        if set(mine) != set(state["lists"]):
            raise ValueError(f"cannot merge metrics {sorted(state['lists'])} into {sorted(mine)}")
        for k, v in state["lists"].items():
            mine[k].extend(v)
        self.n += state["n"]

    def results(self) -> Scores:
        """All metrics of the families computed; NaN (and empty curves) when no image was added."""
        empty = np.zeros(0)
        keys = [k for k in METRICS if METRIC_FAMILY[k] in self.families]
        if self.n == 0:
            return Scores({k: float("nan") for k in keys}, 0, empty, empty, empty)
        r: dict[str, float] = {}
        p = rcl = f = empty
        if self.mae is not None:
            r["mae"] = float(self.mae.get_results()["mae"])
        if self.fm is not None:
            res = self.fm.get_results()
            # pysodmetrics orders the curves by threshold 255, 254, ..., 0; plots want 0..255.
            f, p, rcl = (np.asarray(res[k]["dynamic"], np.float64)[::-1].copy() for k in ("f", "p", "r"))
            r.update(maxF=float(f.max()), maxF_pr=max_f_from_pr(p, rcl), meanF=float(f.mean()),
                     adpF=float(res["f"]["adaptive"]))
        if self.sm is not None:
            r["Sm"] = float(self.sm.get_results()["sm"])
        if self.em is not None:
            em = self.em.get_results()["em"]
            r.update(maxE=float(np.max(em["curve"])), meanE=float(np.mean(em["curve"])), adpE=float(em["adp"]))
        if self.wfm is not None:
            r["wF"] = float(self.wfm.get_results()["wfm"])
        return Scores({k: r[k] for k in keys}, self.n, p, rcl, f)


def families_of(metrics: Iterable[str]) -> tuple[str, ...]:
    """The pysodmetrics families needed for some metric keys."""
    wanted = set()
    for k in metrics:
        if k == "n":
            continue
        if k not in METRIC_FAMILY:
            raise ValueError(f"unknown metric {k!r}; known: {', '.join(METRICS)}")
        wanted.add(METRIC_FAMILY[k])
    return tuple(f for f in FAMILIES if f in wanted)


# --------------------------------------------------------------------------------------------------------------------
# Scoring jobs, in worker processes


@dataclasses.dataclass(frozen=True)
class MapJob:
    """One map to score: a file or an array (a model's prediction), its mask file, and where to save it (optional)."""

    mask: pathlib.Path
    map: pathlib.Path | np.ndarray
    label: str  # how messages name the map
    save: pathlib.Path | None = None


@dataclasses.dataclass
class ChunkResult:
    state: dict
    skipped: list[str]  # "path: problem", one per image left out
    resized: list[str]


def fit_to_mask(pred: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Resize a map to its mask's size: bilinear, as cv2.resize(INTER_LINEAR) in the common evaluation toolkits."""
    import cv2

    return cv2.resize(pred, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_LINEAR)


def score_chunk(families: tuple[str, ...], jobs: Sequence[MapJob]) -> ChunkResult:
    """Score some maps with fresh metric objects (runs in a worker process); unusable pairs are reported, not fatal."""
    metrics = SODMetrics(families)
    skipped, resized = [], []
    for job in jobs:
        try:
            mask = load_mask(job.mask)
        except (ImageError, OSError) as e:
            skipped.append(f"mask {e}")
            continue
        try:
            pred = job.map if isinstance(job.map, np.ndarray) else load_mask(job.map)
        except (ImageError, OSError) as e:
            skipped.append(f"map {e}")
            continue
        if pred.shape != mask.shape:
            resized.append(f"{job.label}: map is {pred.shape[1]}x{pred.shape[0]} but mask {job.mask} is "
                           f"{mask.shape[1]}x{mask.shape[0]}; map resized to the mask's size")
            pred = fit_to_mask(pred, mask)
        if job.save is not None:
            from PIL import Image

            job.save.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pred).save(job.save)
        metrics.step(pred, mask)
    return ChunkResult(metrics.state(), skipped, resized)


Key = tuple[str, str]  # (method, dataset)
# A unit of work: its (method, dataset), maps to score, and pairs already found unusable (e.g. unreadable images).
Chunk = tuple[Key, list[MapJob], list[str]]


def _pool_context():
    # fork starts workers at once (they need nothing the parent has not imported), as DataLoader workers do on
    # Linux; elsewhere the platform's default.
    return multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None


def run_chunks(chunks: Iterable[Chunk], keys: Sequence[Key], total: int, families: tuple[str, ...] = FAMILIES,
               workers: int = 2, progress: bool = True) -> dict[Key, Scores]:
    """Score chunks (generated lazily) in `workers` processes (0: in this process) and merge them per key in the
    order they were generated."""
    done: dict[Key, list[tuple[int, ChunkResult]]] = {k: [] for k in keys}
    resized_count = dict.fromkeys(keys, 0)
    bar = tqdm(total=total, disable=not progress, desc="evaluating", unit="img", dynamic_ncols=True)

    def collect(key: Key, index: int, res: ChunkResult, n: int) -> None:
        for msg in res.skipped:
            log.warning("%s / %s: skipped %s", *key, msg)
        for msg in res.resized:
            if resized_count[key] < 5:  # a method whose maps all have another size would flood the log
                log.warning("%s / %s: %s", *key, msg)
            resized_count[key] += 1
        done[key].append((index, res))
        bar.update(n)

    with logging_redirect_tqdm(), bar:
        if workers <= 0:
            for i, (key, jobs, bad) in enumerate(chunks):
                res = score_chunk(families, jobs)
                res.skipped[:0] = bad
                collect(key, i, res, len(jobs) + len(bad))
        else:
            import py_sod_metrics  # noqa: F401  (imported once here: forked workers inherit it instead of each paying)

            with cf.ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
                pending: dict[cf.Future, tuple[Key, int, list[str], int]] = {}

                def drain(block_until: int) -> None:
                    while len(pending) > block_until:
                        finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                        for fut in finished:
                            key, i, bad, n = pending.pop(fut)
                            res = fut.result()
                            res.skipped[:0] = bad
                            collect(key, i, res, n)

                for i, (key, jobs, bad) in enumerate(chunks):
                    pending[pool.submit(score_chunk, families, jobs)] = (key, i, bad, len(jobs) + len(bad))
                    drain(2 * workers)  # bounded: a model's maps are not all held in memory at once
                drain(0)

    scores = {}
    for key in keys:
        metrics = SODMetrics(families)
        skipped = 0
        for _, res in sorted(done[key], key=lambda t: t[0]):
            metrics.merge(res.state)
            skipped += len(res.skipped)
        scores[key] = metrics.results()
        scores[key].skipped = skipped
        if resized_count[key] > 5:
            log.warning("%s / %s: %d maps in all were resized to their mask's size", *key, resized_count[key])
    return scores


def _chunked(key: Key, jobs: Iterable[MapJob | str], size: int = CHUNK) -> Iterator[Chunk]:
    """Group jobs (or strings: pairs already found unusable) into chunks of `size` maps."""
    batch: list[MapJob] = []
    bad: list[str] = []
    for job in jobs:
        if isinstance(job, str):
            bad.append(job)
            continue
        batch.append(job)
        if len(batch) == size:
            yield key, batch, bad
            batch, bad = [], []
    if batch or bad:
        yield key, batch, bad


# --------------------------------------------------------------------------------------------------------------------
# Sources of maps


Report = dict[str, dict[str, Scores]]  # method -> dataset -> scores


def _report(scores: dict[Key, Scores]) -> Report:
    report: Report = {}
    for (method, dataset), s in scores.items():
        report.setdefault(method, {})[dataset] = s
    return report


def masks_dataset_name(masks: str | os.PathLike) -> str:
    """A dataset name for a masks source: the folder's name, or its parent's when the folder is just "masks"/"GT"
    (DUTS-TE/DUTS-TE-Mask -> DUTS-TE, ecssd/masks -> ecssd); a list file as pfanet.data.dataset_name."""
    from .data import dataset_name

    p = pathlib.Path(masks).resolve()
    if p.is_dir():
        name = p.name.lower()
        if name in GENERIC_MASK_DIRS:
            return p.parent.name
        if name.endswith("-mask"):
            return p.name[: -len("-mask")]
    return dataset_name(p)


def read_masks(masks: str | os.PathLike) -> list[pathlib.Path]:
    """Mask files from a folder of masks, a benchmark folder (images + masks) or a list file ("image mask")."""
    from .data import DataError, find_folder_pairs, read_pairs

    p = pathlib.Path(masks)
    if p.is_dir() and find_folder_pairs(p) is None:
        found = list_images(p)
        if not found:
            raise DataError(f"{p}: no mask images in this folder")
        return found
    return [m for _, m in read_pairs(p)]


def parse_method(spec: str) -> tuple[str, pathlib.Path]:
    """"NAME=DIR" or "DIR" (named after the folder) -> (name, folder)."""
    name, sep, folder = spec.partition("=")
    if sep and name and os.sep not in name and not pathlib.Path(spec).is_dir():
        return name, pathlib.Path(folder)
    p = pathlib.Path(spec)
    return p.resolve().name, p


def methods_by_name(specs: Iterable[str]) -> dict[str, pathlib.Path]:
    """"NAME=DIR" or "DIR" specs (`parse_method`) -> {method name: folder of its maps}; two of one name are an
    error."""
    from .data import DataError

    methods = {}
    for spec in specs:
        name, folder = parse_method(spec)
        if name in methods:
            raise DataError(f"two methods are both named {name!r} (name them: NAME=DIR)")
        methods[name] = folder
    return methods


def datasets_by_name(sources: Iterable[str | os.PathLike], limit: int | None = None) -> dict[str, list[tuple]]:
    """List files or benchmark folders -> {dataset name (`pfanet.data.dataset_name`): its first `limit` (image,
    mask) pairs}; two of one name are an error."""
    from .data import DataError, dataset_name, read_pairs

    datasets = {}
    for source in sources:
        name = dataset_name(source)
        if name in datasets:
            raise DataError(f"two datasets are both named {name!r}")
        datasets[name] = read_pairs(source)[:limit]
    return datasets


def evaluate_folders(methods: dict[str, str | os.PathLike], masks: str | os.PathLike, dataset: str | None = None,
                     workers: int = 2, progress: bool = True, metrics: Sequence[str] = METRICS) -> Report:
    """Score folders of maps, one per method, against one set of masks, paired by file stem.

    A mask with no map (or an unreadable map or mask) is reported with its path and skipped; maps with no mask are
    ignored with a warning.

    Args:
        methods: method name -> folder of its maps.
        masks: a folder of masks, a benchmark folder or a list file (e.g. ecssd/val.txt: only those masks).
        dataset: the dataset's name in the report (default from the masks' folder).
        workers: scoring processes (0: this process).
        metrics: metric keys to compute (default all).
    """
    from .data import DataError

    mask_files = read_masks(masks)
    dataset = dataset or masks_dataset_name(masks)
    mask_stems = {m.stem for m in mask_files}
    jobs: dict[Key, list[MapJob | str]] = {}
    for method, folder in methods.items():
        folder = pathlib.Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder of maps (method {method})")
        maps = {p.stem: p for p in list_images(folder)}
        extra = len(set(maps) - mask_stems)
        if extra:
            log.warning("%s: %d maps in %s are not among the masks (by file stem) and are ignored", method, extra,
                        folder)
        jobs[(method, dataset)] = [MapJob(mask=m, map=maps[m.stem], label=str(maps[m.stem])) if m.stem in maps
                                   else f"{folder / m.stem}.*: no map for mask {m}" for m in mask_files]
    chunks = (c for key, js in jobs.items() for c in _chunked(key, js))
    scores = run_chunks(chunks, list(jobs), sum(map(len, jobs.values())), families_of(metrics), workers, progress)
    return _report(scores)


def _predicted_jobs(predictor, pairs, save: pathlib.Path | None) -> Iterator[MapJob | str]:
    """Maps of a model for (image, mask) pairs, a batch at a time; an unreadable image becomes its message."""
    for start in range(0, len(pairs), predictor.batch_size):
        batch, rgbs = [], []
        for img, mask in pairs[start : start + predictor.batch_size]:
            try:
                rgbs.append(load_image(img))
                batch.append((pathlib.Path(img), pathlib.Path(mask)))
            except ImageError as e:
                yield f"image {e}"
        for (img, mask), pred in zip(batch, predictor.predict_rgb(rgbs) if rgbs else []):
            yield MapJob(mask=mask, map=pred, label=str(img), save=save / f"{img.stem}.png" if save else None)


def evaluate_model(predictor, datasets: dict[str, Sequence[tuple]], name: str = "pfanet", workers: int = 2,
                   save_maps: str | os.PathLike | None = None, progress: bool = True,
                   metrics: Sequence[str] = METRICS) -> Report:
    """Run a Predictor on datasets of (image, mask) pairs and score its maps at the masks' size.

    Args:
        predictor: a pfanet.predictor.Predictor (its batch_size sets the forward batch).
        datasets: dataset name -> pairs (pfanet.data.read_pairs).
        name: the method's name in the report.
        workers: scoring processes beside the model (0: this process).
        save_maps: keep the maps as save_maps/<dataset>/<image stem>.png (at the mask's size).
        metrics: metric keys to compute (default all).
    """
    keys = [(name, d) for d in datasets]
    chunks = (c for d, pairs in datasets.items()
              for c in _chunked((name, d), _predicted_jobs(predictor, list(pairs),
                                                           pathlib.Path(save_maps) / d if save_maps else None)))
    total = sum(len(p) for p in datasets.values())
    return _report(run_chunks(chunks, keys, total, families_of(metrics), workers, progress))


def score_pairs(predictor, pairs, metrics=("mae", "maxF"), progress: bool = False) -> dict[str, float]:
    """`metrics` (and n) of `predictor` on (image, mask) pairs, in this process: validation during training."""
    s = evaluate_model(predictor, {"val": pairs}, workers=0, progress=progress, metrics=metrics)["pfanet"]["val"]
    return {**{k: s.metrics[k] for k in metrics if k != "n"}, "n": s.n}


# --------------------------------------------------------------------------------------------------------------------
# Reports


def report_rows(report: Report) -> tuple[list[str], list[list]]:
    """Header and rows (method, dataset, metrics..., n) of a report, metrics in METRICS order."""
    keys = [k for k in METRICS if any(k in s.metrics for ds in report.values() for s in ds.values())]
    rows = [[m, d, *(s.metrics.get(k, float("nan")) for k in keys), s.n]
            for m, ds in report.items() for d, s in ds.items()]
    return ["method", "dataset", *keys, "n"], rows


def _cell(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def format_table(report: Report, style: str = "text") -> str:
    """The report as an aligned text table ("text"), a Markdown table ("md") or CSV ("csv", full precision)."""
    header, rows = report_rows(report)
    if style == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows([[("" if isinstance(v, float) and math.isnan(v) else v) for v in r] for r in rows])
        return buf.getvalue()
    cells = [header] + [[_cell(v) for v in r] for r in rows]
    if style == "md":
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
        return "\n".join(lines) + "\n"
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) if i < 2 else c[i].rjust(widths[i]) for i in range(len(c)))
                     for c in cells) + "\n"


def write_json(report: Report, path: str | os.PathLike) -> None:
    """{method: {dataset: {"mae", "maxF", "maxF_pr", ..., "n"}}}; undefined values (no image scored) are null."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {m: {d: s.as_dict() for d, s in ds.items()} for m, ds in report.items()}
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_table(report: Report, path: str | os.PathLike) -> None:
    """A Markdown (.md) or CSV (.csv) table, by the file's extension."""
    path = pathlib.Path(path)
    style = {".md": "md", ".markdown": "md", ".csv": "csv"}.get(path.suffix.lower())
    if style is None:
        raise ValueError(f"{path}: table format by extension: .md or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_table(report, style))
