"""Video data: the ingest reader (metadata as PyAV reports it, the original bytes kept, bad files one line each),
the TSN frame sampler, seeking decode against decoding every frame, the clip loader, and synthetic videos whose
labels match the measured motion of their shape."""

from __future__ import annotations

import io
import json
import random
from fractions import Fraction
from pathlib import Path

import lance
import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av")

from vlkit.data.dataset import make_loader  # noqa: E402
from vlkit.data.ingest import ingest  # noqa: E402
from vlkit.data.synth_video import ACTIONS, encode_video, generate_videos, make_video  # noqa: E402
from vlkit.data.transforms import ImageTransform  # noqa: E402
from vlkit.data.video import decode_frames, probe_video, sample_indices  # noqa: E402
from vlkit.data.video_dataset import LanceVideoDataset  # noqa: E402
from vlkit.errors import DataError, VlkitError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _pattern_video(frames: int, codec: str = "libx264", fmt: str = "mp4", size: tuple[int, int] = (48, 32),
                   gop: int = 5, fps: int = 12) -> bytes:
    """A video whose every frame differs (a moving bar and a brightness ramp), B-frames on with libx264."""
    buf = io.BytesIO()
    container = av.open(buf, "w", format=fmt)
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = gop
    for t in range(frames):
        a = np.full((size[1], size[0], 3), 40, np.uint8)
        a[:, :, 2] = (t * 7) % 256
        a[:, (t * 3) % size[0]] = (250, 250, 30)
        for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return buf.getvalue()


def _all_frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def video_files(tmp_path_factory):
    """Three good videos (mp4/h264, avi/mpeg4, webm/vp9), a truncated one, a non-video and an empty file, listed by
    a JSONL file with captions; returns (root, jsonl, {name: bytes})."""
    root = tmp_path_factory.mktemp("videos")
    files = {"a.mp4": _pattern_video(30), "b.avi": _pattern_video(21, "mpeg4", "avi", (40, 40)),
             "c.webm": _pattern_video(17, "libvpx-vp9", "webm", (32, 32), fps=10)}
    files["cut.mp4"] = files["a.mp4"][: len(files["a.mp4"]) // 2]
    files["text.mp4"] = b"this is not a video" * 20
    files["zero.mkv"] = b""
    for name, data in files.items():
        (root / name).write_bytes(data)
    jsonl = root / "videos.jsonl"
    jsonl.write_text("".join(json.dumps({"video": name, "text": [f"clip {name}"], "split": "train"}) + "\n"
                             for name in files))
    return root, jsonl, files


@pytest.fixture(scope="module")
def ingested(video_files, tmp_path_factory):
    root, jsonl, _ = video_files
    out = tmp_path_factory.mktemp("vds") / "v.lance"
    report = ingest([jsonl], out, progress=False)
    return out, report


def test_ingest_reads_metadata_as_pyav_reports_it_and_keeps_the_bytes(video_files, ingested):
    root, _, files = video_files
    out, _ = ingested
    ds = lance.dataset(str(out))
    rows = {r["id"]: r for r in ds.to_table(columns=["id", "width", "height", "fps", "frames", "duration",
                                                     "video_codec", "format", "captions"]).to_pylist()}
    assert sorted(rows) == ["a.mp4", "b.avi", "c.webm"]
    offsets = {r: i for i, r in enumerate(ds.to_table(columns=["id"]).column("id").to_pylist())}
    for name, row in rows.items():
        with av.open(str(root / name)) as container:  # the reference: PyAV on the file itself
            stream = container.streams.video[0]
            count = sum(1 for _ in container.decode(stream))
            expected = (stream.codec_context.width, stream.codec_context.height, float(stream.average_rate),
                        stream.codec_context.name)
        assert (row["width"], row["height"], row["fps"], row["video_codec"]) == expected
        assert row["frames"] == count and row["duration"] == pytest.approx(count / expected[2])
        assert row["captions"] == [f"clip {name}"] and row["format"] == "JPEG"
        (_, video), = ds.read_blobs("video", indices=[offsets[name]])
        assert video == files[name]  # the original bytes, unchanged
        (_, image), = ds.read_blobs("image", indices=[offsets[name]])
        middle = _all_frames(files[name])[count // 2].astype(int)
        thumb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=int)
        assert thumb.shape == middle.shape and np.abs(thumb - middle).mean() < 3  # the middle frame, as JPEG


def test_bad_videos_are_one_line_each(video_files, ingested):
    root, _, _ = video_files
    _, report = ingested
    lines = [str(p) for p in report.problems]
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    by_file = {Path(line.split(":", 1)[0]).name: line for line in lines}
    assert "truncated" in by_file["cut.mp4"] or "not a readable video" in by_file["cut.mp4"]
    assert "not a readable video" in by_file["text.mp4"]
    assert "empty video file" in by_file["zero.mkv"]


def test_csv_with_a_video_column(video_files, tmp_path):
    root, _, files = video_files
    csv = root / "captions.csv"
    csv.write_text("video,caption\na.mp4,a bar moves right\na.mp4,a sweeping bar\nc.webm,a bar on blue\n")
    ingest([csv], tmp_path / "c.lance", progress=False)
    ds = lance.dataset(str(tmp_path / "c.lance"))
    rows = ds.to_table(columns=["id", "captions", "frames"]).to_pylist()
    assert sorted((r["id"], r["captions"], r["frames"]) for r in rows) == [
        ("a.mp4", ["a bar moves right", "a sweeping bar"], 30), ("c.webm", ["a bar on blue"], 17)]
    blobs = dict(zip([r["id"] for r in rows], (d for _, d in ds.read_blobs("video", indices=[0, 1]))))
    assert blobs == {"a.mp4": files["a.mp4"], "c.webm": files["c.webm"]}


def test_truncated_stream_with_its_header_is_reported(tmp_path):
    data = _pattern_video(40, "mpeg4", "avi")  # avi: the index is at the end, the header says 40 frames
    with pytest.raises(DataError, match="truncated video"):
        probe_video(data[: len(data) * 2 // 3])
    assert probe_video(data, max_frames=40, max_seconds=40 / 12)[0].frames == 40  # at the limits: accepted
    with pytest.raises(DataError, match="41 frames is over the limit of 40"):
        probe_video(_pattern_video(41, "mpeg4", "avi"), max_frames=40)
    with pytest.raises(DataError, match="over the limit of 3 s"):
        probe_video(data, max_seconds=3.0)
    with pytest.raises(DataError, match="over the pixel limit"):
        probe_video(data, max_pixels=48 * 32 - 1)


def test_strict_ingest_of_a_class_folder_rereads_videos_past_the_kept_bytes(tmp_path, monkeypatch):
    import vlkit.data.ingest_images as ingest_images

    for cls, n in (("left", 13), ("right", 9)):
        (tmp_path / "clips" / cls).mkdir(parents=True)
        (tmp_path / "clips" / cls / f"v{n}.mp4").write_bytes(_pattern_video(n))
    monkeypatch.setattr(ingest_images, "KEEP_CHECKED_BYTES", 0)  # every checked video is read again to write
    ingest([tmp_path / "clips"], tmp_path / "c.lance", strict=True, progress=False)
    rows = lance.dataset(str(tmp_path / "c.lance")).to_table(columns=["id", "class_name", "frames"]).to_pylist()
    assert sorted((r["id"], r["class_name"], r["frames"]) for r in rows) == [
        ("left/v13.mp4", "left", 13), ("right/v9.mp4", "right", 9)]


def _tsn(frames: int, num: int, clip: int, clips: int) -> list[int]:
    """TSN's evaluation rule in exact fractions: segment i spans frames/num frames; take the point at
    (clip + 1/2)/clips of it."""
    seg = Fraction(frames, num)
    return [min(frames - 1, int(seg * i + seg * Fraction(2 * clip + 1, 2 * clips))) for i in range(num)]


@pytest.mark.parametrize("frames,num", [(16, 8), (30, 8), (7, 8), (300, 16), (9, 3), (1, 4)])
def test_sampler_follows_the_tsn_rule(frames, num):
    for clips in (1, 3):
        for clip in range(clips):
            assert sample_indices(frames, num, False, clip=clip, clips=clips) == _tsn(frames, num, clip, clips)
    if frames % num == 0:  # the integer form of mmaction's SampleFrames: offset + interval // 2
        step = frames // num
        assert sample_indices(frames, num, False) == [i * step + step // 2 for i in range(num)]
    seen = [set() for _ in range(num)]
    for seed in range(200):
        picks = sample_indices(frames, num, True, random.Random(seed))
        for i, pick in enumerate(picks):
            lo, hi = int(Fraction(frames * i, num)), int(Fraction(frames * (i + 1), num))
            assert (lo <= pick < hi) if hi > lo else pick == min(lo, frames - 1)
            seen[i].add(pick)
    for i in range(num):  # every frame of a segment is drawn
        lo, hi = frames * i // num, frames * (i + 1) // num
        assert seen[i] == (set(range(lo, hi)) if hi > lo else {min(lo, frames - 1)})


@pytest.mark.parametrize("codec,fmt", [("libx264", "mp4"), ("mpeg4", "avi"), ("libvpx-vp9", "webm")])
def test_seeking_decode_equals_decoding_every_frame(codec, fmt):
    data = _pattern_video(37, codec, fmt, gop=6)
    every = _all_frames(data)
    rng = random.Random(3)
    for indices in ([0], [36], [5, 5, 30, 2, 11, 12, 13], [rng.randrange(37) for _ in range(12)],
                    sample_indices(37, 8, False)):
        got = decode_frames(data, indices)
        assert all(np.array_equal(np.asarray(g), every[i]) for g, i in zip(got, indices))
    with pytest.raises(DataError, match="outside the video"):
        decode_frames(data, [37])


@pytest.fixture(scope="module")
def synth_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_video")
    jsonl = generate_videos(root, 16, seed=5, image_size=64, frames=16)
    ingest([jsonl], root / "synth.lance", split="train", progress=False)
    return root, jsonl


def test_loader_batches_eval_clips_like_the_image_transform_of_each_frame(synth_videos):
    root, _ = synth_videos
    transform = ImageTransform(40)
    ds = LanceVideoDataset(root / "synth.lance", "train", transform, num_frames=4, clips=2, captions="first")
    batch = ds.__getitems__([0, 3])
    assert batch["video"].shape == (4, 4, 3, 40, 40) and batch["video"].dtype == torch.float32
    assert batch["clip_video"].tolist() == [0, 0, 1, 1]
    assert batch["frame_index"].tolist() == [_tsn(16, 4, 0, 2), _tsn(16, 4, 1, 2)] * 2
    table = lance.dataset(str(root / "synth.lance")).to_table(columns=["id", "label", "captions"]).to_pylist()
    for pos, k in ((0, 0), (0, 1), (1, 0), (1, 1)):
        row = ds.offsets[[0, 3][pos]]
        every = _all_frames((root / table[row]["id"]).read_bytes())
        frames = []
        for i in _tsn(16, 4, k, 2):  # each picked frame through the image path, as a PNG
            buf = io.BytesIO()
            Image.fromarray(every[i]).save(buf, "PNG")
            frames.append(transform(buf.getvalue()))
        expected = transform.normalize(torch.stack(frames))
        assert torch.allclose(batch["video"][2 * pos + k], expected, atol=1e-5)
    assert batch["label"].tolist() == [table[ds.offsets[i]]["label"] for i in (0, 3)]
    assert batch["text"] == [table[ds.offsets[i]]["captions"][0] for i in (0, 3)]


def test_training_clips_share_one_crop_and_never_flip_a_left_right_clip(tmp_path):
    still = [Image.new("RGB", (64, 48), (90, 90, 90)) for _ in range(12)]
    for img in still:  # the same picture in every frame: one crop for the clip gives equal frames
        img.paste((220, 30, 30), (5, 5, 25, 20))
    videos = tmp_path / "v"
    videos.mkdir()
    (videos / "still.mp4").write_bytes(encode_video(still, 8))
    frames, record = make_video(0, ACTIONS.index("moving left"), 64, 12)
    (videos / "left.mp4").write_bytes(encode_video(frames, 8))
    (videos / "v.jsonl").write_text(json.dumps({"video": "still.mp4", "text": "a still red box"}) + "\n"
                                    + json.dumps({"video": "left.mp4", "text": record["text"]}) + "\n")
    ingest([videos / "v.jsonl"], tmp_path / "v.lance", split="train", progress=False)
    transform = ImageTransform(32, train=True, scale=(0.3, 0.6))
    ds = LanceVideoDataset(tmp_path / "v.lance", "train", transform, num_frames=6, normalize=False,
                           captions="random")
    ids = lance.dataset(str(tmp_path / "v.lance")).to_table(columns=["id"]).column("id").to_pylist()
    still_pos, left_pos = ids.index("still.mp4"), ids.index("left.mp4")
    crops = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        batch = ds.__getitems__([still_pos, left_pos])
        clip = batch["video"][0].int()  # [frames, 3, 32, 32]
        assert (clip - clip[0]).abs().max() <= 12  # frames differ only by the codec's noise (another crop: ~130)
        crops.add(clip[0].float().mean().round().item())
        moving = batch["video"][1].int()
        xs = [_centroid(frame.permute(1, 2, 0).numpy(), moving[0, :, 0, 0].numpy())[0] for frame in moving]
        assert xs[-1] < xs[0]  # still moving left: a caption that says "left" is never mirrored
    assert len(crops) > 1  # the crops do change between epochs
    again = ds.__getitems__([still_pos, left_pos])
    assert torch.equal(again["video"], batch["video"])  # the same epoch gives the same clips
    assert again["frame_index"].tolist() == batch["frame_index"].tolist()


def test_loader_through_make_loader(synth_videos):
    root, _ = synth_videos
    ds = LanceVideoDataset(root / "synth.lance", "train", ImageTransform(32, train=True), num_frames=8)
    batches = list(make_loader(ds, batch_size=5))
    assert [b["video"].shape for b in batches] == [(5, 8, 3, 32, 32)] * 3 + [(1, 8, 3, 32, 32)]
    assert sorted(i for b in batches for i in b["label"].tolist()) == sorted(
        lance.dataset(str(root / "synth.lance")).to_table(columns=["label"]).column("label").to_pylist())
    with pytest.raises(DataError, match="no videos"):
        from vlkit.data.synth import generate

        generate(root.parent / "imgs", 4)
        ingest([root.parent / "imgs" / "synth.jsonl"], root.parent / "imgs.lance", progress=False, split="train")
        LanceVideoDataset(root.parent / "imgs.lance", "train", ImageTransform(32), num_frames=4)


def _centroid(frame: np.ndarray, background: np.ndarray) -> tuple[float, float, int]:
    """Centroid (x, y) and area of the pixels far from the background colour."""
    mask = np.abs(frame.astype(int) - background.astype(int)).sum(-1) > 60
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean()), int(mask.sum())


def test_synthetic_labels_match_the_measured_motion(synth_videos):
    root, jsonl = synth_videos
    s = 64
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {r["class_name"] for r in records} == set(ACTIONS)
    for rec in records:
        frames = _all_frames((root / rec["video"]).read_bytes())
        track = [_centroid(f, f[0, 0]) for f in frames]
        xs, ys, areas = (np.array(v, dtype=float) for v in zip(*track))
        dx, dy = xs[-1] - xs[0], ys[-1] - ys[0]
        action = rec["class_name"]
        assert ACTIONS[rec["label"]] == action and rec["color"] in rec["text"][0] and rec["shape"] in rec["text"][0]
        if action.startswith("moving"):
            want = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}
            ux, uy = want[action]
            along, across = (dx * ux + dy * uy), abs(dx * uy + dy * ux)
            assert along > s / 4 and across < s / 16, (rec, dx, dy)
            assert np.all(np.diff(xs * ux + ys * uy) > -1)  # steadily, frame by frame
        elif action in ("growing", "shrinking"):
            ratio = areas[-1] / areas[0]
            assert (ratio > 2) if action == "growing" else (ratio < 0.5), (rec, ratio)
            assert abs(dx) < 2 and abs(dy) < 2
        elif action == "rotating":
            first = np.abs(frames[0].astype(int) - frames[0][0, 0]).sum(-1) > 60
            last = np.abs(frames[-1].astype(int) - frames[-1][0, 0]).sum(-1) > 60
            iou = (first & last).sum() / (first | last).sum()
            assert abs(dx) < 2 and abs(dy) < 2 and 0.85 < areas[-1] / areas[0] < 1.15 and iou < 0.9, (rec, iou)
        else:  # bouncing: down and back up, ending where it started
            assert ys.max() - ys.min() > s / 4 and abs(dy) < s / 16 and abs(dx) < 2, (rec, ys)


def test_synthetic_videos_are_deterministic_and_bounded(tmp_path):
    a = generate_videos(tmp_path / "a", 3, seed=2, image_size=32, frames=6, layout="folders")
    b = generate_videos(tmp_path / "b", 3, seed=2, image_size=32, frames=6, layout="folders")
    c = generate_videos(tmp_path / "c", 3, seed=3, image_size=32, frames=6, layout="folders")
    files = sorted(p.relative_to(a) for p in a.rglob("*.mp4"))
    assert [p.parent.name for p in files] == list(ACTIONS[:3])
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in files)
    assert any((a / p).read_bytes() != (c / p).read_bytes() for p in files)
    meta, _ = probe_video((a / files[0]).read_bytes())
    assert (meta.width, meta.height, meta.frames) == (32, 32, 6)
    with pytest.raises(VlkitError, match="frames must be"):
        generate_videos(tmp_path / "d", 3, frames=1000)


def test_missing_pyav_is_one_clear_line(monkeypatch):
    import sys

    from vlkit.data.ingest_videos import check_video
    from vlkit.data.images import ImageProblem

    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImageProblem, match=r"pip install 'vlkit\[video\]'"):
        check_video(b"\x00" * 10)


def test_data_synth_video_cli_and_info(tmp_path):
    from vlkit.data.store import dataset_info

    from .conftest import run_cli

    out = run_cli("data", "synth", "--kind", "video", "--n", "8", "--frames", "6", "--image-size", "32",
                  "--layout", "folders", "--out", tmp_path / "s")
    assert out.returncode == 0, out.stderr
    info = dataset_info(tmp_path / "s" / "synth.lance")
    assert info["videos"] == info["rows"] == 8 and info["classes"] == list(ACTIONS)
    assert info["images_per_class"] == dict.fromkeys(ACTIONS, 1)
