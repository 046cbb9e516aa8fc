"""The built wheel: it carries the shipped recipes, and vlkit run from it (outside the checkout) finds them."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT


def _can_build_wheels() -> bool:
    """setuptools that builds wheels by itself (70.1 and later), or an older one with the wheel package."""
    try:
        major, minor = (int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


needs_build_tools = pytest.mark.skipif(not _can_build_wheels(),
                                       reason="building a wheel without build isolation needs setuptools>=70.1")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a clean copy of the sources (no stale build/ folder, checkout left untouched)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "vlkit", src / "vlkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"),
         str(src)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = (root / "dist").glob("vlkit-*.whl")
    return path


@needs_build_tools
def test_wheel_carries_every_recipe(wheel):
    shipped = sorted(p.name for p in (ROOT / "vlkit" / "configs").glob("*.yaml"))
    assert "quickstart.yaml" in shipped
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        inside = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("vlkit/configs/") and n.endswith(".yaml"))
        assert inside == shipped
        assert zf.read("vlkit/configs/quickstart.yaml") == (ROOT / "vlkit" / "configs" / "quickstart.yaml").read_bytes()


@needs_build_tools
def test_installed_wheel_lists_and_validates_recipes(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)  # a pure-Python wheel installs by unpacking into site-packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    shipped = sorted(p.stem for p in (ROOT / "vlkit" / "configs").glob("*.yaml"))
    listed = subprocess.run([sys.executable, "-m", "vlkit", "configs", "list"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert sorted(line.split()[0] for line in listed.stdout.splitlines()) == shipped
    script = "import sys, vlkit; print(vlkit.__file__); from vlkit.cli import main; sys.exit(main(sys.argv[1:]))"
    checked = subprocess.run([sys.executable, "-c", script, "configs", "validate"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    where, *oks = checked.stdout.splitlines()
    assert Path(where).is_relative_to(site)  # the wheel's copy ran, not the checkout's
    assert oks == [f"ok {name}" for name in shipped]
