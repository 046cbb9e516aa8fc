"""Text-video retrieval with a two-tower model: video embeddings (the mean of uniformly sampled frames' image
embeddings) checked against an explicit loop over frames decoded by PyAV, ``vlkit eval --task retrieval``
against recall recomputed from the similarity matrix, static videos against images of the same frame, and
``vlkit index`` / search / serve over videos."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

av = pytest.importorskip("av")

from tests.conftest import ROOT  # noqa: E402
from vlkit.errors import DataError, VlkitError  # noqa: E402
from vlkit.inference.embed import compute_embeddings  # noqa: E402
from vlkit.inference.loading import load_for_inference  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VIDEOS = 12  # synthetic videos of 8 frames, 32 px, every one in split "train"
FPS = 8


def _manifest(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps({**row, "split": "train"}) + "\n" for row in rows))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from vlkit.data.ingest import ingest
    from vlkit.data.synth_video import generate_videos

    root = tmp_path_factory.mktemp("video_search")
    manifest = generate_videos(root / "raw", VIDEOS, seed=3, image_size=32, frames=8, fps=FPS)
    _manifest(manifest, [json.loads(line) for line in manifest.read_text().splitlines()])
    ingest([manifest], root / "videos.lance", progress=False)
    return root / "videos.lance"


@pytest.fixture(scope="module")
def run(videos, tmp_path_factory):
    """A tiny CLIP trained on the 12 videos by the clip_video_synth recipe (4 frames per clip)."""
    from vlkit.config.load import load_config
    from vlkit.train.trainer import Trainer

    out = tmp_path_factory.mktemp("video_search_run") / "run"
    cfg = load_config(ROOT / "vlkit" / "configs" / "clip_video_synth.yaml",
                      [f"datasets.synth_video.path={videos}", "datasets.synth_video.val_split=train",
                       f"output_dir={out}", "epochs=150", f"batch_size={VIDEOS}", "progress=false",
                       "tensorboard=false", "log_every=1000", "eval_every=1000", "save_every=1000",
                       "optim.warmup_steps=2"])
    Trainer(cfg).run()
    return out


@pytest.fixture(scope="module")
def loaded(run):
    loaded = load_for_inference(run)
    loaded.precision = "fp32"
    return loaded


@pytest.fixture(scope="module")
def static(tmp_path_factory):
    """Six videos whose 8 frames are all one frame (decoded bit-identical), and the same frames as PNG images
    with the same captions: ``(videos.lance, images.lance)``."""
    from PIL import Image

    from vlkit.data.ingest import ingest
    from vlkit.data.synth_video import encode_video, make_video

    root = tmp_path_factory.mktemp("static_videos")
    (root / "v" / "clips").mkdir(parents=True)
    (root / "i" / "frames").mkdir(parents=True)
    video_rows, image_rows = [], []
    for n in range(6):
        frames, record = make_video(5, n, 32, 8)
        data = encode_video([frames[4]] * 8, FPS)
        with av.open(io.BytesIO(data)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert all((d == decoded[0]).all() for d in decoded)  # identical frames after decoding
        (root / "v" / "clips" / f"{n}.mp4").write_bytes(data)
        Image.fromarray(decoded[0]).save(root / "i" / "frames" / f"{n}.png")
        video_rows.append({"video": f"clips/{n}.mp4", "text": record["text"]})
        image_rows.append({"image": f"frames/{n}.png", "text": record["text"]})
    _manifest(root / "v" / "videos.jsonl", video_rows)
    _manifest(root / "i" / "images.jsonl", image_rows)
    ingest([root / "v" / "videos.jsonl"], root / "videos.lance", progress=False)
    ingest([root / "i" / "images.jsonl"], root / "images.lance", progress=False)
    return root / "videos.lance", root / "images.lance"


def _by_hand(loaded, data: bytes, num: int) -> torch.Tensor:
    """A video's embedding computed one frame at a time: every frame decoded in order by PyAV, the centre frame
    of each of ``num`` equal segments taken, each through the image transform and the image tower alone,
    normalised, averaged, normalised."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    transform = loaded.model.preprocess.image_transform(train=False)
    vectors = []
    for k in range(num):
        buf = io.BytesIO()
        frames[(2 * k + 1) * len(frames) // (2 * num)].save(buf, "PNG")
        pixels = transform.normalize(transform(buf.getvalue())[None])  # [1, 3, S, S]
        with torch.no_grad():
            vectors.append(F.normalize(loaded.model.encode_image(pixels)[0], dim=-1))
    mean = torch.stack(vectors).mean(0)
    return mean / mean.norm()


def _recall(emb) -> dict[str, float]:
    """Recall@K both ways from the full similarity matrix (optimistic ties, as vlkit.metrics.retrieval)."""
    sims = emb.text @ emb.image.T  # [captions, videos]
    owner = emb.caption_image
    t2v = 1 + (sims > sims[torch.arange(len(owner)), owner][:, None]).sum(1)  # rank of each caption's video
    v2t = []
    for v in range(sims.shape[1]):
        best = sims[owner == v, v].max()  # the video's best caption
        v2t.append(1 + int((sims[:, v] > best).sum()))
    v2t = torch.tensor(v2t)
    out = {}
    for k in (1, 5, 10):
        out[f"t2v_r{k}"] = 100.0 * float((t2v <= k).float().mean())
        out[f"v2t_r{k}"] = 100.0 * float((v2t <= k).float().mean())
    return out


def test_video_embedding_equals_an_explicit_loop_over_frames(loaded, videos):
    import lance

    emb = compute_embeddings(loaded, videos, "train", frames=4, batch_size=5, prefetch_batches=0)
    ds = lance.dataset(str(videos))
    rows = ds.to_table(columns=["id", "captions"]).to_pylist()
    assert emb.frames == 4 and emb.ids == [r["id"] for r in rows]
    blobs = [data for _, data in ds.read_blobs("video", indices=list(range(VIDEOS)), preserve_order=True)]
    expected = torch.stack([_by_hand(loaded, data, 4) for data in blobs])
    torch.testing.assert_close(emb.image, expected, atol=1e-5, rtol=1e-4)
    # every caption of every video, each mapped to its video
    assert emb.captions == [c for r in rows for c in r["captions"]]
    assert emb.caption_image.tolist() == [i for i, r in enumerate(rows) for _ in r["captions"]]
    # another number of frames gives other embeddings: the setting is used
    assert not torch.allclose(compute_embeddings(loaded, videos, "train", frames=2).image, emb.image, atol=1e-3)


def test_eval_retrieval_over_videos_equals_recall_from_the_similarity_matrix(run, videos, capsys):
    from vlkit.cli import main
    from vlkit.eval.evaluate import evaluate

    result = evaluate(run, "retrieval", videos, "train", precision="fp32", batch_size=5)
    summary = result.summary()
    emb = result.embeddings
    assert emb.frames == 8 and summary["frames"] == 8  # the default for a video dataset
    assert summary["videos"] == VIDEOS and summary["captions"] == 2 * VIDEOS and "images" not in summary
    metrics = summary["metrics"]
    assert not any("t2i" in k or "i2t" in k for k in metrics)
    for name, value in _recall(emb).items():
        assert metrics[f"train/videos/{name}"] == pytest.approx(value), name
    assert metrics["train/videos/t2v_r10"] > metrics["train/videos/t2v_r1"] > 100 / VIDEOS  # trained: above chance
    # the command line: the table says videos; --frames 0 reads the middle frames (the image column)
    assert main(["eval", str(run), "--data", str(videos), "--split", "train", "--frames", "2",
                 "--precision", "fp32"]) == 0
    table = capsys.readouterr().out
    assert "12 videos (2 frames each" in table and "text->video" in table and "video->text" in table
    assert main(["eval", str(run), "--data", str(videos), "--split", "train", "--frames", "0", "--json"]) == 0
    images = json.loads(capsys.readouterr().out)
    assert images["images"] == VIDEOS and "train/videos/t2i_r1" in images["metrics"]


def test_static_videos_equal_images_of_their_frame(loaded, run, static):
    from vlkit.eval.evaluate import evaluate

    video_data, image_data = static
    as_videos = compute_embeddings(loaded, video_data, "train", frames=None)  # a video dataset: 8 frames
    as_images = compute_embeddings(loaded, image_data, "train")
    assert as_videos.frames == 8 and as_images.frames == 0
    torch.testing.assert_close(as_videos.image, as_images.image, atol=1e-5, rtol=1e-4)
    v = evaluate(run, "retrieval", video_data, "train", precision="fp32").metrics
    i = evaluate(run, "retrieval", image_data, "train", precision="fp32").metrics
    for name in ("r1", "r5", "r10", "mean_rank"):
        assert v[f"train/videos/t2v_{name}"] == pytest.approx(i[f"train/images/t2i_{name}"])
        assert v[f"train/videos/v2t_{name}"] == pytest.approx(i[f"train/images/i2t_{name}"])


def test_index_and_search_find_videos(loaded, videos, tmp_path):
    from PIL import Image

    from vlkit.search.index import build_index
    from vlkit.search.searcher import Searcher

    info = build_index(loaded, videos, tmp_path / "index")
    assert (info.frames, info.media, info.images, info.captions) == (8, "video", VIDEOS, 2 * VIDEOS)
    emb = compute_embeddings(loaded, videos, None, frames=8)
    searcher = Searcher(tmp_path / "index")
    first = [emb.caption_image.tolist().index(v) for v in range(VIDEOS)]  # each video's first caption
    own = []
    for v, c in enumerate(first):
        hits = searcher.search_text(emb.captions[c], k=VIDEOS)
        expected = torch.sort(emb.image @ emb.text[c], descending=True, stable=True).indices.tolist()
        assert [h.id for h in hits] == [emb.ids[i] for i in expected]  # the brute-force ranking of the videos
        assert all(h.media == "video" and h.duration == pytest.approx(1.0) for h in hits)  # 8 frames at 8/s
        own.append(1 + [h.id for h in hits].index(emb.ids[v]))  # the rank of the caption's own video
        assert searcher.search_vector(emb.image[v], k=1)[0].id == emb.ids[v]
    # the trained model finds every video among the first 3 of 12 from its own caption, most of them first (mean
    # pooling cannot tell "moves up" from "moves down" of the same shape, so not all)
    assert max(own) <= 3 and own.count(1) >= VIDEOS // 2, own
    # the thumbnail is the middle frame ingest stored (re-encoded as JPEG)
    import lance

    (_, stored), = lance.dataset(str(videos)).read_blobs("image", indices=[0])
    thumb = Image.open(io.BytesIO(searcher.thumbnail(emb.ids[0])))
    middle = Image.open(io.BytesIO(stored)).convert("RGB")
    assert thumb.size == middle.size
    diff = np.asarray(thumb.convert("RGB"), dtype=np.float32) - np.asarray(middle, dtype=np.float32)
    assert np.abs(diff).mean() < 4
    # re-ranking reads images, so an index of videos refuses it
    with pytest.raises(VlkitError, match="holds videos"):
        searcher.rerank_text("a red circle", 3, 5)


def test_server_json_of_video_results_carries_thumbnail_and_duration(loaded, videos, tmp_path):
    from fastapi.testclient import TestClient

    from vlkit.search.index import build_index
    from vlkit.search.searcher import Searcher
    from vlkit.search.server import create_app

    build_index(loaded, videos, tmp_path / "index", frames=2)
    searcher = Searcher(tmp_path / "index")
    with TestClient(create_app(searcher), base_url="http://127.0.0.1:8000") as client:
        info = client.get("/api/info").json()
        assert (info["media"], info["frames"], info["images"]) == ("video", 2, VIDEOS)
        body = client.get("/api/search", params={"q": "a blue triangle bounces", "k": 3}).json()
        hits = searcher.search_text("a blue triangle bounces", 3)
        assert [r["id"] for r in body["results"]] == [h.id for h in hits]
        for result in body["results"]:
            assert result["media"] == "video" and result["duration"] == pytest.approx(1.0)
            assert result["thumbnail"] == "/api/thumbnail/" + result["id"]
            picture = client.get(result["thumbnail"])
            assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
            assert picture.content == searcher.thumbnail(result["id"])


def test_bad_frames_and_rows_without_videos_are_refused(run, videos, static, tmp_path):
    from vlkit.data.ingest import ingest
    from vlkit.eval.evaluate import evaluate
    from vlkit.inference.video_embed import require_videos, resolve_frames

    _, image_data = static
    with pytest.raises(DataError, match="no videos"):
        resolve_frames(image_data, 4)
    assert resolve_frames(image_data, None) == 0 and resolve_frames(videos, None) == 8
    with pytest.raises(VlkitError, match="--frames must be"):
        resolve_frames(videos, -1)
    with pytest.raises(VlkitError, match="--frames applies to --task retrieval"):
        evaluate(run, "zeroshot", videos, "train", frames=4)
    with pytest.raises(VlkitError, match="--rerank"):
        evaluate(run, "retrieval", videos, "train", rerank=3)
    with pytest.raises(DataError, match="no videos"):
        require_videos(image_data, "train")
    # a video dataset with a row that holds only an image: named, before the model is loaded
    root = image_data.parent
    _manifest(root / "mixed.jsonl", [{"video": "v/clips/0.mp4", "text": ["a clip"]},
                                     {"image": "i/frames/1.png", "text": ["a picture"]}])
    ingest([root / "mixed.jsonl"], tmp_path / "mixed.lance", progress=False)
    with pytest.raises(DataError, match="row 'i/frames/1.png'.*has no video.*--frames 0"):
        evaluate(tmp_path / "nowhere", "retrieval", tmp_path / "mixed.lance", "train")
