"""What every prediction command shares (`predict`, `predict-shard`, `predict-ray`, `serve`): the model to load and
how its outputs are written. The command line builds one `PredictOptions` from its arguments (`pfanet.cli`); the
runners (`pfanet.outputs.predict_paths`, `pfanet.distributed_predict.run`, `pfanet.ray_predict.run`,
`pfanet.serve.serve`) take it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """Args:
        weights: a weights file (.safetensors, official .h5, .pth or an exported .onnx); None: the shipped model.
        device: "cpu", "cuda", ... (None: cuda when available).
        backend: "auto", "torch", "onnxruntime" or "int8" (`pfanet.runtime.BACKENDS`; see
            `pfanet.predictor.Predictor`).
        batch_size: images per forward pass.
        kinds: the outputs to write, from `pfanet.outputs.OUTPUT_KINDS`.
        fmt: "png" or "webp".
        threshold: mask threshold 0..255 (None: adaptive).
        overwrite: redo inputs whose outputs already exist.
        flip: average each map with its mirror image's (twice the network time; see `Predictor`).
    """

    weights: str | None = None
    device: str | None = None
    backend: str = "auto"
    batch_size: int = 4
    kinds: tuple[str, ...] = ("map",)
    fmt: str = "png"
    threshold: float | None = None
    overwrite: bool = False
    flip: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"the batch size must be at least 1, got {self.batch_size}")

    def predictor(self, device: str | None = None):
        """The `Predictor` these options describe (`device` overrides theirs, e.g. one GPU per local rank)."""
        from .predictor import Predictor

        return Predictor(self.weights, device=device or self.device, batch_size=self.batch_size, backend=self.backend,
                         flip=self.flip)
