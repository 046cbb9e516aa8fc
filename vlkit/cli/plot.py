"""``vlkit plot``: draw a run's training curves from its metrics.jsonl."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``plot`` subcommand to ``sub``."""
    p = sub.add_parser(
        "plot",
        help="draw a run's training and validation curves into an image",
        description="Read RUN/metrics.jsonl and draw one panel per metric group (train, val/DATASET, ...) "
        "with one line per metric against the step.",
    )
    p.add_argument("run", help="run directory holding metrics.jsonl (or the .jsonl file itself)")
    p.add_argument("--out", "-o", help="image to write: .png, .pdf or .svg (default: RUN/curves.png)")
    p.add_argument(
        "--metrics",
        nargs="+",
        metavar="PATTERN",
        help="only metrics matching these fnmatch patterns, e.g. 'train/*' 'val/*/t2i_r*' (a bare group "
        "name such as 'train' selects that group)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit plot``."""
    from vlkit.train.plots import plot_run

    path = plot_run(args.run, args.out, metrics=args.metrics)
    print(f"wrote {path}")
    return 0
