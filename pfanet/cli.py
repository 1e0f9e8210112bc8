"""The `pfanet` command line. Each subcommand parses its arguments and calls the library; no logic lives here."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__

# The optional parts (pyproject.toml's extras) and the modules each brings: a command checks for its extra's modules
# first, and says which extra to install instead of failing on an import deep inside.
EXTRAS = {"serve": ("fastapi", "uvicorn", "python_multipart", "fastapi_offline"), "plots": ("matplotlib",),
          "ray": ("ray", "pyarrow")}


def missing_extra(extra: str) -> str | None:
    """None when the extra's modules import, else the error message naming the extra to install."""
    import importlib

    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            return f'needs the {module} module of the "{extra}" extra: pip install "pfanet[{extra}]"'
    return None


def add_train(sub) -> None:
    from .recipes import RECIPES

    p = sub.add_parser(
        "train", help="train PFANet",
        description="Train PFANet with a named recipe; every recipe value can be overridden. Runs under torchrun "
                    "for several processes (DistributedDataParallel; only rank 0 writes).",
        epilog="recipes:\n" + "\n".join(f"  {k}: {r.description}" for k, r in RECIPES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, metavar="LIST_OR_DIR",
                   help="training data: list files ('image mask' per line) or benchmark folders")
    p.add_argument("--val", nargs="*", default=[], metavar="LIST_OR_DIR", help="validation data (MAE, max F)")
    p.add_argument("-o", "--out", required=True, help="run folder (checkpoints, logs)")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="named recipe (default cpu-duts, the default model's)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its state.pt, with its recipe.json and seed")
    p.add_argument("--reschedule", action="store_true",
                   help="with --resume: take a new schedule (stages/epochs, size, size schedule, batch per process) "
                        "-- the run's own with the overrides, or --recipe's as now defined -- from the run's current "
                        "position on; nothing else may change")
    g = p.add_argument_group("recipe overrides")
    g.add_argument("--epochs", type=int, help="total epochs (the stages are stretched to fit)")
    g.add_argument("--lr", type=float, help="base learning rate (later stages scale with it)")
    g.add_argument("--alpha", type=float, help="edge loss weight alpha for every stage")
    g.add_argument("--stages", metavar="UNTIL:ALPHA:LR,...",
                   help="the stages in full, e.g. 25:1.0:1e-2,50:0.7:1e-3 (the paper's)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--size", type=int, help="training resolution (multiple of 32)")
    g.add_argument("--lr-decay", choices=["none", "official", "cosine"], help="cosine is updated every step")
    g.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up over the first N steps")
    g.add_argument("--optimizer", choices=["sgd", "adamw"])
    g.add_argument("--decay-norm-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="weight decay also on biases and norm weights (default: off)")
    g.add_argument("--targets", choices=["official", "soft", "binary"],
                   help="mask -> target: official mask/max, soft mask/255, binary mask>128 (as evaluation)")
    g.add_argument("--target-resize", choices=["nearest", "bilinear"],
                   help="nearest (official; half an output pixel off the image) or bilinear (on the image's grid)")
    g.add_argument("--size-schedule", metavar="UNTIL:SIZE,...",
                   help="input sizes before the final --size, e.g. 14:128,17:192 (epochs 1-14 at 128, 15-17 at 192)")
    g.add_argument("--momentum", type=float)
    g.add_argument("--bn-momentum", type=float,
                   help="BatchNorm running-statistics rate under --norm batch (default 0.01, Keras' 0.99)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--norm", choices=["per-image", "batch"])
    g.add_argument("--edge-mode", choices=["relu", "abs"], help="relu (official) or abs (paper Eq. 9)")
    g.add_argument("--iou", choices=["none", "soft", "structure"],
                   help="add an IoU term to the paper's loss: soft (BASNet) or structure (F3Net); default none")
    g.add_argument("--ema", type=float, metavar="DECAY",
                   help="validate, keep and ship a moving average of the weights with this decay (e.g. 0.99; "
                        "0: off, the default)")
    g.add_argument("--backbone", help="hed | imagenet | a .weights.h5 / torchvision .pth / .safetensors file")
    g.add_argument("--freeze-blocks", type=int, help="keep VGG blocks 1..N fixed")
    g.add_argument("--init", help="start from a PFANet weights file (.safetensors/.h5/.pth) instead of a bare "
                                  "backbone: fine-tuning")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--saturation", action=argparse.BooleanOptionalAction, default=None,
                   help="the paper's saturation jitter")
    g.add_argument("--ca-regulariser", action=argparse.BooleanOptionalAction, default=None,
                   help="the official activity regulariser on the channel attention")
    m = p.add_argument_group("mechanics")
    m.add_argument("--val-every", type=int, default=1, help="validate every N epochs (default 1)")
    m.add_argument("--val-steps", type=int, default=0,
                   help="also validate every N steps within an epoch (default 0: epoch ends only)")
    m.add_argument("--val-limit", type=int, help="validate on N evenly spaced pairs of each --val source")
    m.add_argument("--save-every", type=int, default=5, help="keep epoch_N.safetensors every N epochs (default 5)")
    m.add_argument("--save-steps", type=int, default=0,
                   help="also checkpoint every N steps within an epoch (default 0: epoch ends only)")
    m.add_argument("--seed", type=int, help="default 0; on --resume the run's own")
    m.add_argument("--workers", type=int, default=2, help="DataLoader decoding processes (default 2)")
    m.add_argument("--cache", action="store_true", help="keep decoded images in memory")
    m.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after N steps in this process")
    m.add_argument("--max-minutes", type=float,
                   help="stop (with a checkpoint) after M minutes of training in this process (a rented GPU's time)")
    m.add_argument("--limit", type=int, help="use only the first N training pairs")
    m.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    m.add_argument("--compile", action="store_true", help="torch.compile the network")
    m.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on a GPU")
    m.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast; default: on a GPU")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--collective-timeout", type=float, default=7200, metavar="SECONDS",
                   help="under torchrun, how long a rank waits for the others, e.g. while rank 0 validates "
                        "(default 7200)")
    p.set_defaults(func=run_train)


def add_flip(p) -> None:
    p.add_argument("--flip", action="store_true",
                   help="average each map with the mirrored image's map: a little more accurate (ECSSD val max F "
                        "+0.012 on the shipped model), twice the network's time")


def add_backend(p, default: str = "auto") -> None:
    from .predictor import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default=default,
                   help="auto: the fastest faithful path: on a CPU with AVX512_VNNI, AVX_VNNI or AMX the INT8 graph of "
                        "these weights when one exists, else onnxruntime fp32; PyTorch channels_last + bf16 on a GPU; "
                        "torch: plain PyTorch fp32, the reference; onnxruntime: ONNX Runtime fp32; int8: the INT8 "
                        f"graph of these weights (`pfanet export --int8` makes one) (default {default})")


def run_train(args) -> int:
    """Exit status: 0 done (or --max-steps reached), 2 bad arguments or data, 3 the loss became NaN/Inf,
    128 + N stopped by signal N (SIGINT 130, SIGTERM 143) with a checkpoint to --resume from."""
    from .train import Trainer, TrainingStopped, TrainOptions, recipe_for_run

    fields = ("epochs", "lr", "alpha", "stages", "batch_size", "size", "lr_decay", "momentum", "weight_decay",
              "dropout", "norm", "edge_mode", "iou", "backbone", "freeze_blocks", "augment", "saturation",
              "ca_regulariser",
              "init", "warmup_steps", "optimizer", "decay_norm_bias", "targets", "target_resize", "size_schedule",
              "bn_momentum", "ema")
    overrides = {k: getattr(args, k) for k in fields}
    opts = TrainOptions(
        train=args.data, out=args.out, val=args.val, val_every=args.val_every, val_steps=args.val_steps,
        val_limit=args.val_limit, save_every=args.save_every,
        save_steps=args.save_steps, resume=args.resume, reschedule=args.reschedule, seed=args.seed, workers=args.workers, cache=args.cache,
        max_steps=args.max_steps, max_minutes=args.max_minutes, device=args.device, compile=args.compile, channels_last=args.channels_last,
        bf16=args.bf16, limit=args.limit, progress=not args.no_progress, collective_timeout=args.collective_timeout)
    try:
        recipe = recipe_for_run(args.recipe, overrides, args.out, args.resume, args.reschedule)
        print(f"recipe {recipe.name}:\n{recipe.to_json()}", file=sys.stderr)
        trainer = Trainer(recipe, opts)
        trainer.run()
    except ValueError as e:  # a recipe or option that cannot work, named in the message
        print(f"pfanet train: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"pfanet train: {e}", file=sys.stderr)
        return 3
    print(f"run folder: {args.out}", file=sys.stderr)
    return 128 + trainer.stopped_by if trainer.stopped_by else 0


def add_convert(sub) -> None:
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
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    import torch

    from .weights import read_weights, save_checkpoint

    model, spec, meta, report = read_weights(args.input)
    if not args.quiet:
        print("\n".join(report))
    # what the file recorded (the port's epoch, test_mae...), then where it came from
    training = {**meta.get("training", {}), "converted_from": str(args.input), "source_format": meta["format"]}
    save_checkpoint(args.output, model, spec, training, dtype=torch.float16 if args.fp16 else torch.float32)
    print(f"{len(report)} layers matched ({meta['format']}); wrote {args.output}", file=sys.stderr)
    return 0


def add_evaluate(sub) -> None:
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
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    import pathlib

    from . import evaluate as ev

    def fail(msg: str) -> int:
        print(f"pfanet evaluate: error: {msg}", file=sys.stderr)
        return 2

    if bool(args.data) == bool(args.maps):
        return fail("give either --data (a model on datasets) or --maps with --masks (folders of maps)")
    if args.maps and not args.masks:
        return fail("--maps needs --masks")
    if args.maps and (args.weights or args.save_maps or args.limit):
        return fail("--weights, --save-maps and --limit go with --data, not --maps")
    if args.table and pathlib.Path(args.table).suffix.lower() not in (".md", ".markdown", ".csv"):
        return fail(f"{args.table}: the table is Markdown (.md) or CSV (.csv), by extension")
    if args.plots and (missing := missing_extra("plots")):
        return fail(f"--plots {missing}")
    progress = not args.no_progress
    if args.data:
        from .data import dataset_name, read_pairs
        from .predictor import DEFAULT_WEIGHTS, Predictor

        if args.weights is None and not DEFAULT_WEIGHTS.is_file():
            return fail(f"no --weights given and the shipped model {DEFAULT_WEIGHTS} is not installed")
        datasets = {}
        for source in args.data:
            name = dataset_name(source)
            if name in datasets:
                return fail(f"two datasets are both named {name!r}")
            datasets[name] = read_pairs(source)[: args.limit]
        predictor = Predictor(args.weights, device=args.device, batch_size=args.batch_size, backend=args.backend,
                              flip=args.flip)
        name = args.name or pathlib.Path(args.weights or DEFAULT_WEIGHTS).stem.removesuffix(".weights")
        report = ev.evaluate_model(predictor, datasets, name, workers=args.workers, save_maps=args.save_maps,
                                   progress=progress)
    else:
        methods = {}
        for spec in args.maps:
            name, folder = ev.parse_method(spec)
            if name in methods:
                return fail(f"two methods are both named {name!r} (name them: NAME=DIR)")
            methods[name] = folder
        report = ev.evaluate_folders(methods, args.masks, args.dataset, workers=args.workers, progress=progress)
    print(ev.format_table(report), end="")
    skipped = sum(s.skipped for ds in report.values() for s in ds.values())
    if skipped:
        print(f"{skipped} maps or masks skipped (missing or unreadable; listed above)", file=sys.stderr)
    if args.json:
        ev.write_json(report, args.json)
    if args.table:
        ev.write_table(report, args.table)
    if args.plots:
        from .plots import plot_curves

        for path in plot_curves(report, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    scored = sum(s.n for ds in report.values() for s in ds.values())
    if not scored:
        return fail("no image could be scored")
    return 1 if skipped else 0  # as predict: the scores are written, and the exit status says something was left out


def _threshold(text: str) -> float | None:
    if text == "adaptive":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'adaptive' or a number from 0 to 255")
    return value


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, at least 1")
    return int(text)


def _kinds(text: str) -> tuple[str, ...]:
    from .outputs import parse_kinds

    try:
        return parse_kinds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_predict(sub) -> None:
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
    _add_prediction_options(p)
    p.add_argument("--edges", action="store_true", help="shorthand for adding edge to --outputs")
    p.add_argument("--workers", type=int, default=4, help="decoding threads (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_predict)


def run_predict(args) -> int:
    from .outputs import predict_bytes, predict_paths

    def fail(msg: str) -> int:
        print(f"pfanet predict: error: {msg}", file=sys.stderr)
        return 2

    if args.batch_size < 1 or args.workers < 1:
        return fail("--batch-size and --workers must be at least 1")
    options = predict_options(args)
    kinds = options.kinds
    if "-" in args.inputs:
        if args.inputs != ["-"] or args.out:
            return fail("- reads one image from stdin and writes to stdout: give it alone, without -o")
        if len(kinds) != 1:
            return fail(f"stdout takes one image; choose one of {','.join(kinds)} with --outputs")
        data = sys.stdin.buffer.read()
        sys.stdout.buffer.write(predict_bytes(options.predictor(), data, kinds[0], options.fmt, options.threshold))
        sys.stdout.buffer.flush()
        return 0
    if not args.out:
        return fail("-o/--out DIR is required (only - writes to stdout)")
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


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="HTTP API and web page",
        description="Serve the model over HTTP (FastAPI + uvicorn), loaded once:\n"
                    "  /               a web page: drop an image, see and download map, mask and cut-out\n"
                    "  POST /predict   multipart field 'file'; query output=map|mask|edge|cutout|overlay, threshold\n"
                    "                  -> image/png\n"
                    "  POST /predict/all  several outputs from one forward pass, as JSON (base64 PNGs)\n"
                    "  GET /health, /docs (OpenAPI)\n"
                    "Errors are JSON {\"detail\": ...}: 413 too large, 415 not an image, 422 bad parameter, 503 busy,\n"
                    "504 too slow.",
        epilog="example:\n"
               "  pfanet serve --port 8000 &\n"
               "  curl -F file=@photo.jpg 'http://127.0.0.1:8000/predict?output=cutout' -o cutout.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    _add_model_options(p, batch_size=None)
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest upload in MB (default 20; 413 beyond)")
    p.add_argument("--max-pixels", type=int, help="largest image in pixels (default 50 million; 413 beyond)")
    p.add_argument("--timeout", type=float, default=60, help="seconds a request may wait (default 60; 504 beyond)")
    p.add_argument("--max-queue", type=int, default=8,
                   help="images in progress at once (default 8; more get 503 and retry)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    if missing := missing_extra("serve"):
        print(f"pfanet serve: error: {missing}", file=sys.stderr)
        return 2
    from .serve import serve

    serve(predict_options(args), args.host, args.port, args.max_upload_mb, args.max_pixels, args.timeout,
          args.max_queue, args.log_level)
    return 0


def add_export(sub) -> None:
    from .export import DEFAULT_CALIBRATION_COUNT, DEFAULT_OPSET, EXPORTERS

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
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    import pathlib
    import tempfile

    from .export import calibration_images, map_differences, quantize_onnx
    from .predictor import Predictor

    def fail(msg: str) -> int:
        print(f"pfanet export: error: {msg}", file=sys.stderr)
        return 2

    if args.size is not None and (args.size <= 0 or args.size % 32):
        return fail(f"--size must be a positive multiple of 32, got {args.size}")
    if args.int8 != bool(args.calibration):
        return fail("--int8 needs --calibration LIST_OR_DIR (and --calibration goes with --int8)")
    if args.calibration_count < 1:
        return fail(f"--calibration-count must be at least 1, got {args.calibration_count}")
    if args.int8:
        images = calibration_images(args.calibration, args.calibration_count)
        with tempfile.TemporaryDirectory(prefix="pfanet-export-") as tmp:
            fp32 = pathlib.Path(tmp) / "fp32.onnx"
            rc = _export_fp32(args, fp32, temporary=True)
            if rc:
                return rc
            path = quantize_onnx(fp32, args.output, images)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): INT8, calibrated on {len(images)} images of "
              f"{args.calibration}", file=sys.stderr)
        if not args.no_check:
            shown = images[:4]
            worst, mean = map_differences(Predictor(args.weights, device="cpu"), Predictor(path, device="cpu"), shown)
            print(f"INT8 vs PyTorch fp32 maps on {len(shown)} calibration images: max |difference| {worst:.0f} gray "
                  f"levels, mean {mean:.2f}", file=sys.stderr)
        return 0
    return _export_fp32(args, pathlib.Path(args.output))


def _export_fp32(args, output, temporary: bool = False) -> int:
    """Write the fp32 graph to `output` and check it against PyTorch (`temporary`: the input of --int8)."""
    from .export import OnnxNetwork, check_parity, export_onnx, plan_export
    from .predictor import Predictor

    predictor = Predictor(args.weights, device="cpu")
    if isinstance(predictor.model, OnnxNetwork):
        print(f"pfanet export: error: {args.weights} is already ONNX; export from the PyTorch weights", file=sys.stderr)
        return 2
    plan = plan_export(predictor.model, predictor.spec, size=args.size,
                       output="probability" if args.probabilities else "logits", for_rembg=args.for_rembg,
                       dynamic_size=not args.static_size)
    path = export_onnx(plan, output, predictor.meta, exporter=args.exporter, opset=args.opset)
    spec = plan.input_spec
    what = "exported the fp32 graph" if temporary else f"wrote {path}"
    print(f"{what} ({path.stat().st_size / 2**20:.1f} MiB): input NCHW {spec.channel_order}, mean {spec.mean}, "
          f"std {spec.std}, size {spec.size}; output {plan.output}", file=sys.stderr)
    if args.no_check:
        return 0
    diff = check_parity(plan, path)
    print(f"onnxruntime vs PyTorch on 2 random {spec.size}x{spec.size} images: max |difference| {diff:.2e}",
          file=sys.stderr)
    if diff > 1e-4:
        print(f"pfanet export: error: {path} differs from PyTorch by {diff:.2e} (> 1e-4)", file=sys.stderr)
        return 1
    return 0


def _add_model_options(p, batch_size: int | None = 4) -> None:
    """The model options of every prediction command (serve has no --batch-size: batch_size None)."""
    g = p.add_argument_group("model")
    g.add_argument("--weights", metavar="FILE", help="model weights: .safetensors (pfanet), official .h5, .pth or an "
                                                     "exported .onnx (default: the shipped model)")
    g.add_argument("--device", help="cpu, cuda, ... (default: cuda when present; predict-shard: cuda:LOCAL_RANK)")
    add_backend(g)
    add_flip(g)
    if batch_size:
        g.add_argument("--batch-size", type=_at_least_one, default=batch_size,
                       help=f"images per forward pass (default {batch_size})")


def _add_prediction_options(p, batch_size: int = 4) -> None:
    """The options `predict`, `predict-shard` and `predict-ray` share: the model's, then the outputs'."""
    _add_model_options(p, batch_size)
    g = p.add_argument_group("outputs")
    g.add_argument("--outputs", type=_kinds, default=("map",), metavar="KINDS",
                   help="comma-separated, from map,mask,edge,cutout,overlay (default: map)")
    g.add_argument("--threshold", type=_threshold, default=None, metavar="T",
                   help="mask = map >= T: 'adaptive' (default: 2 x the map's mean, clipped to [1, 255]) or 0-255")
    g.add_argument("--format", choices=["png", "webp"], default="png", help="png (default) or lossless webp")
    g.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist")


def predict_options(args):
    """The one place the shared options become a `PredictOptions` (serve has the model's only)."""
    from .options import PredictOptions

    given = {"weights": args.weights, "device": args.device, "backend": args.backend, "flip": args.flip}
    if "batch_size" in args:
        given["batch_size"] = args.batch_size
    if "outputs" in args:
        edges = ("edge",) if getattr(args, "edges", False) and "edge" not in args.outputs else ()
        given.update(kinds=args.outputs + edges, fmt=args.format, threshold=args.threshold, overwrite=args.overwrite)
    return PredictOptions(**given)


def add_predict_shard(sub) -> None:
    p = sub.add_parser(
        "predict-shard", help="`predict` split over torchrun processes (several GPUs or machines, shared storage)",
        description="Like `pfanet predict`, for one of several processes started by torchrun (or with RANK and "
                    "WORLD_SIZE set by hand): each takes every WORLD_SIZE-th file of the sorted inputs. Existing "
                    "outputs are skipped, so re-running resumes; rank 0 prints the total.",
        epilog="examples:\n"
               "  torchrun --nproc-per-node 4 -m pfanet predict-shard photos/ -o maps/\n"
               "  torchrun --nnodes 8 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\\n"
               "      --no-python pfanet predict-shard /shared/photos -o /shared/maps",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, folders, glob patterns")
    p.add_argument("-o", "--out", metavar="DIR", required=True, help="output folder (shared by all ranks)")
    _add_prediction_options(p)
    p.add_argument("--workers", type=int, default=4, help="decoding threads per process (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (rank 0 shows one)")
    p.set_defaults(func=run_predict_shard)


def run_predict_shard(args) -> int:
    from .distributed_predict import run

    return run(args.inputs, args.out, predict_options(args), args.workers, progress=not args.no_progress)


def add_predict_ray(sub) -> None:
    p = sub.add_parser(
        "predict-ray", help="`predict` on a Ray cluster with Ray Data (needs pfanet[ray])",
        description="Predict every image under a folder or URI (s3://, gs://, ...) with Ray Data: map_batches with "
                    "one model per actor. Outputs mirror the input's subfolders; existing ones are skipped.",
        epilog="examples:\n"
               "  pfanet predict-ray --input photos/ --output maps/\n"
               "  pfanet predict-ray --input s3://b/photos --output s3://b/maps --address auto --concurrency 8 "
               "--num-gpus 1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, metavar="DIR_OR_URI", help="folder or URI of images (recursive)")
    p.add_argument("--output", required=True, metavar="DIR_OR_URI", help="where the outputs go")
    _add_prediction_options(p, batch_size=8)
    p.add_argument("--concurrency", type=int, default=1, help="model actors (default 1)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (default 0)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    p.add_argument("--address", help="Ray cluster to join ('auto': this machine's; default: start a local one)")
    p.set_defaults(func=run_predict_ray)


def run_predict_ray(args) -> int:
    if missing := missing_extra("ray"):
        print(f"pfanet predict-ray: error: {missing}", file=sys.stderr)
        return 2
    from .ray_predict import run

    written, skipped, failures = run(args.input, args.output, predict_options(args), args.concurrency,
                                     args.num_gpus, args.address, args.num_cpus)
    print(f"{written} written to {args.output}, {skipped} skipped (outputs exist)"
          + (f", {len(failures)} failed:" if failures else ""), file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pfanet", description="PFANet salient object detection: train, evaluate, predict, serve, export.")
    parser.add_argument("--version", action="version", version=f"pfanet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_train, add_convert, add_evaluate, add_predict, add_serve, add_export, add_predict_shard,
                add_predict_ray):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from .data import DataError
    from .io import ImageError
    from .weights import WeightsError

    try:
        return args.func(args)
    except (WeightsError, ImageError, DataError, FileNotFoundError) as e:
        print(f"pfanet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
