"""`pfanet evaluate`: the SOD metrics of a model on datasets, or of folders of maps (`pfanet.evaluate`)."""

from __future__ import annotations

import pathlib
import sys

from .common import add_backend, add_flip, fail, missing_extra


def add(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score a model, or folders of maps, with the SOD metrics",
        description="Score (a) a model on datasets (--data) or (b) folders of any methods' maps against masks "
                    "(--maps --masks, paired by file stem). Metrics are pysodmetrics': MAE, max/mean/adaptive F "
                    "(beta^2 = 0.3), maxF_pr (max F of mean precision and recall, the MATLAB toolbox's), S-measure, "
                    "max/mean/adaptive E-measure, weighted F. A map of another size than its mask is resized to it; "
                    "a missing or unreadable file is reported and skipped.")
    src = p.add_argument_group("what to score (--data or --maps)")
    src.add_argument("--data", nargs="+", metavar="LIST_OR_DIR",
                     help="datasets for a model: list files ('image mask' per line) or benchmark folders")
    src.add_argument("--weights", help="model weights for --data (default: the shipped model)")
    src.add_argument("--name", help="the model's name in the report (default: the weights file's stem)")
    src.add_argument("--maps", nargs="+", metavar="[NAME=]DIR", help="folders of maps, one per method")
    src.add_argument("--masks", metavar="DIR_OR_LIST",
                     help="masks for --maps: a folder of masks, a benchmark folder, or a list file (only its masks)")
    src.add_argument("--dataset", help="dataset name for --maps (default: from the masks folder)")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write {method: {dataset: {metric: value, n}}}")
    out.add_argument("--table", metavar="FILE", help="write a Markdown (.md) or CSV (.csv) table")
    out.add_argument("--plots", metavar="DIR", help="write PR and F-measure-vs-threshold curves (PNG) per dataset")
    out.add_argument("--save-maps", metavar="DIR", help="with --data: keep the maps as DIR/<dataset>/<stem>.png")
    m = p.add_argument_group("mechanics")
    m.add_argument("--workers", type=int, default=2, help="scoring processes (default 2; 0: in this process)")
    m.add_argument("--limit", type=int, help="with --data: only the first N pairs of each dataset")
    m.add_argument("--device", help="with --data: cpu, cuda, ... (default: cuda when present)")
    add_backend(m, default="torch")  # scores come from the reference path unless asked
    add_flip(m)
    m.add_argument("--batch-size", type=int, default=4, help="with --data: images per forward pass (default 4)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def problem(args) -> str | None:
    """What argparse cannot check about the flags, as the message to give (None: they go together)."""
    if bool(args.data) == bool(args.maps):
        return "give either --data (a model on datasets) or --maps with --masks (folders of maps)"
    if args.maps and not args.masks:
        return "--maps needs --masks"
    if args.maps and (args.weights or args.save_maps or args.limit):
        return "--weights, --save-maps and --limit go with --data, not --maps"
    if args.table and pathlib.Path(args.table).suffix.lower() not in (".md", ".markdown", ".csv"):
        return f"{args.table}: the table is Markdown (.md) or CSV (.csv), by extension"
    if args.plots and (missing := missing_extra("plots")):
        return f"--plots {missing}"
    return None


def run(args) -> int:
    """Exit status: 0 all scored, 1 some maps or masks skipped (the rest scored and written), 2 bad arguments or
    nothing scored."""
    from .. import evaluate as ev

    if message := problem(args):
        return fail(args, message)
    progress = not args.no_progress
    if args.data:
        from ..predictor import DEFAULT_WEIGHTS, Predictor

        if args.weights is None and not DEFAULT_WEIGHTS.is_file():
            return fail(args, f"no --weights given and the shipped model {DEFAULT_WEIGHTS} is not installed")
        datasets = ev.datasets_by_name(args.data, args.limit)
        predictor = Predictor(args.weights, device=args.device, batch_size=args.batch_size, backend=args.backend,
                              flip=args.flip)
        name = args.name or pathlib.Path(args.weights or DEFAULT_WEIGHTS).stem.removesuffix(".weights")
        report = ev.evaluate_model(predictor, datasets, name, workers=args.workers, save_maps=args.save_maps,
                                   progress=progress)
    else:
        report = ev.evaluate_folders(ev.methods_by_name(args.maps), args.masks, args.dataset, workers=args.workers,
                                     progress=progress)
    print(ev.format_table(report), end="")
    skipped = sum(s.skipped for ds in report.values() for s in ds.values())
    if skipped:
        print(f"{skipped} maps or masks skipped (missing or unreadable; listed above)", file=sys.stderr)
    if args.json:
        ev.write_json(report, args.json)
    if args.table:
        ev.write_table(report, args.table)
    if args.plots:
        from ..plots import plot_curves

        for path in plot_curves(report, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    scored = sum(s.n for ds in report.values() for s in ds.values())
    if not scored:
        return fail(args, "no image could be scored")
    return 1 if skipped else 0  # as predict: the scores are written, and the exit status says something was left out
