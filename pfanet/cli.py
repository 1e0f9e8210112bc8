"""The `pfanet` command line: the commands of `pfanet.commands` (one module each: its flags, then calls into the
library) under one parser, and the errors every command reports the same way. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .commands import convert, evaluate, export, predict, predict_ray, predict_shard, serve, train
from .commands.common import fail, predict_options

__all__ = ["build_parser", "main", "predict_options"]

COMMANDS = (train, convert, evaluate, predict, serve, export, predict_shard, predict_ray)  # in `pfanet --help`'s order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pfanet", description="PFANet salient object detection: train, evaluate, predict, serve, export.")
    parser.add_argument("--version", action="version", version=f"pfanet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add(sub)
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
        return fail(args, str(e))


if __name__ == "__main__":
    sys.exit(main())
