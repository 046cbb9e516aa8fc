"""The ``vlkit`` command: one module per subcommand, each exposing ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vlkit import __version__
from vlkit.errors import VlkitError

# Subcommand modules, in the order ``vlkit --help`` lists them.
SUBCOMMANDS = ("ingest", "data", "train", "eval", "configs", "plot", "embed", "index", "search", "serve", "ask",
               "quickstart")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlkit",
        description="Vision-language models: ingest data, train, evaluate, search.",
    )
    parser.add_argument("--version", action="version", version=f"vlkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"vlkit.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("LANCE_LOG", "error")  # Lance's own deprecation notices are not for vlkit's users
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except VlkitError as exc:
        print(f"vlkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlkit: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
