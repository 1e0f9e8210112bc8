"""`pfanet export` as a library function: a weights file to a checked ONNX graph, fp32 or INT8.

fp32: the graph is written (`pfanet.export`) and checked against PyTorch (`pfanet.runtime.check_parity`: over the
tolerance, or NaN, is an error). INT8: that fp32 graph, checked, is the temporary input of the quantiser; the INT8
graph is cached for its weights (`pfanet.runtime.cache_int8_graph`) and its maps compared with PyTorch's through two
`Predictor`s. This module sits above `pfanet.predictor` (it loads the weights with one), which is why it is not part
of `pfanet.export`: the Predictor's own ONNX Runtime path exports through `pfanet.export`.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

from .export import (
    DEFAULT_CALIBRATION_COUNT,
    DEFAULT_OPSET,
    calibration_images,
    export_onnx,
    plan_export,
    quantize_onnx,
)
from .predictor import Predictor
from .runtime import OnnxNetwork, ParityError, cache_int8_graph, check_parity
from .weights import WeightsError

log = logging.getLogger(__name__)

INT8_CHECK_IMAGES = 4  # calibration images whose INT8 and PyTorch maps are compared after an INT8 export


def export_weights(weights: str | os.PathLike | None, output: str | os.PathLike, *, size: int | None = None,
                   probabilities: bool = False, for_rembg: bool = False, static_size: bool = False,
                   exporter: str = "torchscript", opset: int = DEFAULT_OPSET,
                   calibration: str | os.PathLike | None = None, calibration_count: int = DEFAULT_CALIBRATION_COUNT,
                   check: bool = True, report: Callable[[str], object] = log.info) -> pathlib.Path:
    """Export `weights` (None: the shipped model) to `output` and check it; returns the path written.

    Args:
        size, probabilities, for_rembg, static_size, exporter, opset: the graph (see `pfanet.export.plan_export`
            and `export_onnx`).
        calibration: quantise to INT8, calibrated on the first `calibration_count` images of this list file,
            benchmark folder or folder of images (`pfanet.export.calibration_images`); None: write the fp32 graph.
        check: check the fp32 graph against PyTorch (raises ParityError over `runtime.PARITY_TOLERANCE` or on NaN,
            the graph left written), and after an INT8 export report how far its maps are from PyTorch's.
        report: receives each line saying what was done (`pfanet export` prints them).

    Raises WeightsError for weights that are already ONNX.
    """
    if calibration is None:
        return _export_fp32(weights, pathlib.Path(output), size, probabilities, for_rembg, static_size, exporter,
                            opset, check, report)
    images = calibration_images(calibration, calibration_count)
    with tempfile.TemporaryDirectory(prefix="pfanet-export-") as tmp:
        fp32 = _export_fp32(weights, pathlib.Path(tmp) / "fp32.onnx", size, probabilities, for_rembg, static_size,
                            exporter, opset, check, report, temporary=True)
        path = quantize_onnx(fp32, output, images)
    cache_int8_graph(path)
    report(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): INT8, calibrated on {len(images)} images of "
           f"{calibration}")
    if check:
        shown = images[:INT8_CHECK_IMAGES]
        worst, mean = map_differences(Predictor(weights, device="cpu"), Predictor(path, device="cpu"), shown)
        report(f"INT8 vs PyTorch fp32 maps on {len(shown)} calibration images: max |difference| {worst:.0f} gray "
               f"levels, mean {mean:.2f}")
    return path


def _export_fp32(weights, output: pathlib.Path, size, probabilities, for_rembg, static_size, exporter, opset, check,
                 report, temporary: bool = False) -> pathlib.Path:
    """Write the fp32 graph to `output` and check it against PyTorch (`temporary`: the input of an INT8 export)."""
    predictor = Predictor(weights, device="cpu")
    if isinstance(predictor.model, OnnxNetwork):
        raise WeightsError(f"{weights} is already ONNX; export from the PyTorch weights")
    plan = plan_export(predictor.model, predictor.spec, size=size, output="probability" if probabilities else "logits",
                       for_rembg=for_rembg, dynamic_size=not static_size)
    path = export_onnx(plan, output, predictor.meta, exporter=exporter, opset=opset)
    spec = plan.input_spec
    what = "exported the fp32 graph" if temporary else f"wrote {path}"
    report(f"{what} ({path.stat().st_size / 2**20:.1f} MiB): input NCHW {spec.channel_order}, mean {spec.mean}, "
           f"std {spec.std}, size {spec.size}; output {plan.output}")
    if check:
        measured = f"onnxruntime vs PyTorch on 2 random {spec.size}x{spec.size} images: max |difference| {{:.2e}}"
        try:
            diff = check_parity(plan, path)
        except ParityError as e:  # the difference is reported either way, then the error
            report(measured.format(e.diff))
            raise
        report(measured.format(diff))
    return path


def map_differences(reference: Predictor, candidate: Predictor, images: Sequence[str | os.PathLike]
                    ) -> tuple[float, float]:
    """Max and mean |difference|, in gray levels, between two `Predictor`s' maps of the same images (e.g. an INT8
    graph against the PyTorch weights it came from)."""
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16))
             for a, b in zip(reference.predict_batch(images), candidate.predict_batch(images), strict=True)]
    return float(max(d.max() for d in diffs)), float(np.mean([d.mean() for d in diffs]))
