"""The ``vlkit`` command: one module per subcommand, each exposing ``register(subparsers)``.

Building the parser imports no heavy module (torch, lance, PIL, numpy, ...): each subcommand imports what it
needs inside its ``run()``, so ``vlkit --help`` and argument errors answer at once. Whatever the user can cause
(a :class:`~vlkit.errors.VlkitError`, an image that does not decode, a path that cannot be written) is reported
as one line, ``vlkit: error: ...``, with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from vlkit import __version__
from vlkit.errors import VlkitError

# Subcommand modules, in the order ``vlkit --help`` lists them.
SUBCOMMANDS = ("ingest", "data", "train", "eval", "predict", "configs", "plot", "embed", "index", "search", "serve",
               "ask", "caption", "capfilt", "export", "imagine", "explain", "quickstart")

#: The pixel limit when neither --max-pixels nor $VLKIT_MAX_PIXELS is given:
#: ``vlkit.data.decode.DEFAULT_MAX_PIXELS``, repeated for the help text because that module loads Pillow
#: (a test keeps the two equal).
DEFAULT_MAX_PIXELS = 64_000_000

#: ``errno`` values of an ``OSError`` that come from the user's paths or disk, not from a bug in vlkit.
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG})
USER_OS_ERRORS = (PermissionError, FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


PRECISIONS = ("auto", "fp32", "bf16")


def add_precision(parser: argparse.ArgumentParser) -> None:
    """Add ``--precision``: what image and caption embeddings are computed in."""
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto (default): bf16 autocast where the hardware computes in bf16 natively (CPUs "
                        "with AVX512-BF16 or AMX, recent GPUs), else fp32; fp32: exact float32 everywhere")


def pixel_limit(text: str) -> int:
    """Parse ``--max-pixels``: a whole number of pixels, at least 1 (``64000000`` or ``6.4e7``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of pixels: {text!r}") from None
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of pixels, at least 1, not {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``vlkit`` command line (importing each subcommand's ``register`` only)."""
    parser = argparse.ArgumentParser(
        prog="vlkit",
        description="Vision-language models: ingest data, train, evaluate, search.",
        epilog="Run 'vlkit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"vlkit {__version__}")
    parser.add_argument(
        "--max-pixels", type=pixel_limit, metavar="N",
        help="refuse any image whose header declares more than N pixels, before decoding it (default: "
        f"$VLKIT_MAX_PIXELS, else {DEFAULT_MAX_PIXELS}); applies to every command and its worker processes",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"vlkit.cli.{name}").register(sub)
    return parser


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for an error the user caused, or ``None`` for a bug (which keeps its traceback).

    Args:
        exc: the exception a command raised.

    Returns:
        ``"PATH: reason"`` for an ``OSError`` about the user's files or disk (no permission, disk full, a path
        under a regular file, a folder where a file is expected, ...), the message of a
        :class:`~vlkit.errors.VlkitError` or of an image that does not decode; ``None`` otherwise.
    """
    if isinstance(exc, VlkitError):
        return str(exc)
    decode = sys.modules.get("vlkit.data.decode")  # loaded whenever one of its errors can have been raised
    if decode is not None and isinstance(exc, decode.ImageDecodeError):
        return str(exc)
    if isinstance(exc, OSError) and (isinstance(exc, USER_OS_ERRORS) or exc.errno in USER_ERRNOS):
        reason = exc.strerror or str(exc)
        paths = [os.fsdecode(p) for p in (exc.filename, exc.filename2) if p is not None]
        return f"{' -> '.join(paths)}: {reason}" if paths else reason
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the ``vlkit`` command line.

    Args:
        argv: the arguments after ``vlkit`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for an error the user can fix, 130 when interrupted.
    """
    os.environ.setdefault("LANCE_LOG", "error")  # Lance's own deprecation notices are not for vlkit's users
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.max_pixels is not None:
            from vlkit.data.decode import ENV_VAR, set_max_pixels

            set_max_pixels(args.max_pixels)
            os.environ[ENV_VAR] = str(args.max_pixels)  # worker processes started by the command see it too
        result = args.func(args)
    except KeyboardInterrupt:
        print("vlkit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise
        print(f"vlkit: error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)
