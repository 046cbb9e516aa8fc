"""Every read of a dataset's images is bounded by the pixel limit and names the row it failed on; a damaged
dataset (a missing data file) is one clear error; embeddings are replaced in one commit."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import lance
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import jpeg_bytes, run_cli
from vlkit.data import decode
from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.rows import RowError
from vlkit.data.schema import build_schema, rows_to_table
from vlkit.data.sheet import contact_sheet
from vlkit.data.store import DamagedDataset
from vlkit.data.transforms import ImageTransform
from vlkit.errors import VlkitError
from vlkit.eval.thumbnails import split_thumbnails
from vlkit.inference.embed import IMAGE_COLUMN, TEXT_COLUMN, Embeddings, read_embeddings, write_embeddings

BIG = (300, 200)  # 60 000 pixels: decodes under a limit of 100 000, refused under 50 000


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A few hundred bytes whose PNG header declares ``width`` x ``height`` pixels (the data is cut short)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length and type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


@pytest.fixture(autouse=True)
def _default_limit(monkeypatch):
    monkeypatch.delenv(decode.ENV_VAR, raising=False)
    decode.set_max_pixels(None)
    yield
    decode.set_max_pixels(None)


def write_rows(path: Path, images: dict[str, bytes], fragment_rows: int = 1024) -> Path:
    """A vlkit dataset of the given images (one caption each), written directly (no ingest checks)."""
    rows = [{"id": key, "image": data, "captions": [f"a picture called {key}"], "split": "train"}
            for key, data in images.items()]
    schema = build_schema()
    lance.write_dataset(rows_to_table(rows, schema), str(path), schema=schema, max_rows_per_file=fragment_rows)
    return path


@pytest.fixture
def bad(tmp_path) -> Path:
    """Rows: a fine JPEG, a 300x200 JPEG, a 20000x20000 PNG header, and bytes that are no image."""
    return write_rows(tmp_path / "bad.lance", {
        "ok.jpg": jpeg_bytes(), "big.jpg": jpeg_bytes(size=BIG), "bomb.png": bomb_png(), "junk.jpg": b"junk" * 50,
    })


def _read(ds: LanceImageTextDataset, ids: list[str]) -> dict:
    table = lance.dataset(ds.path).to_table(columns=["id"]).column("id").to_pylist()
    return ds.__getitems__([ds.offsets.index(table.index(i)) for i in ids])


@pytest.mark.parametrize("train", [False, True])
def test_loader_errors_name_the_row(bad, train):
    ds = LanceImageTextDataset(bad, "train", ImageTransform(32, train=train), captions="first")
    assert _read(ds, ["ok.jpg", "big.jpg"])["image"].shape == (2, 3, 32, 32)
    with pytest.raises(RowError, match=rf"^{bad} row id 'bomb.png': image of 20000x20000 = 400.0 Mpx is over the "
                                       r"pixel limit of 64.0 Mpx"):
        _read(ds, ["ok.jpg", "bomb.png"])
    with pytest.raises(RowError, match=rf"^{bad} row id 'junk.jpg': not an image"):
        _read(ds, ["junk.jpg"])


def test_loader_follows_the_pixel_limit(bad, monkeypatch):
    ds = LanceImageTextDataset(bad, "train", ImageTransform(32), captions="first")
    decode.set_max_pixels(50_000)
    with pytest.raises(VlkitError, match="row id 'big.jpg': image of 300x200 = 0.1 Mpx is over the pixel limit"):
        _read(ds, ["ok.jpg", "big.jpg"])
    decode.set_max_pixels(100_000)
    assert _read(ds, ["big.jpg"])["image"].shape == (1, 3, 32, 32)
    decode.set_max_pixels(None)
    monkeypatch.setenv(decode.ENV_VAR, "50000")
    with pytest.raises(VlkitError, match="row id 'big.jpg'"):
        _read(ds, ["big.jpg"])


def test_worker_decodes_with_the_parents_limit_and_reports_one_line(bad):
    ds = LanceImageTextDataset(bad, "train", ImageTransform(32), captions="first")
    keep = lance.dataset(str(bad)).to_table(columns=["id"]).column("id").to_pylist().index("big.jpg")
    decode.set_max_pixels(50_000)  # set here, in the parent: a spawned worker must decode under it too
    loader = make_loader(ds, 1, [ds.offsets.index(keep)], num_workers=1, multiprocessing_context="spawn",
                         persistent_workers=False)
    with pytest.raises(RowError) as info:
        next(iter(loader))
    assert str(info.value) == f"{bad} row id 'big.jpg': image of 300x200 = 0.1 Mpx is over the pixel limit of " \
                              f"0.1 Mpx (raise it with --max-pixels or {decode.ENV_VAR})"


def test_contact_sheet_and_thumbnails_name_the_row(bad, tmp_path):
    out = tmp_path / "sheet.png"
    with pytest.raises(RowError, match=r"row id 'bomb.png': image of 20000x20000"):
        contact_sheet(bad, out, n=4)
    assert not out.exists() and not list(tmp_path.glob("sheet*"))
    with pytest.raises(RowError, match=r"row id 'junk.jpg': not an image"):
        split_thumbnails(bad, "train", [0, 3])
    assert split_thumbnails(bad, "train", [0, 1])[1].shape == (160, 160, 3)
    decode.set_max_pixels(50_000)
    with pytest.raises(RowError, match=r"row id 'big.jpg': image of 300x200"):
        split_thumbnails(bad, "train", [1])
    with pytest.raises(RowError, match=r"row id 'big.jpg': image of 300x200"):
        contact_sheet(bad, out, n=2)


def test_contact_sheet_and_loader_refuse_counts_below_one(bad, tmp_path):
    for kwargs in ({"n": 0}, {"n": -3}, {"cols": 0}, {"thumb": 0}):
        with pytest.raises(VlkitError, match="must be at least 1"):
            contact_sheet(bad, tmp_path / "sheet.png", **kwargs)
    assert not list(tmp_path.glob("sheet*"))
    with pytest.raises(VlkitError, match="workers must be 0 or more, got -1"):
        make_loader(LanceImageTextDataset(bad, "train", captions="first"), 2, num_workers=-1)


def test_cli_data_show_reports_the_row_in_one_line(bad, tmp_path):
    result = run_cli("data", "show", bad, "--out", tmp_path / "sheet.png")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"vlkit: error: {bad} row id 'bomb.png': image of 20000x20000 = 400.0 Mpx is over the pixel limit of "
        f"64.0 Mpx (raise it with --max-pixels or {decode.ENV_VAR})"]


def test_missing_data_file_is_one_error_naming_it(tmp_path):
    path = write_rows(tmp_path / "two.lance", {f"{i}.jpg": jpeg_bytes(size=(16 + i, 16)) for i in range(4)},
                      fragment_rows=2)
    ds = LanceImageTextDataset(path, "train", ImageTransform(16), captions="first")
    files = sorted(f.data_files()[0].path for f in lance.dataset(str(path)).get_fragments())
    (path / "data" / files[1]).unlink()
    with pytest.raises(DamagedDataset, match=rf"^{path}: the dataset is damaged: data file {files[1]} is missing"):
        ds.__getitems__([0, 3])  # opened before the file went: the failed read names it
    with pytest.raises(VlkitError, match=rf"^{path}: .*data file {files[1]} is missing"):
        LanceImageTextDataset(path, "train", ImageTransform(16), captions="first")
    with pytest.raises(VlkitError, match=rf"^{path}: .*data file {files[1]} is missing"):
        contact_sheet(path, tmp_path / "sheet.png", n=4)
    assert not (tmp_path / "sheet.png").exists()


def test_write_embeddings_is_one_commit_that_replaces_the_columns(tmp_path):
    path = write_rows(tmp_path / "e.lance", {f"{i}.jpg": jpeg_bytes(size=(16 + i, 16)) for i in range(5)},
                      fragment_rows=2)
    ids = [f"{i}.jpg" for i in range(5)]
    images = [b for _, b in lance.dataset(str(path)).read_blobs("image", indices=list(range(5)))]
    data_files = {d.path for f in lance.dataset(str(path)).get_fragments() for d in f.data_files()}
    gen = torch.Generator().manual_seed(0)
    for step, (dim, tag, precision) in enumerate([(3, "first", "fp32"), (5, "second", "bf16"), (5, "third", "fp32")]):
        before = lance.dataset(str(path)).version
        emb = Embeddings(ids=ids[:4][::-1], image=torch.randn(4, dim, generator=gen), text=torch.randn(3, dim, generator=gen),
                         caption_image=torch.tensor([0, 0, 2]), captions=["a", "b", "c"], precision=precision)
        version = write_embeddings(path, emb, tag, source=f"run-{step}")
        ds = lance.dataset(str(path))
        assert version == ds.version == before + 1 and len(ds.versions()) == step + 2
        assert ds.schema.names.count(IMAGE_COLUMN) == 1 and ds.schema.names.count(TEXT_COLUMN) == 1
        assert read_embeddings(path) == {"vlkit.model": tag, "vlkit.source": f"run-{step}", "vlkit.dim": str(dim),
                                         "vlkit.precision": precision}
        rows = {r["id"]: r for r in ds.to_table(columns=["id", IMAGE_COLUMN, TEXT_COLUMN]).to_pylist()}
        for pos, key in enumerate(emb.ids):
            np.testing.assert_array_equal(rows[key][IMAGE_COLUMN], emb.image[pos].numpy())
        np.testing.assert_array_equal(rows["3.jpg"][TEXT_COLUMN], emb.text[:2].numpy())
        np.testing.assert_array_equal(rows["1.jpg"][TEXT_COLUMN], emb.text[2:].numpy())
        assert rows["2.jpg"][TEXT_COLUMN] == [] and rows["4.jpg"][IMAGE_COLUMN] is None
        assert [b for _, b in ds.read_blobs("image", indices=list(range(5)))] == images
        assert data_files <= {d.path for f in ds.get_fragments() for d in f.data_files()}  # images not rewritten
        ds.validate()


def test_write_embeddings_takes_the_write_lock_and_retries_a_lost_race(tmp_path, monkeypatch):
    import threading

    from vlkit.data.store import write_lock
    from vlkit.errors import DataError
    from vlkit.inference import embed

    path = write_rows(tmp_path / "r.lance", {f"{i}.jpg": jpeg_bytes(size=(16, 16)) for i in range(3)})
    emb = Embeddings(ids=["0.jpg", "1.jpg"], image=torch.ones(2, 4), text=torch.ones(1, 4),
                     caption_image=torch.tensor([1]), captions=["a"])
    with write_lock(path):  # an ingest holds the lock: the embeddings wait for it
        done = threading.Thread(target=write_embeddings, args=(path, emb, "tag"))
        done.start()
        done.join(0.5)
        assert done.is_alive() and IMAGE_COLUMN not in lance.dataset(str(path)).schema.names
    done.join(30)
    assert not done.is_alive() and IMAGE_COLUMN in lance.dataset(str(path)).schema.names

    # a writer that takes no lock commits rows between the open and the commit: joined again on the new version
    real, calls = embed.replace_columns, []

    def racing(ds, table, on):
        if not calls:
            extra = {"9.jpg": jpeg_bytes(size=(16, 16))}
            rows = rows_to_table([{"id": k, "image": v, "captions": [], "split": "train"} for k, v in extra.items()],
                                 lance.dataset(str(path)).schema)
            lance.write_dataset(rows, str(path), mode="append")
        calls.append(ds.version)
        return real(ds, table, on=on)

    monkeypatch.setattr(embed, "replace_columns", racing)
    before = lance.dataset(str(path)).version
    assert write_embeddings(path, emb, "again") == before + 2 and calls == [before, before + 1]
    rows = {r["id"]: r[IMAGE_COLUMN] for r in lance.dataset(str(path)).to_table(columns=["id", IMAGE_COLUMN])
            .to_pylist()}
    assert rows == {"0.jpg": [1.0] * 4, "1.jpg": [1.0] * 4, "2.jpg": None, "9.jpg": None}

    def conflict(ds, table, on):
        raise OSError("Retryable commit conflict for version 9: preempted by a concurrent transaction")

    monkeypatch.setattr(embed, "replace_columns", conflict)
    monkeypatch.setattr("vlkit.data.store.time.sleep", lambda s: None)
    with pytest.raises(DataError, match=rf"^{path}: other processes kept changing the dataset while the embeddings"):
        write_embeddings(path, emb, "third")


def test_pixel_limit_from_environment_is_validated(monkeypatch):
    from vlkit.data.decode import max_pixels, set_max_pixels
    from vlkit.errors import VlkitError

    set_max_pixels(None)
    monkeypatch.setenv("VLKIT_MAX_PIXELS", "many")
    with pytest.raises(VlkitError, match="VLKIT_MAX_PIXELS='many' is not a number"):
        max_pixels()
    monkeypatch.setenv("VLKIT_MAX_PIXELS", "0")
    with pytest.raises(VlkitError, match="must be at least 1"):
        max_pixels()
    monkeypatch.setenv("VLKIT_MAX_PIXELS", "2.5e6")
    assert max_pixels() == 2_500_000


def test_a_pixel_limit_above_pillows_own_is_honoured():
    """Pillow refuses images over 2 x its MAX_IMAGE_PIXELS by itself; a vlkit limit above that still decides."""
    from PIL import Image as PILImage

    size = (30_000, 32_000)  # 960 Mpx: over Pillow's 900 Mpx guard, declared in a ~0.1 MB PNG
    buf = io.BytesIO()
    PILImage.new("1", size).save(buf, "PNG")
    with pytest.raises(decode.ImageTooLarge):
        decode.open_image(buf.getvalue())
    decode.set_max_pixels(1_000_000_000)
    assert decode.open_image(buf.getvalue()).size == size  # header only: nothing decoded
