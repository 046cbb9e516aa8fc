"""The command line itself: help for every command and option, a parser that loads no heavy module, one-line
errors for everything a user can cause (tracebacks only for bugs), and the global ``--max-pixels``."""

from __future__ import annotations

import argparse
import errno
import os
import re
import subprocess
import sys
import time

import pytest

from vlkit import cli
from vlkit.cli import SUBCOMMANDS, build_parser, main

from .conftest import run_cli

HEAVY = ("torch", "lance", "lancedb", "transformers", "PIL", "numpy", "matplotlib", "fastapi", "pyarrow", "sklearn")


def _parsers(parser: argparse.ArgumentParser, path: str = "vlkit"):
    """Every parser of the tree with its command path, and the help its parent lists it with."""
    yield path, parser, None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {choice.dest: choice.help for choice in action._choices_actions}
            for name, child in action.choices.items():
                for sub_path, sub, helptext in _parsers(child, f"{path} {name}"):
                    yield sub_path, sub, listed.get(name) if sub is child else helptext


def test_every_command_and_option_has_help():
    missing = []
    for path, parser, listed in _parsers(build_parser()):
        if path != "vlkit":
            if not listed:
                missing.append(f"{path}: no one-line help in its parent's list")
            if not (parser.description or "").strip():
                missing.append(f"{path}: no description in '{path} --help'")
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}: no help")
    assert missing == []


def test_top_level_help_lists_every_command_with_its_help():
    proc = run_cli("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in SUBCOMMANDS:
        assert re.search(rf"^ +{name} +\S", proc.stdout, re.M), f"{name} is not listed with its help"
    assert "--max-pixels N" in proc.stdout
    proc = run_cli("quickstart", "--help", timeout=60)
    description = proc.stdout.split("\n\n")[1]
    assert proc.returncode == 0 and "bundled" in description and not description.startswith("positional")


def test_building_the_parser_imports_no_heavy_module():
    code = ("import sys; from vlkit.cli import build_parser; build_parser(); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vlkit", "--help"], capture_output=True, text=True, timeout=60)
    print(f"python -m vlkit --help: {time.perf_counter() - start:.2f} s")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: vlkit")


def test_defaults_repeated_for_the_help_match_their_source():
    from vlkit.cli import index, ingest
    from vlkit.data import decode, images
    from vlkit.search import index as search_index

    assert index.DEFAULT_ANN_THRESHOLD == search_index.DEFAULT_ANN_THRESHOLD
    assert ingest.DEFAULT_MAX_IMAGE_BYTES == images.DEFAULT_MAX_IMAGE_BYTES
    assert cli.DEFAULT_MAX_PIXELS == decode.DEFAULT_MAX_PIXELS


# ---------------------------------------------------------------- errors


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlkit: error: ") and "Traceback" not in text, text
    return lines[0]


def test_output_path_under_a_regular_file_is_one_line(tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    proc = run_cli("configs", "cp", "synth_clip_tiny", blocker / "x" / "mine.yaml", timeout=60)
    assert proc.returncode == 2
    assert str(blocker) in _one_line(proc.stderr)
    assert blocker.read_text() == "not a folder"


def _failing_plot(monkeypatch, exc: BaseException) -> None:
    def run(args):
        raise exc

    monkeypatch.setattr("vlkit.cli.plot.run", run)


@pytest.mark.parametrize("exc, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/out"), "/data/out: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors"),
     "/data/out/model.safetensors: No space left on device"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "somefile/x"), "somefile/x: Not a directory"),
    (FileExistsError(errno.EEXIST, "File exists", "a", None, "b"), "a -> b: File exists"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "runs"), "runs: Is a directory"),
])
def test_user_os_errors_are_one_line(monkeypatch, capsys, exc, expected):
    _failing_plot(monkeypatch, exc)
    assert main(["plot", "run"]) == 2
    assert _one_line(capsys.readouterr().err) == f"vlkit: error: {expected}"


def test_image_decode_errors_are_one_line(monkeypatch, capsys):
    from vlkit.data.decode import ImageDecodeError, ImageTooLarge

    for exc in (ImageDecodeError("not an image (unrecognised format)"), ImageTooLarge(9000, 9000, 1000)):
        _failing_plot(monkeypatch, exc)
        assert main(["plot", "run"]) == 2
        assert _one_line(capsys.readouterr().err) == f"vlkit: error: {exc}"


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "Input/output error"), ConnectionResetError(),
                                 RuntimeError("a bug"), ValueError("a bug"), KeyError("a bug")])
def test_bugs_keep_their_traceback(monkeypatch, exc):
    _failing_plot(monkeypatch, exc)
    with pytest.raises(type(exc)):
        main(["plot", "run"])


def test_max_pixels_reaches_the_decoder(monkeypatch, capsys):
    from vlkit.data import decode

    monkeypatch.delenv(decode.ENV_VAR, raising=False)
    seen = {}

    def run(args):
        seen["limit"], seen["env"] = decode.max_pixels(), os.environ.get(decode.ENV_VAR)
        return 0

    monkeypatch.setattr("vlkit.cli.plot.run", run)
    try:
        assert main(["--max-pixels", "1234", "plot", "run"]) == 0
    finally:
        decode.set_max_pixels(None)
    assert seen == {"limit": 1234, "env": "1234"}  # worker processes inherit it through the environment
    for bad in ("0", "-5", "1.5", "many"):
        with pytest.raises(SystemExit) as info:
            main(["--max-pixels", bad, "plot", "run"])
        assert info.value.code == 2
        assert "--max-pixels" in capsys.readouterr().err


def test_max_pixels_is_applied_by_a_real_command(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from vlkit.data import decode

    monkeypatch.delenv(decode.ENV_VAR, raising=False)
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)  # 1200 pixels
    run = tmp_path / "no-run-here"
    try:
        # 'vlkit ask' checks the image before it loads the model: over the limit, the image is what it reports
        assert main(["--max-pixels", "1199", "ask", str(run), str(image), "what colour is it?"]) == 2
        line = _one_line(capsys.readouterr().err)
        assert str(image) in line and "pixel limit" in line
        assert main(["--max-pixels", "1200", "ask", str(run), str(image), "what colour is it?"]) == 2
        line = _one_line(capsys.readouterr().err)
        assert "no-run-here" in line and "pixel limit" not in line  # the image passed; the missing run did not
    finally:
        decode.set_max_pixels(None)
