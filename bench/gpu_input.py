"""Input pipeline throughput: the Lance loader on CPU workers, and JPEG decoding on the GPU.

Images/s the Lance loader delivers (decode, resize to 224, normalise) on the CPU with 0, 4, 8 and all worker
processes, and, where CUDA and torchvision are present, the same work with the JPEG decoding, crop/resize and
normalisation on the GPU (nvJPEG through ``torchvision.io.decode_jpeg``).

The GPU path reads the encoded bytes with the same loader (``transform=None``), decodes each batch on the GPU,
cuts the centre crop the CPU path uses (``eval_crop_box``), resizes it bicubically with antialiasing and
normalises; non-JPEG images are decoded on the CPU and counted. It is timed twice: as a pipeline (Lance reads
included, with the GPU utilisation sampled through NVML or nvidia-smi) and decoding only (bytes already in
memory). ``--limit`` images make one pass; a smaller dataset is cycled.

Run (GPU machine): ``python bench/gpu_input.py [--data ../shared/data/flickr8k-1k] [--workers 0 4 8 all]``
Smoke (CPU): ``python bench/gpu_input.py --workers 0 2 --limit 256``
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import GpuUtilSampler, Timer, machine_description  # noqa: E402
from vlkit.data.dataset import LanceImageTextDataset, make_loader  # noqa: E402
from vlkit.data.ingest import ingest  # noqa: E402
from vlkit.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, eval_crop_box, normalize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
JPEG_MAGIC = b"\xff\xd8"


def cpu_count() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare_dataset(data: Path, work: Path) -> Path:
    """``data`` itself when it is a Lance dataset, else ``data`` ingested into ``work``.

    A folder with ``captions.txt`` and ``images/`` (the Flickr8k layout) is ingested from the captions file with
    images read from ``images/``; anything else is handed to :func:`vlkit.data.ingest.ingest` as it is.
    """
    if data.suffix == ".lance" or (data / "_versions").is_dir():
        return data
    out = work / "input.lance"
    if (data / "captions.txt").is_file() and (data / "images").is_dir():
        ingest([data / "captions.txt"], out, images_root=data / "images", progress=False)
    else:
        ingest([data], out, progress=False)
    return out


def cycled(n: int, size: int) -> list[int]:
    """``n`` dataset positions, cycling through a dataset of ``size`` rows."""
    return [i % size for i in range(n)]


def cpu_images_per_s(path: Path, workers: int, batch_size: int, images: int, repeats: int,
                     transform: ImageTransform) -> float:
    """Best images/s of ``repeats`` passes of the Lance loader, after one warm-up pass that starts the workers."""
    ds = LanceImageTextDataset(path, None, transform, captions="none")
    loader = make_loader(ds, batch_size, sampler=cycled(images, len(ds)), num_workers=workers)
    best = 0.0
    for attempt in range(repeats + 1):
        with Timer(torch.device("cpu")) as timer:
            n = sum(batch["image"].shape[0] for batch in loader)
        if attempt:
            best = max(best, n / timer.seconds)
    del loader
    return best


def crop_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation centre crop of one ``[3, H, W]`` uint8 image (the box the CPU transform uses, rounded to
    whole pixels), resized bicubically with antialiasing to ``[3, S, S]`` float in 0..255, on its device."""
    _, height, width = image.shape
    left, top, right, bottom = (round(v) for v in eval_crop_box(width, height, size))
    crop = image[:, top:bottom, left:right][None].float()  # [1, 3, h, w]
    out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp_(0, 255)  # [3, S, S]


class GpuDecoder:
    """Encoded images to a normalised ``[batch, 3, S, S]`` float batch on the GPU.

    Args:
        device: the CUDA device.
        image_size: output side.
        mean, std: normalisation, on the [0, 1] scale.
        decode_jpeg, decode_image: torchvision's functions (default); tests pass stand-ins.
    """

    def __init__(self, device: torch.device, image_size: int, mean=CLIP_MEAN, std=CLIP_STD,
                 decode_jpeg: Callable | None = None, decode_image: Callable | None = None):
        if decode_jpeg is None or decode_image is None:
            from torchvision.io import decode_image, decode_jpeg
        self.device, self.size, self.mean, self.std = device, image_size, mean, std
        self._decode_jpeg, self._decode_image = decode_jpeg, decode_image
        self.cpu_decoded = self.decoded = 0

    def decode(self, blobs: list[bytes]) -> list[torch.Tensor]:
        """uint8 ``[3, H, W]`` RGB images on the device: JPEGs in one batched nvJPEG call, others on the CPU."""
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        jpeg = [i for i, b in enumerate(blobs) if b[:2] == JPEG_MAGIC]
        out: list[torch.Tensor | None] = [None] * len(blobs)
        if jpeg:
            decoded = self._decode_jpeg([data[i] for i in jpeg], mode=_rgb(), device=self.device)
            for i, image in zip(jpeg, decoded):
                out[i] = image
        for i in (i for i in range(len(blobs)) if out[i] is None):
            out[i] = self._decode_image(data[i], mode=_rgb()).to(self.device, non_blocking=True)
            self.cpu_decoded += 1
        self.decoded += len(blobs)
        return out  # type: ignore[return-value]

    def __call__(self, blobs: list[bytes]) -> torch.Tensor:
        images = torch.stack([crop_resize(im, self.size) for im in self.decode(blobs)])  # [batch, 3, S, S]
        return normalize(images, self.mean, self.std)


def _rgb() -> Any:
    """torchvision's ``ImageReadMode.RGB`` where torchvision imports, else the string ``RGB``."""
    try:
        from torchvision.io import ImageReadMode
    except Exception:  # noqa: BLE001 - stand-in decoders in tests
        return "RGB"
    return ImageReadMode.RGB


def gpu_figures(path: Path, device: torch.device, args: argparse.Namespace,
                decoder: GpuDecoder | None = None) -> dict[str, Any]:
    """GPU decoding images/s as a pipeline (Lance reads included) and decoding only, and the GPU utilisation.

    Args:
        path: the Lance dataset.
        device: the CUDA device.
        args: ``limit``, ``batch_size``, ``gpu_workers``, ``repeats``, ``image_size``.
        decoder: the decoder (default: :class:`GpuDecoder` on ``device``).
    """
    decoder = decoder or GpuDecoder(device, args.image_size)
    ds = LanceImageTextDataset(path, None, None, captions="none")
    loader = make_loader(ds, args.batch_size, sampler=cycled(args.limit, len(ds)), num_workers=args.gpu_workers)
    held = [batch["image"] for batch in loader]  # warm-up: starts workers and nvJPEG; keeps the bytes
    for blobs in held[:2]:
        decoder(blobs)
    best, util = 0.0, None
    for _ in range(args.repeats):
        with GpuUtilSampler(device) as sampler, Timer(device) as timer:
            n = sum(decoder(batch["image"]).shape[0] for batch in loader)
        if n / timer.seconds > best:
            best, util = n / timer.seconds, sampler
    del loader
    decode_best = 0.0
    for _ in range(args.repeats):
        with Timer(device) as timer:
            n = sum(decoder(blobs).shape[0] for blobs in held)
        decode_best = max(decode_best, n / timer.seconds)
    return {"decoder": "torchvision.io.decode_jpeg (nvJPEG)", "workers": args.gpu_workers,
            "pipeline_images_per_s": round(best, 1), "decode_only_images_per_s": round(decode_best, 1),
            "gpu_util_pct": util.mean if util else None, "util_source": util.source if util else None,
            "cpu_decoded_share": round(decoder.cpu_decoded / max(1, decoder.decoded), 3)}


def gpu_unavailable_reason(device: torch.device) -> str | None:
    """Why the GPU part cannot run here, or None when it can."""
    if device.type != "cuda":
        return "skipped: no CUDA"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken torchvision binary
        return f"skipped: torchvision.io not importable ({type(exc).__name__}: {exc})"
    return None


def parse_workers(values: list[str]) -> list[int]:
    """``0 4 8 all`` -> sorted distinct counts, ``all`` being this process's CPU cores."""
    out = set()
    for v in values:
        out.add(cpu_count() if v == "all" else int(v))
    if any(w < 0 for w in out):
        raise ValueError("worker counts must be >= 0")
    return sorted(out)


def main(argv: list[str] | None = None) -> None:
    """Measure, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k-1k"),
                        help="a Lance dataset, or a folder to ingest (captions.txt + images/, or any ingest source)")
    parser.add_argument("--workers", nargs="+", default=["0", "4", "8", "all"], help="CPU loader worker counts")
    parser.add_argument("--limit", type=int, default=2048, help="images per pass (a smaller dataset is cycled)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per setting (best is kept)")
    parser.add_argument("--gpu-workers", type=int, default=4, help="loader workers reading bytes for the GPU path")
    parser.add_argument("--no-draft", dest="draft", action="store_false", help="decode JPEGs full size on the CPU")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    args = parser.parse_args(argv)
    workers = parse_workers(args.workers)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    transform = ImageTransform(args.image_size, draft=args.draft)

    with tempfile.TemporaryDirectory() as tmp:
        path = prepare_dataset(Path(args.data), Path(tmp))
        rows = [{"workers": w, "images_per_s": round(cpu_images_per_s(path, w, args.batch_size, args.limit,
                                                                      args.repeats, transform), 1)}
                for w in workers]
        gpu_note = gpu_unavailable_reason(device)
        gpu = None if gpu_note else gpu_figures(path, device, args)

    machine = machine_description(device)
    print(f"{Path(args.data).name}: {args.limit} images per pass, batch {args.batch_size}, {args.image_size} px, "
          f"{'draft' if args.draft else 'full'} JPEG decode on the CPU; {machine}\n")
    print("| pipeline | workers | images/s |")
    print("|---|---|---|")
    for r in rows:
        print(f"| CPU: Lance loader, decode + resize + normalise | {r['workers']} | {r['images_per_s']:.0f} |")
    if gpu:
        print(f"| GPU: Lance bytes + nvJPEG + resize + normalise | {gpu['workers']} "
              f"| {gpu['pipeline_images_per_s']:.0f} |")
        print(f"| GPU: nvJPEG + resize + normalise, bytes in memory | - | {gpu['decode_only_images_per_s']:.0f} |")
        util = gpu["gpu_util_pct"]
        shown = "not available" if util is None else f"{util:.0f}% ({gpu['util_source']})"
        print(f"\nGPU utilisation during the pipeline pass: {shown}")
        if gpu["cpu_decoded_share"]:
            print(f"non-JPEG images decoded on the CPU: {gpu['cpu_decoded_share']:.0%}")
    else:
        print(f"\nGPU decoding: {gpu_note}")
    print(json.dumps({"bench": "gpu_input", "machine": machine, "data": Path(args.data).name, "images": args.limit,
                      "batch_size": args.batch_size, "image_size": args.image_size, "draft": args.draft,
                      "cpu": rows, "gpu": gpu, "gpu_note": gpu_note}))


if __name__ == "__main__":
    main()
