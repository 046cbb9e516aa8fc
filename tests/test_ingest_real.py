"""Ingest of the real data beside the checkout: counts, bytes, indexes, fragments, splits."""

from __future__ import annotations

import collections

import lance
import pytest

from vlkit.data.ingest import hash_split, ingest
from vlkit.data.store import dataset_info

from .conftest import CIFAR, COCO, FLICKR, needs_shared


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    out = tmp_path_factory.mktemp("flickr") / "flickr.lance"
    report = ingest([FLICKR / "captions.txt"], out, images_root=FLICKR / "images", progress=False)
    return out, report


@needs_shared
def test_flickr_counts(flickr):
    out, report = flickr
    info = dataset_info(out)
    assert (info["images"], info["captions"]) == (1000, 5000)
    assert report.problems == [] and report.rows_added == 1000
    assert sum(info["splits"].values()) == 1000 and set(info["splits"]) == {"train", "val", "test"}
    assert set(info["indices"]) == {"id_idx", "split_idx"}


@needs_shared
def test_flickr_fragments_are_equal(flickr):
    ds = lance.dataset(str(flickr[0]))
    sizes = [f.count_rows() for f in ds.get_fragments()]
    assert len(sizes) >= 8
    assert len(set(sizes[:-1])) == 1 and sizes[-1] <= sizes[0]


@needs_shared
def test_flickr_bytes_round_trip_and_columns(flickr):
    ds = lance.dataset(str(flickr[0]))
    offsets = list(range(0, 1000, 37))
    rows = ds.take(offsets, columns=["id", "width", "height", "format", "source", "split", "captions"]).to_pylist()
    blobs = ds.read_blobs("image", indices=offsets, preserve_order=True)
    for row, (_, data) in zip(rows, blobs):
        assert data == (FLICKR / "images" / row["id"]).read_bytes()
        assert row["format"] == "JPEG" and row["width"] > 0 and row["height"] > 0
        assert row["split"] == hash_split(row["id"], 0.1, 0.1)
        assert len(row["captions"]) == 5


@needs_shared
def test_flickr_captions_match_csv(flickr):
    import csv

    expected = collections.defaultdict(list)
    with open(FLICKR / "captions.txt", newline="") as fh:
        for row in csv.DictReader(fh):
            expected[row["image"]].append(row["caption"].strip())
    table = lance.dataset(str(flickr[0])).to_table(columns=["id", "captions"]).to_pylist()
    assert {r["id"]: r["captions"] for r in table} == dict(expected)


def test_coco_with_vqa(tmp_path):
    out = tmp_path / "coco.lance"
    ingest([COCO / "captions.json", COCO / "vqa_questions.json"], out, progress=False)
    info = dataset_info(out)
    assert (info["images"], info["captions"], info["questions"]) == (76, 380, 26)
    ds = lance.dataset(str(out))
    rows = ds.to_table(columns=["id", "questions", "answers", "coco_id"]).to_pylist()
    for row in rows:
        assert len(row["questions"]) == len(row["answers"])
        assert row["id"] == f"{row['coco_id']:012d}.jpg"
    blobs = ds.read_blobs("image", indices=list(range(76)), preserve_order=True)
    for row, (_, data) in zip(rows, blobs):
        assert data == (COCO / "images" / row["id"]).read_bytes()


@needs_shared
def test_cifar_class_folders(tmp_path):
    out = tmp_path / "cifar.lance"
    ingest([CIFAR], out, progress=False)
    info = dataset_info(out)
    assert info["images"] == 10000
    assert info["classes"] == sorted(p.name for p in CIFAR.iterdir())
    assert set(info["images_per_class"].values()) == {1000}
    table = lance.dataset(str(out)).to_table(columns=["label", "class_name"]).to_pylist()
    assert all(info["classes"][r["label"]] == r["class_name"] for r in table)
