"""Data loading benchmark on Flickr8k-1k: ingest rows/s, and loader images/s for the vlkit Lance pipeline
next to a plain folder-of-JPEG loader that uses the same decode and transform code.

Run: ``python bench/data_loading.py [--data ../shared/data/flickr8k-1k] [--repeats 2]``
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.ingest import ingest
from vlkit.data.transforms import ImageTransform

ROOT = Path(__file__).resolve().parent.parent


class FolderJpegDataset(torch.utils.data.Dataset):
    """The baseline: one JPEG file read per item from a folder, default collation."""

    def __init__(self, files: list[Path], transform: ImageTransform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.files[i].read_bytes())  # [3, S, S] uint8


def folder_loader(files, transform, batch_size, workers):
    def collate(items):
        return transform.normalize(torch.stack(items))  # [batch, 3, S, S] float

    return torch.utils.data.DataLoader(
        FolderJpegDataset(files, transform), batch_size=batch_size, num_workers=workers, collate_fn=collate
    )


def images_per_second(loader, key: str | None, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        start, n = time.perf_counter(), 0
        for batch in loader:
            images = batch[key] if key else batch
            n += images.shape[0]
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k-1k"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    data = Path(args.data)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flickr.lance"
        start = time.perf_counter()
        report = ingest([data / "captions.txt"], out, images_root=data / "images", progress=False)
        ingest_rps = report.rows_added / (time.perf_counter() - start)

        ids = LanceImageTextDataset(out, None, captions="none").offsets
        import lance

        names = lance.dataset(str(out)).take(ids, columns=["id"]).column("id").to_pylist()
        files = [data / "images" / n for n in names]

        rows = []
        for draft in (True, False):
            transform = ImageTransform(args.image_size, draft=draft)
            for workers in (0, 2):
                ds = LanceImageTextDataset(out, None, transform, captions="none")
                lance_ips = images_per_second(make_loader(ds, args.batch_size, num_workers=workers), "image",
                                              args.repeats)
                folder_ips = images_per_second(folder_loader(files, transform, args.batch_size, workers), None,
                                               args.repeats)
                rows.append({"draft": draft, "workers": workers, "lance_ips": round(lance_ips, 1),
                             "folder_ips": round(folder_ips, 1), "ratio": round(lance_ips / folder_ips, 3)})

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}"
    print(f"Flickr8k-1k ({len(files)} images), batch {args.batch_size}, {args.image_size}px; {machine}\n")
    print(f"ingest: {ingest_rps:.0f} rows/s\n")
    print("| decode | workers | vlkit Lance (img/s) | folder of JPEG (img/s) | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        mode = "draft" if r["draft"] else "full"
        print(f"| {mode} | {r['workers']} | {r['lance_ips']:.0f} | {r['folder_ips']:.0f} | {r['ratio']:.2f}x |")
    gains = {w: next(r for r in rows if r["draft"] and r["workers"] == w)["lance_ips"]
             / next(r for r in rows if not r["draft"] and r["workers"] == w)["lance_ips"] for w in (0, 2)}
    print("\ndraft-mode gain (Lance, draft / full): " + ", ".join(f"{w} workers {g:.2f}x" for w, g in gains.items()))
    print(json.dumps({"bench": "data_loading", "machine": machine, "ingest_rows_per_s": round(ingest_rps, 1),
                      "loader": rows, "draft_gain": {str(k): round(v, 3) for k, v in gains.items()}}))


if __name__ == "__main__":
    main()
