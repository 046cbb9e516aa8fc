"""Shared fixtures: paths to the real data beside the checkout, and small helpers."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("VLKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
FLICKR = SHARED_DATA / "flickr8k-1k"
CIFAR = SHARED_DATA / "cifar10-test"
COCO = ROOT / "vlkit" / "assets" / "coco-cc-by"

needs_shared = pytest.mark.skipif(not FLICKR.exists(), reason=f"real data not found at {SHARED_DATA}")


def jpeg_bytes(color=(200, 30, 30), size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m vlkit ARGS`` in a real subprocess and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "vlkit", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A 300-image synthetic shapes dataset (train/val/test by hash), shared by the training tests."""
    from vlkit.data.ingest import ingest
    from vlkit.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    ingest([generate(root, 300, seed=4)], root / "synth.lance", progress=False)
    return root / "synth.lance"


CLIP_TINY_SYNTH = ["model.name=clip-tiny", "batch_size=32", "epochs=12", "log_every=1", "progress=false",
                   "optim.warmup_steps=10", "optim.lr_image=2e-3", "optim.lr_text=2e-3", "optim.lr_head=2e-3",
                   "best_metric=val/synth/rsum", "eval_every=20", "save_every=20"]


@pytest.fixture(scope="session")
def trained_run(synth, tmp_path_factory):
    """A tiny CLIP trained on ``synth`` for 12 epochs (a real run directory with ``model/`` and checkpoints),
    shared by the training, evaluation and search tests. Returns ``(run_dir, final_metrics)``."""
    from vlkit.config.load import load_config
    from vlkit.train.trainer import Trainer

    run = tmp_path_factory.mktemp("trained") / "run"
    cfg = load_config(None, [f"datasets={{synth: {{path: {synth}}}}}", "tasks=[{name: retrieval, dataset: synth}]",
                             f"output_dir={run}", *CLIP_TINY_SYNTH])
    metrics = Trainer(cfg).run()
    return run, metrics


#: A tiny CLIP with an 8 x 8 patch grid (32 px images, 4 px patches) trained longer than ``trained_run``: its
#: heat maps and imagined images are sharp enough to check against the shapes' masks and colours.
CLIP_TINY_GRID8 = [*(a for a in CLIP_TINY_SYNTH if not a.startswith("epochs=")), "epochs=30",
                   "model.args={image_size: 32, patch_size: 4}"]


@pytest.fixture(scope="session")
def explain_run(synth, tmp_path_factory):
    """The run directory of a tiny CLIP (8 x 8 patches) trained on ``synth`` for 30 epochs, shared by the
    imagination and explanation tests."""
    from vlkit.config.load import load_config
    from vlkit.train.trainer import Trainer

    run = tmp_path_factory.mktemp("explain_run") / "run"
    cfg = load_config(None, [f"datasets={{synth: {{path: {synth}}}}}", "tasks=[{name: retrieval, dataset: synth}]",
                             f"output_dir={run}", *CLIP_TINY_GRID8])
    with single_thread():
        Trainer(cfg).run()
    return run


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run as fast on one torch thread, and stay fast when other processes busy the CPUs; a module
    uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with single_thread():
        yield


@contextlib.contextmanager
def single_thread():
    """Torch on one thread inside the block, its earlier thread count restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_pixel_limit():
    """Every test starts and ends with the default pixel limit (``vlkit --max-pixels`` run in-process sets the
    limit and ``$VLKIT_MAX_PIXELS`` for the rest of the process)."""
    from vlkit.data.decode import ENV_VAR, set_max_pixels

    saved = os.environ.pop(ENV_VAR, None)
    set_max_pixels(None)
    yield
    set_max_pixels(None)
    os.environ.pop(ENV_VAR, None)
    if saved is not None:
        os.environ[ENV_VAR] = saved


@pytest.fixture(scope="session")
def synth_entail(tmp_path_factory):
    """150 synthetic shapes images with three entailment hypotheses each (SNLI-VE lines), ingested: 450 pairs."""
    from vlkit.data.ingest import ingest
    from vlkit.data.synth_entail import generate_entailment

    root = tmp_path_factory.mktemp("entail")
    ingest([generate_entailment(root, 150, seed=3)], root / "synth.lance", progress=False)
    return root / "synth.lance"


@pytest.fixture(scope="session")
def entail_run(synth_entail, tmp_path_factory):
    """A tiny ALBEF with a classification head trained on ``synth_entail`` by the shipped recipe snli_ve_synth
    (fewer epochs); its run directory, with ``model/classifier.*``."""
    from vlkit.config.load import load_config
    from vlkit.train.trainer import Trainer

    run = tmp_path_factory.mktemp("entail_run") / "run"
    recipe = ROOT / "vlkit" / "configs" / "snli_ve_synth.yaml"
    cfg = load_config(recipe, [f"datasets.synth.path={synth_entail}", f"output_dir={run}", "epochs=12",
                               "progress=false", "tensorboard=false", "log_every=1000"])
    with single_thread():
        Trainer(cfg).run()
    return run
