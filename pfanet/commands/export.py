"""`pfanet export`: the network as a checked ONNX graph, fp32 or INT8 (`pfanet.export_weights`)."""

from __future__ import annotations

import argparse
import sys

from .common import fail


def add(sub) -> None:
    from ..export import DEFAULT_CALIBRATION_COUNT, DEFAULT_OPSET, EXPORTERS

    p = sub.add_parser(
        "export", help="export the network to ONNX",
        description="Export the network to ONNX with a dynamic batch axis (and dynamic height/width, multiples of 32, "
                    "unless --static-size). The input convention (channel order, mean, std, size) and the weights' "
                    "metadata go into the model's metadata_props. The result is checked against PyTorch with "
                    "onnxruntime. `pfanet predict --weights FILE.onnx` runs it. With --int8 the graph is then "
                    "statically quantised (onnxruntime), calibrated on real images.",
        epilog="examples:\n"
               "  pfanet export -o pfanet.onnx\n"
               "  pfanet export -o pfanet-int8.onnx --int8 --calibration data/ecssd/train.txt --calibration-count 32",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", default="onnx", choices=["onnx"], help="output format (default onnx)")
    p.add_argument("--weights", help="weights to export (default: the shipped model)")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--size", type=int, help="input size to trace and record (multiple of 32; default: the weights'); "
                                            "with --for-rembg, the size the graph resizes rembg's 320x320 input to")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--probabilities", action="store_true", help="end in a sigmoid: probabilities instead of logits")
    p.add_argument("--for-rembg", action="store_true",
                   help="a drop-in model for rembg: takes rembg's input (RGB/255, ImageNet mean/std, 320x320), "
                        "converts and resizes it inside the graph, outputs probabilities")
    p.add_argument("--static-size", action="store_true", help="fix height and width (the batch stays dynamic)")
    p.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                   help="torch.onnx exporter (default torchscript: exact and fast here; dynamo needs onnxscript)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs PyTorch parity check")
    p.add_argument("--int8", action="store_true",
                   help="statically quantise to INT8: uint8 activations, int8 per-channel 7-bit weights, the logits "
                        "layer and the per-image normalisation kept float (see docs/PERFORMANCE.md for when it pays)")
    p.add_argument("--calibration", metavar="LIST_OR_DIR",
                   help="with --int8, the calibration images: a list file ('image mask' per line), a benchmark folder "
                        "or a folder of images (use training images, not the ones you evaluate on)")
    p.add_argument("--calibration-count", type=int, default=DEFAULT_CALIBRATION_COUNT, metavar="N",
                   help=f"calibrate on the first N images (default {DEFAULT_CALIBRATION_COUNT})")
    p.set_defaults(func=run)


def run(args) -> int:
    """Exit status: 0 written (and checked), 1 the graph differs from PyTorch (it is left written), 2 bad arguments
    or weights."""
    from ..export_weights import export_weights
    from ..runtime import ParityError

    if args.size is not None and (args.size <= 0 or args.size % 32):
        return fail(args, f"--size must be a positive multiple of 32, got {args.size}")
    if args.int8 != bool(args.calibration):
        return fail(args, "--int8 needs --calibration LIST_OR_DIR (and --calibration goes with --int8)")
    if args.calibration_count < 1:
        return fail(args, f"--calibration-count must be at least 1, got {args.calibration_count}")
    try:
        export_weights(args.weights, args.output, size=args.size, probabilities=args.probabilities,
                       for_rembg=args.for_rembg, static_size=args.static_size, exporter=args.exporter,
                       opset=args.opset, calibration=args.calibration if args.int8 else None,
                       calibration_count=args.calibration_count, check=not args.no_check,
                       report=lambda line: print(line, file=sys.stderr))
    except ParityError as e:
        return fail(args, str(e), status=1)
    return 0
