"""`pfanet convert`: official Keras or PyTorch-port weights to pfanet's .safetensors (`pfanet.weights`)."""

from __future__ import annotations

import sys


def add(sub) -> None:
    p = sub.add_parser("convert", help="official Keras or PyTorch-port weights -> pfanet .safetensors",
                       description="Convert PFANet weights into pfanet's safetensors format, with the network's "
                                   "switches and the input convention the weights expect in its metadata: an "
                                   "official Keras checkpoint (Keras-2 .h5 weights-only or full model, Keras-3 "
                                   ".weights.h5 or .keras) or a checkpoint of the PyTorch port (.pth; "
                                   "docs/WEIGHTS.md). Each matched layer is listed; a missing, unexpected or "
                                   "mis-shaped one is an error that names it.")
    p.add_argument("input", help="weights file (.h5, .weights.h5, .keras, .pth)")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument("--fp16", action="store_true", help="store weights as float16 (half the size)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not list the matched layers")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..weights import read_weights, save_checkpoint

    model, spec, meta, report = read_weights(args.input)
    if not args.quiet:
        print("\n".join(report))
    # what the file recorded (the port's epoch, test_mae...), then where it came from
    training = {**meta.get("training", {}), "converted_from": str(args.input), "source_format": meta["format"]}
    save_checkpoint(args.output, model, spec, training, dtype=torch.float16 if args.fp16 else torch.float32)
    print(f"{len(report)} layers matched ({meta['format']}); wrote {args.output}", file=sys.stderr)
    return 0
