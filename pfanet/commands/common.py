"""What several commands share: saying what is wrong (`fail`), the optional extras, the model and output options of
the prediction commands and the one place they become a `PredictOptions`."""

from __future__ import annotations

import argparse
import importlib
import sys

# The optional parts (pyproject.toml's extras) and the modules each brings: a command checks for its extra's modules
# first, and says which extra to install instead of failing on an import deep inside.
EXTRAS = {"serve": ("fastapi", "uvicorn", "python_multipart", "fastapi_offline"), "plots": ("matplotlib",),
          "ray": ("ray", "pyarrow")}


def fail(args: argparse.Namespace, message: str, status: int = 2) -> int:
    """Say what is wrong as argparse would ("pfanet COMMAND: error: ...") and return the exit status (2: bad
    arguments or input)."""
    print(f"pfanet {args.command}: error: {message}", file=sys.stderr)
    return status


def missing_extra(extra: str) -> str | None:
    """None when the extra's modules import, else the error message naming the extra to install."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            return f'needs the {module} module of the "{extra}" extra: pip install "pfanet[{extra}]"'
    return None


def add_flip(p) -> None:
    p.add_argument("--flip", action="store_true",
                   help="average each map with the mirrored image's map: a little more accurate (ECSSD val max F "
                        "+0.012 on the shipped model), twice the network's time")


def add_backend(p, default: str = "auto") -> None:
    from ..runtime import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default=default,
                   help="auto: the fastest faithful path: on a CPU with AVX512_VNNI, AVX_VNNI or AMX the INT8 graph of "
                        "these weights when one exists, else onnxruntime fp32; PyTorch channels_last + bf16 on a GPU; "
                        "torch: plain PyTorch fp32, the reference; onnxruntime: ONNX Runtime fp32; int8: the INT8 "
                        f"graph of these weights (`pfanet export --int8` makes one) (default {default})")


def add_model_options(p, batch_size: int | None = 4) -> None:
    """The model options of every prediction command (serve has no --batch-size: batch_size None)."""
    g = p.add_argument_group("model")
    g.add_argument("--weights", metavar="FILE", help="model weights: .safetensors (pfanet), official .h5, .pth or an "
                                                     "exported .onnx (default: the shipped model)")
    g.add_argument("--device", help="cpu, cuda, ... (default: cuda when present; predict-shard: cuda:LOCAL_RANK)")
    add_backend(g)
    add_flip(g)
    if batch_size:
        g.add_argument("--batch-size", type=at_least_one, default=batch_size,
                       help=f"images per forward pass (default {batch_size})")


def add_prediction_options(p, batch_size: int = 4) -> None:
    """The options `predict`, `predict-shard` and `predict-ray` share: the model's, then the outputs'."""
    add_model_options(p, batch_size)
    g = p.add_argument_group("outputs")
    g.add_argument("--outputs", type=kinds, default=("map",), metavar="KINDS",
                   help="comma-separated, from map,mask,edge,cutout,overlay (default: map)")
    g.add_argument("--threshold", type=threshold, default=None, metavar="T",
                   help="mask = map >= T: 'adaptive' (default: 2 x the map's mean, clipped to [1, 255]) or 0-255")
    g.add_argument("--format", choices=["png", "webp"], default="png", help="png (default) or lossless webp")
    g.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist")


def predict_options(args):
    """The one place the shared options become a `PredictOptions` (serve has the model's only)."""
    from ..options import PredictOptions

    given = {"weights": args.weights, "device": args.device, "backend": args.backend, "flip": args.flip}
    if "batch_size" in args:
        given["batch_size"] = args.batch_size
    if "outputs" in args:
        edges = ("edge",) if getattr(args, "edges", False) and "edge" not in args.outputs else ()
        given.update(kinds=args.outputs + edges, fmt=args.format, threshold=args.threshold, overwrite=args.overwrite)
    return PredictOptions(**given)


# ---- argument types ------------------------------------------------------------------------------------------------


def threshold(text: str) -> float | None:
    if text == "adaptive":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'adaptive' or a number from 0 to 255")
    return value


def at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, at least 1")
    return int(text)


def kinds(text: str) -> tuple[str, ...]:
    from ..outputs import parse_kinds

    try:
        return parse_kinds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
