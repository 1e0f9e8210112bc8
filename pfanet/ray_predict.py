"""Saliency maps for collections larger than one machine with Ray Data: `map_batches` with the Predictor as a
callable class (one model per actor, loaded once).

    pip install "pfanet[ray]"
    pfanet predict-ray --input photos/ --output maps/                                   # local Ray
    pfanet predict-ray --input s3://bucket/photos --output s3://bucket/maps \\
        --address auto --concurrency 16 --num-gpus 1 --outputs map,cutout                # on a cluster

Inputs and outputs are local folders or URIs that pyarrow's filesystems understand (s3://, gs://, abfs://, hdfs://).
The driver lists the input files and leaves out those whose outputs exist (a re-run resumes); the actors read,
predict and write. Outputs mirror the input's subfolders with `pfanet predict`'s names (<stem>.png, <stem>_mask.png).

In your own pipeline:

    ds = ray.data.read_binary_files("s3://bucket/photos", include_paths=True)   # columns path, bytes
    ds = ds.map_batches(PFANetMapper, fn_constructor_kwargs={"output": "s3://bucket/maps"}, batch_size=16,
                        concurrency=4, num_gpus=1)
    failed = ds.filter(lambda row: row["error"] != "").take_all()
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence

import numpy as np

from .io import IMAGE_EXTENSIONS, ImageError, atomic_write, load_image
from .options import PredictOptions
from .outputs import SUFFIXES, predict_outputs


def filesystem(location: str):
    """(pyarrow filesystem, path on it) for a local path or a URI such as s3://bucket/dir."""
    import pyarrow.fs as pafs

    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def output_names(name: str, kinds: Sequence[str], fmt: str) -> dict[str, str]:
    """Output paths relative to the output root for the input named `name` (relative path without suffix)."""
    return {k: f"{name}{SUFFIXES[k]}.{fmt}" for k in kinds}


def list_inputs(location: str) -> list[tuple[str, str]]:
    """Images under a folder or URI, recursively, sorted: (path on its filesystem, name relative to it, no suffix).

    Hidden files and folders are left out, as `pfanet.io.list_images` does.
    """
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [(root, posixpath.splitext(posixpath.basename(root))[0])]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{location}: no such folder or file")
    found = []
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = posixpath.relpath(f.path, root)
        if (f.type == pafs.FileType.File and posixpath.splitext(f.path)[1].lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in rel.split("/"))):
            found.append((f.path, posixpath.splitext(rel)[0]))
    return sorted(found)


def pending(items: Sequence[tuple[str, str]], output: str, kinds: Sequence[str], fmt: str) -> list[tuple[str, str]]:
    """The items still missing at least one output under `output`."""
    import pyarrow.fs as pafs

    fs, root = filesystem(output)
    todo = []
    for path, name in items:
        wanted = [posixpath.join(root, p) for p in output_names(name, kinds, fmt).values()]
        if any(i.type != pafs.FileType.File for i in fs.get_file_info(wanted)):
            todo.append((path, name))
    return todo


class PFANetMapper:
    """Callable class for `Dataset.map_batches`: predicts a batch of images and writes their outputs.

    A batch (numpy format) has a "path" column (a file path or URI) and may have "bytes" (the encoded image, as
    `read_binary_files(include_paths=True)` gives; otherwise the image is read from "path") and "name" (the output
    name relative to `output`, without suffix; default: the file's stem). Returned: "path" and "error" (empty when
    the outputs were written), one row per input; an image that cannot be read or written is an error row, never an
    exception that would fail the job.

    Args:
        output: folder or URI the outputs go to.
        weights: weights file for `Predictor` (.safetensors, .h5, .pth or an exported .onnx; default: shipped model).
        kinds: outputs to write, from `pfanet.outputs.OUTPUT_KINDS`.
        fmt: "png" or "webp".
        threshold: mask threshold 0..255 (None: adaptive).
        device: "cpu", "cuda", ... (default: cuda when the actor has a GPU).
        batch_size: images per forward pass.
        backend: "auto", "torch", "onnxruntime" or "int8" (`pfanet.runtime.BACKENDS`; see `Predictor`).
        flip: average each map with its mirror image's (see `Predictor`).
    """

    def __init__(self, output: str, weights: str | None = None, kinds: Sequence[str] = ("map",), fmt: str = "png",
                 threshold: float | None = None, device: str | None = None, batch_size: int = 8,
                 backend: str = "auto", flip: bool = False):
        from .predictor import Predictor

        self.predictor = Predictor(weights, device=device, batch_size=batch_size, backend=backend, flip=flip)
        self.fs, self.root = filesystem(output)
        self.kinds, self.fmt, self.threshold = tuple(kinds), fmt, threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        names = [str(n) for n in batch["name"]] if "name" in batch else [
            posixpath.splitext(posixpath.basename(p))[0] for p in paths]
        data = batch["bytes"] if "bytes" in batch else [None] * len(paths)
        errors = [""] * len(paths)
        rgbs = {}
        for i, (path, raw) in enumerate(zip(paths, data)):
            try:
                rgbs[i] = load_image(bytes(raw) if raw is not None else self._read(path), name=path)
            except (ImageError, OSError) as e:
                errors[i] = str(e) if isinstance(e, ImageError) else f"{path}: cannot read ({e})"
        rendered = predict_outputs(self.predictor, list(rgbs.values()), self.kinds, self.fmt, self.threshold)
        for i, result in zip(rgbs, rendered, strict=True):
            try:
                for kind, rel in output_names(names[i], self.kinds, self.fmt).items():
                    self._write(posixpath.join(self.root, rel), result.files[kind])
            except OSError as e:
                errors[i] = f"{paths[i]}: cannot write outputs ({e})"
        return {"path": np.array(paths, dtype=object), "error": np.array(errors, dtype=object)}

    def _read(self, path: str) -> bytes:
        fs, real = (self.fs, path) if "://" not in path else filesystem(path)
        with fs.open_input_file(real) as f:
            return f.read()

    def _write(self, path: str, data: bytes) -> None:
        """Local files go through a temporary name and a rename, so an interrupted job never leaves a half file
        that a re-run would skip; object stores publish an object only once it is complete."""
        import pyarrow.fs as pafs

        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):
            atomic_write(path, data)
            return
        with self.fs.open_output_stream(path) as f:
            f.write(data)


def run(source: str, output: str, options: PredictOptions | None = None, concurrency: int = 1, num_gpus: float = 0,
        address: str | None = None, num_cpus: int | None = None) -> tuple[int, int, list[str]]:
    """Predict everything under `source` into `output` with Ray Data; returns (written, skipped, failures).

    `options` (default: `PredictOptions(batch_size=8)`) says which model and which outputs.

    Connects to the Ray cluster at `address` ("auto": the one this machine belongs to), or starts a local one.
    """
    import ray

    options = options or PredictOptions(batch_size=8)
    items = list_inputs(source)
    todo = items if options.overwrite else pending(items, output, options.kinds, options.fmt)
    if not todo:
        return 0, len(items), []
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ds = ray.data.from_items([{"path": p, "name": n} for p, n in todo])
    mapper = {"output": output, "weights": options.weights, "kinds": options.kinds, "fmt": options.fmt,
              "threshold": options.threshold, "device": options.device, "batch_size": options.batch_size,
              "backend": options.backend, "flip": options.flip}
    ds = ds.map_batches(PFANetMapper, batch_size=options.batch_size, batch_format="numpy", concurrency=concurrency,
                        num_gpus=num_gpus, fn_constructor_kwargs=mapper)
    written, failures = 0, []
    for row in ds.iter_rows():
        if row["error"]:
            failures.append(row["error"])
        else:
            written += 1
    return written, len(items) - len(todo), failures
