"""Video tasks end to end on a few synthetic clips: the timesformer_synth recipe trains (tiny, briefly), vlkit eval
--task video-classification scores the run against the model run by hand over the same clips, and CLIP reads a
video as the mean of its frames' embeddings."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("av")

from tests.conftest import ROOT, run_cli  # noqa: E402
from vlkit.models.registry import create_model  # noqa: E402
from vlkit.models.video_two_tower import VideoTwoTower, encode_video  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE_SHORT = ["epochs=2", "batch_size=8", "progress=false", "log_every=1", "optim.warmup_steps=2",
                "model.args={num_classes: 8, frames: 4, image_size: 32, patch_size: 8}"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """40 synthetic clips (five of each action, 16 frames, 32 px) ingested with train/val/test splits."""
    from vlkit.data.ingest import ingest
    from vlkit.data.synth_video import generate_videos

    root = tmp_path_factory.mktemp("videos")
    ingest([generate_videos(root, 40, seed=3, image_size=32, frames=16)], root / "synth.lance", progress=False)
    return root / "synth.lance"


@pytest.fixture(scope="module")
def video_run(videos, tmp_path_factory):
    from vlkit.config.load import load_config
    from vlkit.train.trainer import Trainer

    run = tmp_path_factory.mktemp("video_run") / "run"
    cfg = load_config(ROOT / "vlkit" / "configs" / "timesformer_synth.yaml",
                      [f"datasets.synth_video.path={videos}", f"output_dir={run}", *RECIPE_SHORT])
    return run, Trainer(cfg).run()


def test_recipe_trains_and_validates_with_averaged_clips(video_run):
    run, metrics = video_run
    assert {"val/synth_video/accuracy", "val/synth_video/top5", "val/synth_video/mean_per_class_recall"} <= set(metrics)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/synth_video/loss"] for m in lines if "train/synth_video/loss" in m]
    assert len(losses) >= 4 and all(l == l for l in losses)  # noqa: E741  (no NaN)
    assert (run / "model" / "config.json").exists()


def test_eval_video_classification_equals_the_model_run_by_hand(video_run, videos):
    from vlkit.data.transforms import ImageTransform
    from vlkit.data.video_dataset import LanceVideoDataset
    from vlkit.inference.loading import load_for_inference
    from vlkit.metrics.classification import classification_metrics

    run, _ = video_run
    from vlkit.eval.evaluate import evaluate

    out = evaluate(run, "video-classification", videos, "test", clips=2, precision="fp32").summary()
    model = load_for_inference(run).model.eval()
    ds = LanceVideoDataset(videos, "test", ImageTransform(32, train=False, mean=model.preprocess.mean,
                                                          std=model.preprocess.std), num_frames=4, clips=2)
    batch = ds.__getitems__(list(range(len(ds))))
    with torch.no_grad():
        probs = model(batch["video"]).softmax(-1)  # [videos * 2, classes], video by video
    per_video = (probs[0::2] + probs[1::2]) / 2
    m = classification_metrics(per_video, batch["label"])
    assert out["videos"] == len(ds) and out["clips_per_video"] == 2
    assert out["metrics"]["test/synth/top1"] == pytest.approx(m.top1)
    assert out["metrics"]["test/synth/top5"] == pytest.approx(m.top5)
    assert out["confusion"]["matrix"] == m.confusion.tolist()
    # a bad option is refused with one line
    bad = run_cli("eval", run, "--task", "video-classification", "--data", videos, "--clips", "0")
    assert bad.returncode == 2 and "--clips" in bad.stderr


def test_clip_video_recipe_trains_and_validates_against_embeddings_by_hand(videos, tmp_path):
    from vlkit.config.load import load_config
    from vlkit.data.text import TextTokenizer
    from vlkit.data.transforms import ImageTransform
    from vlkit.data.video_dataset import LanceVideoDataset
    from vlkit.inference.loading import load_for_inference
    from vlkit.metrics.retrieval import retrieval_metrics
    from vlkit.train.trainer import Trainer

    cfg = load_config(ROOT / "vlkit" / "configs" / "clip_video_synth.yaml",
                      [f"datasets.synth_video.path={videos}", f"output_dir={tmp_path / 'run'}", "epochs=2",
                       "batch_size=8", "progress=false", "log_every=1", "optim.warmup_steps=2"])
    metrics = Trainer(cfg).run()
    assert "val/synth_video/t2i_r1" in metrics and "val/synth_video/i2t_r5" in metrics
    loaded = load_for_inference(tmp_path / "run")
    model, pre = loaded.model.eval(), loaded.model.preprocess
    ds = LanceVideoDataset(videos, "val", ImageTransform(pre.image_size, train=False, mean=pre.mean, std=pre.std),
                           num_frames=4, tokenizer=loaded.tokenizer, captions="first")
    batch = ds.__getitems__(list(range(len(ds))))
    with torch.no_grad():
        v = VideoTwoTower(model).encode_video(batch["video"])
        t = model.encode_text(batch["input_ids"], batch["attention_mask"])
    expected = retrieval_metrics(v, t, torch.arange(len(ds))).as_dict()
    for name in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5"):
        assert metrics[f"val/synth_video/{name}"] == pytest.approx(expected[name]), name


def test_clip_video_embedding_is_the_mean_of_frame_embeddings():
    torch.manual_seed(0)
    clip = create_model("clip-tiny").eval()
    video = torch.randn(3, 5, 3, 32, 32)
    with torch.no_grad():
        got = VideoTwoTower(clip).encode_video(video)
        for i in range(3):
            frames = [clip.encode_image(video[i, t:t + 1])[0] for t in range(5)]
            mean = sum(frames) / 5
            torch.testing.assert_close(got[i], mean / mean.norm(), atol=1e-5, rtol=1e-5)
        # identical frames: the image embedding itself
        same = video[:, :1].expand(3, 5, 3, 32, 32)
        torch.testing.assert_close(encode_video(clip, same), clip.encode_image(video[:, 0]), atol=1e-5, rtol=1e-5)
        out = VideoTwoTower(clip)(video, torch.randint(1, 50, (3, 8)))
    assert out.image_embeds.shape == out.text_embeds.shape == (3, clip.config.embed_dim)
    with pytest.raises(ValueError, match="two-tower"):
        VideoTwoTower(create_model("timesformer-tiny"))
