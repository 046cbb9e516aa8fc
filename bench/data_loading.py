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
import statistics
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


class NormalizeCollate:
    """Stack uint8 images and normalise them, as the Lance dataset does for its batches."""

    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def __call__(self, items: list[torch.Tensor]) -> torch.Tensor:
        return self.transform.normalize(torch.stack(items))  # [batch, 3, S, S] float


def folder_loader(files, transform, batch_size, workers):
    return torch.utils.data.DataLoader(
        FolderJpegDataset(files, transform), batch_size=batch_size, num_workers=workers,
        collate_fn=NormalizeCollate(transform), persistent_workers=workers > 0,
        multiprocessing_context="forkserver" if workers else None,
    )


def _pass(loader, key: str | None) -> float:
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += (batch[key] if key else batch).shape[0]
    return n / (time.perf_counter() - start)


def compare(lance_loader, folder_loader_, repeats: int) -> tuple[float, float, float]:
    """Images/s of both loaders over ``repeats`` alternating passes, after one warm-up pass each (which
    also starts persistent workers). Returns the best of each and the median of the paired ratios: on a
    shared 2-core machine single passes vary by +-15%, and alternating keeps drift from favouring one."""
    _pass(lance_loader, "image"), _pass(folder_loader_, None)
    pairs = [(_pass(lance_loader, "image"), _pass(folder_loader_, None)) for _ in range(repeats)]
    return max(p[0] for p in pairs), max(p[1] for p in pairs), statistics.median(a / b for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k-1k"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 128], help="output sides")
    parser.add_argument("--repeats", type=int, default=5)
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
        for size in args.sizes:
            for draft in (True, False):
                transform = ImageTransform(size, draft=draft)
                for workers in (0, 2):
                    ds = LanceImageTextDataset(out, None, transform, captions="none")
                    lance_ips, folder_ips, ratio = compare(
                        make_loader(ds, args.batch_size, num_workers=workers),
                        folder_loader(files, transform, args.batch_size, workers), args.repeats)
                    rows.append({"size": size, "draft": draft, "workers": workers,
                                 "lance_ips": round(lance_ips, 1), "folder_ips": round(folder_ips, 1),
                                 "ratio": round(ratio, 3)})

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}"
    print(f"Flickr8k-1k ({len(files)} images), batch {args.batch_size}; {machine}\n")
    print(f"ingest: {ingest_rps:.0f} rows/s\n")
    print("| size | decode | workers | vlkit Lance (img/s, best) | folder of JPEG (img/s, best) "
          "| Lance / folder (median of paired passes) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mode = "draft" if r["draft"] else "full"
        print(f"| {r['size']} | {mode} | {r['workers']} | {r['lance_ips']:.0f} | {r['folder_ips']:.0f} "
              f"| {r['ratio']:.2f}x |")
    gains = {}
    for size in args.sizes:
        for w in (0, 2):
            pick = {r["draft"]: r["lance_ips"] for r in rows if r["size"] == size and r["workers"] == w}
            gains[f"{size}px/{w}w"] = round(pick[True] / pick[False], 3)
    print("\ndraft-mode gain (Lance, draft / full decode): " + ", ".join(f"{k} {v:.2f}x" for k, v in gains.items()))
    print(json.dumps({"bench": "data_loading", "machine": machine, "ingest_rows_per_s": round(ingest_rps, 1),
                      "loader": rows, "draft_gain": gains}))

if __name__ == "__main__":
    main()
