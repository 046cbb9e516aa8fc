"""Video benchmark: clips/s of the video loader, and the step time of divided against joint space-time attention.

``loader``: videos of pictures panned across (Flickr8k photos when ``../shared/data/flickr8k-1k`` is there, else
synthetic shapes), 320x240 at 30 frames/s, encoded with libx264 at the keyframe intervals of ``--gops``, ingested
into Lance; then clips of ``--frames`` frames (TSN segments, training sampling), resized and cropped to
``--size``, with 0 and 2 loader workers, for :class:`~vlkit.data.video_dataset.LanceVideoDataset` (seeks to the
keyframe before each needed frame and decodes forward) against the same dataset decoding every frame of each
video from the start and picking the same frames: converting only those to RGB, or every frame (as a reader that
returns the whole video as an array does). Each case reads the dataset once to warm up, then ``--repeats`` times
timed; the contenders share the machine's load, so compare the ratios.

``attention``: the training-step time of divided against joint attention at 8 and 16 frames, from
``bench/_video_attention.py`` (its ``attention(...)``).

Run: ``python bench/video.py [--parts loader attention] [--videos 16] [--seconds 10] [--gops 30 250]
[--frames 8] [--size 224] [--workers 0 2] [--repeats 2]``. Prints markdown tables and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_description  # noqa: E402

from vlkit.data.dataset import make_loader  # noqa: E402
from vlkit.data.ingest import ingest  # noqa: E402
from vlkit.data.transforms import ImageTransform  # noqa: E402
from vlkit.data.video_dataset import LanceVideoDataset  # noqa: E402

FLICKR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k-1k" / "images"
WIDTH, HEIGHT, FPS = 320, 240, 30


class DecodeEveryFrame(LanceVideoDataset):
    """A baseline: the same dataset, but every frame of a video is decoded (from the start, no seek) and only the
    sampled ones are converted to RGB."""

    to_rgb_all = False

    def _decode(self, data: bytes, indices: list[int], index: tuple[list[int], list[int]]) -> list[Any]:
        import io

        import av

        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if self.to_rgb_all:
                frames = [frame.to_image() for frame in container.decode(stream)]  # every frame, in order
                return [frames[i] for i in indices]
            frames = list(container.decode(stream))
        return [frames[i].to_image() for i in indices]


class DecodeEveryFrameRGB(DecodeEveryFrame):
    """The other baseline: every frame decoded and converted to RGB, then the sampled ones picked (as a reader
    that returns a whole video as an array does)."""

    to_rgb_all = True


def _pictures(n: int) -> list[Any]:
    """``n`` pictures to pan across: Flickr8k photos, else synthetic shapes."""
    from PIL import Image

    if FLICKR.is_dir():
        files = sorted(FLICKR.glob("*.jpg"))[:n]
        return [Image.open(f).convert("RGB").resize((WIDTH * 3 // 2, HEIGHT * 3 // 2)) for f in files]
    from vlkit.data.synth import _make_example

    return [_make_example(0, i, HEIGHT * 3 // 2)[0].resize((WIDTH * 3 // 2, HEIGHT * 3 // 2)) for i in range(n)]


def _encode(picture: Any, frames: int, gop: int) -> bytes:
    """A pan from the top-left to the bottom-right of ``picture``, ``frames`` frames of WIDTH x HEIGHT."""
    import io

    import av

    buf = io.BytesIO()
    container = av.open(buf, mode="w", format="mp4")
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    stream.codec_context.gop_size = gop
    stream.codec_context.options = {"preset": "fast", "crf": "23", "keyint_min": str(gop), "sc_threshold": "0"}
    dx, dy = picture.width - WIDTH, picture.height - HEIGHT
    for t in range(frames):
        u = t / max(1, frames - 1)
        x, y = round(dx * u), round(dy * u)
        frame = av.VideoFrame.from_image(picture.crop((x, y, x + WIDTH, y + HEIGHT)))
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return buf.getvalue()


def _make_dataset(root: Path, videos: int, seconds: float, gop: int) -> tuple[Path, float]:
    """The benchmark's videos ingested into Lance, and the ingest's videos/s (each video decoded once in full)."""
    folder = root / f"gop{gop}"
    (folder / "clips" / "pan").mkdir(parents=True)
    for i, picture in enumerate(_pictures(videos)):
        (folder / "clips" / "pan" / f"{i:04d}.mp4").write_bytes(_encode(picture, round(seconds * FPS), gop))
    start = time.perf_counter()
    ingest([folder / "clips"], folder / "v.lance", split="train", progress=False)
    return folder / "v.lance", videos / (time.perf_counter() - start)


def _clips_per_s(ds: LanceVideoDataset, workers: int, batch: int, repeats: int) -> float:
    loader = make_loader(ds, batch_size=batch, num_workers=workers, persistent_workers=True)
    for _ in loader:  # warm-up: workers started, files cached
        pass
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        clips = sum(b["video"].shape[0] for b in loader)
        rates.append(clips / (time.perf_counter() - start))
    return statistics.median(rates)


def loader(videos: int = 16, seconds: float = 10.0, gops: list[int] | None = None, frames: int = 8,
           size: int = 224, workers: list[int] | None = None, batch: int = 4,
           repeats: int = 2) -> tuple[list[tuple[str, float, str]], dict[str, Any]]:
    """Clips/s of the video loader (seeking) against decoding every frame, per keyframe interval and workers.

    Returns:
        Table rows ``(case, clips/s or ratio, note)`` and ``{"config", "results": [{"gop", "workers",
        "seek_cps", "every_cps", "every_rgb_cps", "seek_over_every", "seek_over_every_rgb"}]}``.
    """
    gops, workers = gops or [30, 250], workers if workers is not None else [0, 2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers (and bench/data_loading.py): tiny tensor ops on one thread
    transform = ImageTransform(size, train=True)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for gop in gops:
            path, ingest_vps = _make_dataset(Path(tmp), videos, seconds, gop)
            rows.append((f"ingest (keyframe every {gop} frames)", ingest_vps, "videos/s"))
            for w in workers:
                cps = {name: _clips_per_s(cls(path, "train", transform, num_frames=frames), w, batch, repeats)
                       for name, cls in (("seek", LanceVideoDataset), ("every", DecodeEveryFrame),
                                         ("every_rgb", DecodeEveryFrameRGB))}
                results.append({"gop": gop, "workers": w, "ingest_videos_per_s": round(ingest_vps, 2),
                                **{f"{k}_cps": round(v, 2) for k, v in cps.items()},
                                "seek_over_every": round(cps["seek"] / cps["every"], 2),
                                "seek_over_every_rgb": round(cps["seek"] / cps["every_rgb"], 2)})
                note = f"keyframe every {gop} frames, {w} workers"
                rows += [(f"seek, decode the {frames} frames' GOPs ({note})", cps["seek"], "clips/s"),
                         (f"decode every frame, convert {frames} ({note})", cps["every"], "clips/s"),
                         (f"decode and convert every frame ({note})", cps["every_rgb"], "clips/s"),
                         (f"seek / decode every frame ({note})", cps["seek"] / cps["every"], "ratio"),
                         (f"seek / decode and convert every frame ({note})", cps["seek"] / cps["every_rgb"], "ratio")]
    torch.set_num_threads(threads)
    config = {"videos": videos, "seconds": seconds, "fps": FPS, "resolution": f"{WIDTH}x{HEIGHT}", "frames": frames,
              "size": size, "batch": batch, "repeats": repeats, "torch_threads": 1,
              "content": "flickr8k pans" if FLICKR.is_dir() else "synthetic shapes pans"}
    return rows, {"config": config, "results": results}


def attention_part(args: argparse.Namespace) -> tuple[list[tuple], dict[str, Any]]:
    """The attention part: ``bench/_video_attention.py``'s ``attention(...)`` (divided against joint)."""
    from _video_attention import attention

    return attention(args.attention_frames, repeats=args.repeats)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["loader", "attention"], choices=("loader", "attention"))
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--gops", nargs="+", type=int, default=[30, 250])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--attention-frames", nargs="+", type=int, default=[8, 16])
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"bench": "video", "machine": machine_description(torch.device("cpu")),
                           "threads": torch.get_num_threads()}
    print(f"machine: {out['machine']}, {out['threads']} torch threads")
    if "loader" in args.parts:
        rows, out["loader"] = loader(args.videos, args.seconds, args.gops, args.frames, args.size, args.workers,
                                     args.batch, args.repeats)
        print("| case | clips/s (or ratio) | unit |")
        print("|---|---|---|")
        for case, value, unit in rows:
            print(f"| {case} | {value:.2f} | {unit} |")
    if "attention" in args.parts:
        rows, out["attention"] = attention_part(args)
        print("| case | forward GFLOPs/clip (or ratio) | ms/step (or ratio) | note |")
        print("|---|---|---|---|")
        for case, gflops, ms, note in rows:
            print(f"| {case} | {'-' if gflops is None else f'{gflops:.2f}'} | {'-' if ms is None else f'{ms:.1f}'} "
                  f"| {note} |")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
