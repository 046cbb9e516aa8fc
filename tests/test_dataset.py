"""The Lance-backed torch dataset: batched reads, per-epoch captions, and 2 ranks x 2 workers sharding."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import lance
import numpy as np
import pytest
import torch
from PIL import Image

from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.decode import max_pixels, set_max_pixels
from vlkit.data.ingest import ingest
from vlkit.data.text import build_word_tokenizer
from vlkit.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
from vlkit.data.rows import RowError
from vlkit.errors import DataError

from .conftest import COCO


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    out = tmp_path_factory.mktemp("coco") / "coco.lance"
    ingest([COCO / "captions.json"], out, val_fraction=0.0, test_fraction=0.0, progress=False)
    return out


def test_batch_contents_match_the_source(coco):
    ds = LanceImageTextDataset(coco, "train", ImageTransform(32, draft=False), captions="first")
    batch = ds.__getitems__([3, 0, 5])
    table = lance.dataset(str(coco)).take(ds.offsets[:6], columns=["id", "captions"]).to_pylist()
    assert batch["id"] == [table[3]["id"], table[0]["id"], table[5]["id"]]
    assert batch["text"] == [table[i]["captions"][0] for i in (3, 0, 5)]
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].dtype == torch.float32
    # reference: decode with Pillow, resize shorter side, centre crop, normalise by hand
    img = Image.open(COCO / "images" / table[0]["id"]).convert("RGB")
    w, h = img.size
    size = (32, int(32 * h / w)) if w <= h else (int(32 * w / h), 32)  # long side truncated, as torchvision
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = round((img.width - 32) / 2), round((img.height - 32) / 2)
    ref = np.asarray(img.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255
    ref = (ref - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    got = batch["image"][1].permute(1, 2, 0).numpy()
    assert np.abs(got - ref).max() < 1e-5
    # draft-mode decoding (the default) reads a reduced-scale JPEG: close to, not equal to, the full decode
    drafted = LanceImageTextDataset(coco, "train", ImageTransform(32), captions="first").__getitems__([0])
    assert np.abs(drafted["image"][0].permute(1, 2, 0).numpy() - ref).mean() < 0.15


def test_one_take_and_one_blob_read_per_batch(coco, monkeypatch):
    ds = LanceImageTextDataset(coco, "train", ImageTransform(16), captions="first")
    calls = {"take": 0, "read_blobs": 0}
    handle = ds._dataset()
    for name in calls:
        original = getattr(handle, name)

        def counted(*a, _name=name, _orig=original, **k):
            calls[_name] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(handle, name, counted)
    ds.__getitems__(list(range(20)))
    assert calls == {"take": 1, "read_blobs": 1}


def test_random_caption_is_fixed_per_epoch_and_changes_across_epochs(coco):
    ds = LanceImageTextDataset(coco, "train", ImageTransform(16, train=True), captions="random", seed=3)
    idx = list(range(len(ds)))
    first = ds.__getitems__(idx)
    again = ds.__getitems__(idx)
    assert first["text"] == again["text"] and torch.equal(first["image"], again["image"])
    ds.set_epoch(1)
    other = ds.__getitems__(idx)
    assert sum(a != b for a, b in zip(first["text"], other["text"])) > len(idx) // 2
    table = lance.dataset(str(coco)).take(ds.offsets, columns=["captions"]).to_pylist()
    assert all(t in row["captions"] for t, row in zip(other["text"], table))


def test_all_captions_with_image_index_and_tokens(coco):
    tok = build_word_tokenizer(["a man riding a horse", "a plane"], max_length=12)
    ds = LanceImageTextDataset(coco, "train", ImageTransform(16), tokenizer=tok, captions="all")
    batch = ds.__getitems__([0, 1])
    table = lance.dataset(str(coco)).take(ds.offsets[:2], columns=["captions"]).to_pylist()
    assert batch["text"] == table[0]["captions"] + table[1]["captions"]
    assert batch["caption_image"].tolist() == [0] * len(table[0]["captions"]) + [1] * len(table[1]["captions"])
    assert batch["input_ids"].shape[0] == len(batch["text"]) and batch["input_ids"].shape[1] <= 12


def test_missing_split_and_column_are_clear_errors(coco):
    with pytest.raises(DataError, match="no rows in split 'test'"):
        LanceImageTextDataset(coco, "test")
    with pytest.raises(DataError, match="no column"):
        LanceImageTextDataset(coco, "train", columns=["nope"])


WORKER = r"""
import json, sys
from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.decode import max_pixels, set_max_pixels
from vlkit.data.sampler import DistributedEpochSampler
from vlkit.data.transforms import ImageTransform

path, rank, world, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if __name__ == "__main__":
    ds = LanceImageTextDataset(path, "train", ImageTransform(16, train=True), captions="random")
    sampler = DistributedEpochSampler(len(ds), num_replicas=world, rank=rank, seed=7)
    loader = make_loader(ds, batch_size=4, sampler=sampler, num_workers=2, multiprocessing_context="spawn")
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        epochs.append([b["id"] for b in loader])
    json.dump(epochs, open(out, "w"))
"""


def test_two_ranks_two_spawned_workers_read_every_row_once(coco, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(coco), str(r), "2", str(tmp_path / f"r{r}.json")])
        for r in range(2)
    ]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    ranks = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    all_ids = sorted(lance.dataset(str(coco)).to_table(columns=["id"]).column("id").to_pylist())
    assert len(all_ids) == 76
    for epoch in range(2):
        batches = [ranks[r][epoch] for r in range(2)]
        assert len(batches[0]) == len(batches[1]) == 10  # 38 rows per rank in batches of 4
        seen = [i for r in range(2) for b in batches[r] for i in b]
        assert sorted(seen) == all_ids  # every row exactly once
    order0 = [i for b in ranks[0][0] for i in b]
    order1 = [i for b in ranks[0][1] for i in b]
    assert order0 != order1  # a new shuffle every epoch


def test_persistent_workers_follow_set_epoch(coco):
    ds = LanceImageTextDataset(coco, "train", ImageTransform(16, train=True), captions="random", seed=5)
    loader = make_loader(ds, batch_size=16, num_workers=1)
    assert loader.persistent_workers and loader.multiprocessing_context.get_start_method() != "fork"
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        via_worker = [t for b in loader for t in b["text"]]
        direct = ds.__getitems__(list(range(len(ds))))["text"]
        assert via_worker == direct
    assert len(loader) == -(-len(ds) // 16)


def test_fork_is_refused(coco):
    with pytest.raises(DataError, match="forkserver or spawn"):
        make_loader(LanceImageTextDataset(coco, "train"), 4, num_workers=1, multiprocessing_context="fork")


def test_bad_image_names_its_row_and_workers_get_the_pixel_limit(coco):
    ds = LanceImageTextDataset(coco, "train", ImageTransform(16), captions="first")
    first = lance.dataset(str(coco)).take(ds.offsets[:1], columns=["id", "width", "height"]).to_pylist()[0]
    try:
        set_max_pixels(first["width"] * first["height"] - 1)
        with pytest.raises(RowError, match=rf"^{coco} row id '{first['id']}': image of "
                                           rf"{first['width']}x{first['height']} .* over the pixel limit"):
            ds.__getitems__([0])
        state = pickle.dumps(ds)  # what a DataLoader worker receives
        set_max_pixels(None)
        pickle.loads(state)  # in a worker, unpickling sets the limit the parent had
        assert max_pixels() == first["width"] * first["height"] - 1
    finally:
        set_max_pixels(None)
