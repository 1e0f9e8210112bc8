"""`pfanet predict`: maps and their renderings for files, folders, glob patterns, or stdin to stdout."""

from __future__ import annotations

import argparse
import sys

from .common import add_prediction_options, fail, predict_options


def add(sub) -> None:
    p = sub.add_parser(
        "predict", help="saliency maps, masks, edges, cut-outs and overlays for images",
        description="Predict saliency for image files, folders (searched recursively; outputs mirror their\n"
                    "subfolders), quoted glob patterns, or - (one image on stdin, one output image on stdout).\n"
                    "Outputs: <stem>.png (map), <stem>_mask.png, <stem>_edge.png, <stem>_cutout.png (RGBA, the map\n"
                    "as alpha), <stem>_overlay.png. Inputs whose outputs all exist are skipped, so an interrupted run\n"
                    "resumes. A file that cannot be read is reported and the rest go on; the exit status is then 1.",
        epilog="examples:\n"
               "  pfanet predict photo.jpg -o out\n"
               "  pfanet predict photos/ 'more/**/*.jpg' -o out --outputs map,mask,cutout\n"
               "  pfanet predict - --outputs cutout < photo.jpg > cutout.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, folders, glob patterns, or -")
    p.add_argument("-o", "--out", metavar="DIR", help="output folder (required unless the input is -)")
    add_prediction_options(p)
    p.add_argument("--edges", action="store_true", help="shorthand for adding edge to --outputs")
    p.add_argument("--workers", type=int, default=4, help="decoding threads (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..outputs import predict_bytes, predict_paths

    if args.batch_size < 1 or args.workers < 1:
        return fail(args, "--batch-size and --workers must be at least 1")
    options = predict_options(args)
    kinds = options.kinds
    if "-" in args.inputs:
        if args.inputs != ["-"] or args.out:
            return fail(args, "- reads one image from stdin and writes to stdout: give it alone, without -o")
        if len(kinds) != 1:
            return fail(args, f"stdout takes one image; choose one of {','.join(kinds)} with --outputs")
        data = sys.stdin.buffer.read()
        sys.stdout.buffer.write(predict_bytes(options.predictor(), data, kinds[0], options.fmt, options.threshold))
        sys.stdout.buffer.flush()
        return 0
    if not args.out:
        return fail(args, "-o/--out DIR is required (only - writes to stdout)")
    summary = predict_paths(args.inputs, args.out, options.predictor, kinds, options.fmt, options.threshold,
                            options.overwrite, args.workers, progress=not args.no_progress)
    line = f"{summary.written} written to {args.out} ({','.join(kinds)}, {options.fmt})"
    if summary.skipped:
        line += f"; {summary.skipped} skipped, their outputs exist (--overwrite redoes them)"
    print(line, file=sys.stderr)
    if summary.failures:
        print(f"{len(summary.failures)} failed:", *(f"  {f}" for f in summary.failures), sep="\n", file=sys.stderr)
        return 1
    return 0
