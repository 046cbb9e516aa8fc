"""The WebDataset, Parquet and Hugging Face dataset readers: sources written here, ingested, read back."""

from __future__ import annotations

import io
import json
import tarfile

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlkit.data.ingest import hash_split, ingest
from vlkit.data.readers import detect_format
from vlkit.errors import DataError

from .conftest import jpeg_bytes, run_cli


def _png(color=(10, 200, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 12), color).save(buf, "PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _rows(out) -> dict[str, dict]:
    """id -> row (with its image bytes) of the dataset at ``out``."""
    ds = lance.dataset(str(out))
    rows = ds.to_table().drop_columns(["image"]).to_pylist()
    blobs = ds.read_blobs("image", indices=list(range(len(rows))), preserve_order=True)
    for row, (_, data) in zip(rows, blobs):
        row["image"] = data
    return {r["id"]: r for r in rows}


def _write_shards(root, n_shards=3, per_shard=4):
    """img2dataset's layout: key = shard number + index; .jpg + .txt + .json (some keys .txt or .json only)."""
    root.mkdir()
    expected = {}
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                image = jpeg_bytes((40 * i, 20 * s, 90)) if i % 2 else _png((40 * i, 20 * s, 9))
                ext = "jpg" if i % 2 else "png"
                caption = f"shape {s} {i}"
                _add(tar, f"{key}.{ext}", image)
                if i != 1:
                    _add(tar, f"{key}.txt", caption.encode())
                if i != 2:
                    meta = {"caption": caption, "url": f"http://x/{key}", "key": key, "status": "success"}
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
                expected[key] = (caption, image)
    return expected


def test_webdataset_shards_round_trip_and_append(tmp_path):
    expected = _write_shards(tmp_path / "shards")
    pattern = tmp_path / "shards" / "shard-{00000..00002}.tar"
    assert detect_format(pattern) == "webdataset"
    out = tmp_path / "wds.lance"
    report = ingest([pattern], out, progress=False, val_fraction=0.3, test_fraction=0.2)
    assert report.rows_added == 12 and not report.problems
    rows = _rows(out)
    assert set(rows) == set(expected)
    for key, (caption, image) in expected.items():
        assert rows[key]["captions"] == [caption]
        assert rows[key]["image"] == image
        assert rows[key]["split"] == hash_split(key, 0.3, 0.2)
        assert rows[key]["format"] == ("JPEG" if image[:2] == b"\xff\xd8" else "PNG")
    assert rows["000000000"]["url"] == "http://x/000000000" and rows["000000002"]["url"] is None
    assert rows["000010003"]["source"].endswith("shard-00001.tar/000010003.jpg")
    version = lance.dataset(str(out)).version
    again = ingest([pattern, tmp_path / "shards" / "shard-00001.tar"], out, progress=False)
    assert again.rows_added == 0 and again.rows_existing == 12
    assert lance.dataset(str(out)).version == version


def test_webdataset_bad_members_and_truncated_shard(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    good = jpeg_bytes((1, 2, 3))
    with tarfile.open(root / "a.tar", "w") as tar:
        _add(tar, "k1.jpg", good)
        _add(tar, "k1.txt", b"fine caption")
        _add(tar, "k2.txt", b"caption without image")
        _add(tar, "k3.jpg", good)
        _add(tar, "k3.txt", b"\xff\xfe not utf-8")
        _add(tar, "k4.jpg", b"not an image at all")
        _add(tar, "k4.txt", b"broken image")
        _add(tar, "../k5.jpg", jpeg_bytes((9, 9, 9)))  # a name only: never a path followed
        _add(tar, "../k5.txt", b"dotted name")
        _add(tar, "k6.jpg", jpeg_bytes(size=(300, 300)))
        _add(tar, "k6.txt", b"too big for the limit")
        _add(tar, "k1.json", b"{}")  # a later member of a known key is grouped with it
    # a second shard, cut inside its third key's image: the first two keys are kept
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            _add(tar, f"t{i}.jpg", jpeg_bytes((i, 50, 50)))
            _add(tar, f"t{i}.txt", f"cut {i}".encode())
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "t2.jpg").offset_data + 100
    (root / "b.tar").write_bytes(raw[:cut])
    out = tmp_path / "bad.lance"
    limit = len(jpeg_bytes(size=(300, 300))) - 1
    with pytest.raises(DataError, match="--strict: 5 problems found, nothing written"):
        ingest([root / "{a,b}.tar"], out, progress=False, max_image_bytes=limit, strict=True)
    assert not out.exists()
    report = ingest([root / "{a,b}.tar"], out, progress=False, max_image_bytes=limit)
    assert sorted(_rows(out)) == ["../k5", "k1", "t0", "t1"]
    text = "\n".join(map(str, report.problems))
    assert f"{root / 'a.tar'}:k2: no image member" in text
    assert f"{root / 'a.tar'}:k3: caption: k3.txt: undecodable text" in text
    assert "a.tar/k4.jpg: not an image" in text
    assert "a.tar/k6.jpg: image member is larger than the limit" in text
    assert f"{root / 'b.tar'}: truncated or damaged tar" in text and "key t2 cut short and skipped" in text
    assert len(report.problems) == 5, text


def _parquet(path, layout: str, n=5):
    images = [jpeg_bytes((30 * i, 10, 10)) for i in range(n)]
    captions = [f"caption {i}" for i in range(n)]
    if layout == "img2dataset":
        table = pa.table({"key": [f"{i:09d}" for i in range(n)], "jpg": images, "caption": captions,
                          "url": [f"http://x/{i}" for i in range(n)], "width": [48] * n})
    else:  # the Hugging Face Image feature: struct {bytes, path}
        struct = pa.array([{"bytes": b, "path": f"img{i}.jpg"} for i, b in enumerate(images)],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"image": struct, "text": captions, "split": ["train", "val", "test", "train", "val"][:n]})
    pq.write_table(table, path, row_group_size=2)
    return images, captions


@pytest.mark.parametrize("layout", ["img2dataset", "hf"])
def test_parquet_layouts_round_trip(tmp_path, layout):
    images, captions = _parquet(tmp_path / "pairs.parquet", layout)
    assert detect_format(tmp_path / "pairs.parquet") == "parquet"
    out = tmp_path / "p.lance"
    report = ingest([tmp_path / "pairs.parquet"], out, progress=False, strict=True)
    assert report.rows_added == 5 and not report.problems
    rows = _rows(out)
    ids = [f"{i:09d}" for i in range(5)] if layout == "img2dataset" else [f"pairs.parquet#{i}" for i in range(5)]
    assert sorted(rows) == ids
    for i, rec_id in enumerate(ids):
        assert rows[rec_id]["captions"] == [captions[i]] and rows[rec_id]["image"] == images[i]
    if layout == "hf":
        assert [rows[i]["split"] for i in ids] == ["train", "val", "test", "train", "val"]
    else:
        assert rows[ids[1]]["url"] == "http://x/1" and rows[ids[1]]["extra_width"] == 48
    again = ingest([tmp_path / "pairs.parquet"], out, progress=False)
    assert again.rows_added == 0 and again.rows_existing == 5


def test_parquet_paths_options_and_bad_rows(tmp_path):
    (tmp_path / "imgs").mkdir()
    good = jpeg_bytes((5, 6, 7))
    (tmp_path / "imgs" / "a.jpg").write_bytes(good)
    (tmp_path / "imgs" / "c.jpg").write_bytes(b"garbage")
    (tmp_path / "secret.jpg").write_bytes(good)
    table = pa.table({"file": ["a.jpg", "b.jpg", "c.jpg", "../secret.jpg", "a.jpg", None],
                      "desc": ["ok", "missing file", "not an image", "outside the root", "", "no image"],
                      "uid": ["u1", "u2", "u3", "u4", "u5", "u6"]})
    pq.write_table(table, tmp_path / "paths.parquet")
    out = tmp_path / "paths.lance"
    result = run_cli("ingest", tmp_path / "paths.parquet", "--out", out, "--images-root", tmp_path / "imgs",
                     "--image-column", "file", "--text-column", "desc", "--id-column", "uid", "-q")
    assert result.returncode == 0, result.stderr
    rows = _rows(out)
    assert list(rows) == ["u1"] and rows["u1"]["image"] == good and rows["u1"]["captions"] == ["ok"]
    saved = json.loads(next(tmp_path.glob("paths*ingest-report.json")).read_text())
    reasons = "\n".join(p["reason"] for p in saved["problems"])
    assert len(saved["problems"]) == 5, reasons
    for reason in ("image file not found", "not an image", "outside the images root", "empty caption",
                   "no image in column 'file'"):
        assert reason in reasons
    bad = run_cli("ingest", tmp_path / "paths.parquet", "--out", tmp_path / "x.lance",
                  "--image-column", "file", "--text-column", "nope")
    assert bad.returncode != 0 and "no column 'nope' (--text-column)" in bad.stderr


def test_hf_dataset_dict_splits_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [jpeg_bytes((60 * i, 0, 0)) for i in range(4)]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "source_id": datasets.Value("int64")})

    def part(idx):
        return datasets.Dataset.from_dict(
            {"image": [{"bytes": images[i], "path": None} for i in idx], "caption": [f"hf {i}" for i in idx],
             "source_id": list(idx)}, features=features)

    folder = tmp_path / "hfds"
    datasets.DatasetDict({"train": part([0, 1]), "validation": part([2]), "test": part([3])}).save_to_disk(folder)
    assert detect_format(folder) == "hf"
    out = tmp_path / "hf.lance"
    result = run_cli("ingest", folder, "--out", out, "-q")
    assert result.returncode == 0, result.stderr
    rows = _rows(out)
    expect = {"hfds/train#0": (0, "train"), "hfds/train#1": (1, "train"), "hfds/validation#0": (2, "val"),
              "hfds/test#0": (3, "test")}
    assert set(rows) == set(expect)
    for rec_id, (i, split) in expect.items():
        assert rows[rec_id]["image"] == images[i] and rows[rec_id]["captions"] == [f"hf {i}"]
        assert rows[rec_id]["split"] == split and rows[rec_id]["source_id"] == i
    single = tmp_path / "single"
    part([0, 1, 2]).save_to_disk(single)
    report = ingest([single], out, progress=False, id_column="source_id")
    assert report.rows_added == 3 and sorted(_rows(out))[:3] == ["0", "1", "2"]
    again = ingest([single], out, progress=False, id_column="source_id")
    assert again.rows_added == 0 and again.rows_existing == 3


def test_hf_without_datasets_is_one_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"pip install 'vlkit\[hf\]'"):
        ingest([folder], tmp_path / "o.lance", progress=False)


def test_help_lists_new_formats():
    result = run_cli("ingest", "--help")
    for word in ("webdataset", "parquet", "hf", "--image-column", "--text-column", "--id-column"):
        assert word in result.stdout
