"""The timesformer_synth recipe learns what only the order of frames shows.

Three pairs of the eight synthetic actions (moving left/right, up/down, growing/shrinking) hold the same frames
in opposite orders: a model blind to frame order (space-only attention) can tell at most one class of each pair,
5/8 = 62.5 % overall. Trained on decoded synthetic clips, the recipe's divided attention goes above that ceiling.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("av")

from tests.conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = ["epochs=30", "progress=false", "seed=0", "optim.warmup_steps=300"]
ORDER_BLIND_CEILING = 62.5


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """640 synthetic action videos (16 frames, 32 px), ingested with their train/val/test splits."""
    from vlkit.data.ingest import ingest
    from vlkit.data.synth_video import generate_videos

    root = tmp_path_factory.mktemp("actions")
    manifest = generate_videos(root / "synth", 640, seed=5, image_size=32, frames=16)
    ingest([manifest], root / "actions.lance", progress=False)
    return root / "actions.lance"


def _recipe(data, out, attention: str):
    from vlkit.config.load import load_config

    return load_config(ROOT / "vlkit" / "configs" / "timesformer_synth.yaml", [
        f"datasets.synth_video.path={data}", f"output_dir={out}", *SHORT,
        f"model.args={{num_classes: 8, frames: 4, image_size: 32, patch_size: 8, attention: {attention}}}"])


def test_space_only_recipe_is_blind_to_frame_order(tmp_path):
    from vlkit.models.registry import create_model

    cfg = _recipe(tmp_path / "none.lance", tmp_path / "run", "space")
    torch.manual_seed(0)
    model = create_model(cfg.model.name, **cfg.model.args).eval()
    clip = torch.randn(3, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(clip), model(clip.flip(1)))  # a clip and its reverse: one score
        divided = create_model(cfg.model.name, **{**cfg.model.args, "attention": "divided"}).eval()
        assert not torch.allclose(divided(clip), divided(clip.flip(1)), atol=1e-4)


@pytest.mark.slow  # about 100 s on 2 cores: the recipe trained for 1200 steps on 4-frame clips
def test_divided_attention_learns_what_only_frame_order_shows(clips, tmp_path):
    from vlkit.eval.evaluate import evaluate
    from vlkit.train.trainer import Trainer

    out = tmp_path / "divided"
    Trainer(_recipe(clips, out, "divided")).run()
    right = seen = 0
    for split in ("val", "test"):  # both held-out splits: about 130 videos
        result = evaluate(out, "video-classification", clips, split, clips=2, precision="fp32").summary()
        seen += result["videos"]
        right += result["metrics"][f"{split}/actions/top1"] * result["videos"] / 100
    assert seen >= 100
    top1 = 100 * right / seen
    assert top1 >= ORDER_BLIND_CEILING + 12.5, top1  # chance is 12.5 %
