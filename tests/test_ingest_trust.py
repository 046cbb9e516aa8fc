"""Ingest loses or corrupts no data and reads only what it should: concurrent appends, unbalanced CSV quotes,
user labels, damaged datasets, paths outside the images root, special files, byte and pixel limits."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
from pathlib import Path

import lance
import pytest
from PIL import Image

from vlkit.data import decode
from vlkit.data.ingest import ingest, log_path, report_path
from vlkit.data.ingest_report import read_log
from vlkit.data.store import DamagedDataset, open_dataset
from vlkit.errors import DataError

from .conftest import jpeg_bytes, run_cli


def _ids(path: Path) -> list[str]:
    return lance.dataset(str(path)).to_table(columns=["id"]).column("id").to_pylist()


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(jpeg_bytes(color=(i * 7 % 255, 40, 90)))


# --- concurrent appends -------------------------------------------------------------------------------------


def _racer(source: str, out: str, barrier) -> None:
    barrier.wait()
    ingest([source], out, workers=1, progress=False)


def test_concurrent_ingests_of_the_same_new_images_store_each_id_once(tmp_path):
    names = [f"{i}.jpg" for i in range(12)]
    _images(tmp_path / "images", names)
    seed = tmp_path / "seed.jsonl"
    seed.write_text(json.dumps({"image": "images/0.jpg", "text": "seed"}) + "\n")
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"image": f"images/{n}", "text": f"image {n}"}) + "\n" for n in names))
    scored = tmp_path / "scored.jsonl"  # the same images with a new column: one racer also adds a column
    scored.write_text("".join(json.dumps({"image": f"images/{n}", "text": f"image {n}", "score": i / 2}) + "\n"
                              for i, n in enumerate(names)))
    ctx = mp.get_context("spawn")
    for trial in range(3):
        out = tmp_path / f"race{trial}.lance"
        ingest([seed], out, progress=False)
        barrier = ctx.Barrier(2)
        second = scored if trial == 2 else plain
        procs = [ctx.Process(target=_racer, args=(str(src), str(out), barrier)) for src in (plain, second)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0], f"trial {trial}: a racer failed"
        ids = _ids(out)
        assert sorted(ids) == sorted(set(ids)) == sorted(f"images/{n}" for n in names), f"trial {trial}"
        runs = read_log(out)
        assert len(runs) == 3 and len({r["pid"] for r in runs[1:]}) == 2  # the seed run and both racers
        assert sorted(r["rows_added"] for r in runs[1:]) == [0, 11]
        assert sorted(r["rows_existing"] for r in runs[1:]) == [1, 12]
        if trial == 2:  # the column comes with the rows: there only if the racer with scores added them
            scored_added = next(r["rows_added"] for r in runs if r["pid"] == procs[1].pid)
            assert ("score" in lance.dataset(str(out)).schema.names) == (scored_added > 0)
    # a rerun changes nothing, not even the version, and still logs its report
    version = lance.dataset(str(out)).version
    assert ingest([plain], out, progress=False).rows_added == 0
    assert lance.dataset(str(out)).version == version and len(read_log(out)) == 4
    assert json.loads(report_path(out).read_text())["rows_existing"] == 12


# --- CSV with an unbalanced quote ---------------------------------------------------------------------------


def test_csv_unbalanced_quote_is_reported_and_the_swallowed_rows_kept(tmp_path):
    _images(tmp_path / "images", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    csv = tmp_path / "captions.csv"
    csv.write_text('image,caption\na.jpg,a red square\nb.jpg,"a blue square\nc.jpg,a green one\n'
                   'd.jpg,a yellow one\na.jpg,"a quoted, multi\nline caption"\n')
    out = tmp_path / "q.lance"
    report = ingest([csv], out, images_root=tmp_path / "images", progress=False)
    rows = {r["id"]: r["captions"] for r in lance.dataset(str(out)).to_table(columns=["id", "captions"]).to_pylist()}
    assert rows == {"a.jpg": ["a red square", "a quoted, multi\nline caption"], "c.jpg": ["a green one"],
                    "d.jpg": ["a yellow one"]}
    [problem] = report.problems
    assert (problem.file, problem.row) == (str(csv), 3)
    assert "unbalanced quote" in problem.reason and "lines 3-6" in problem.reason

    strict_out = tmp_path / "strict.lance"
    with pytest.raises(DataError, match="--strict: 1 problems"):
        ingest([csv], strict_out, images_root=tmp_path / "images", strict=True, progress=False)
    assert not strict_out.exists()


def test_csv_quote_left_open_on_the_last_line(tmp_path):
    _images(tmp_path, ["a.jpg", "b.jpg"])
    csv = tmp_path / "c.csv"
    csv.write_text('image,caption\na.jpg,red\nb.jpg,"blue')
    report = ingest([csv], tmp_path / "c.lance", progress=False)
    assert _ids(tmp_path / "c.lance") == ["a.jpg"]
    assert [(p.row, "end of the file" in p.reason) for p in report.problems] == [(3, True)]


def test_csv_caption_over_several_lines_is_kept_whole(tmp_path):
    _images(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    csv = tmp_path / "m.csv"  # the continuation line parses as two fields, but "runs" is no image: a caption
    csv.write_text('image,caption\na.jpg,"A dog\nruns, fast"\nb.jpg,"one ""big""\ncat"\nc.jpg,plain\n')
    report = ingest([csv], tmp_path / "m.lance", progress=False)
    rows = {r["id"]: r["captions"] for r in lance.dataset(str(tmp_path / "m.lance")).to_table(
        columns=["id", "captions"]).to_pylist()}
    assert rows == {"a.jpg": ["A dog\nruns, fast"], "b.jpg": ['one "big"\ncat'], "c.jpg": ["plain"]}
    assert not report.problems

    # a well-formed field that swallowed a row naming an existing image, or a quote open at the very end
    doubt = tmp_path / "d.csv"
    doubt.write_text('image,caption\na.jpg,"red\nb.jpg,blue"\nc.jpg,"green\n')
    report = ingest([doubt], tmp_path / "d.lance", progress=False)
    assert sorted(_ids(tmp_path / "d.lance")) == ["b.jpg"]
    assert [(p.row, p.reason.split(" (")[0].split("runs on ")[1]) for p in report.problems] == [
        (2, "over lines 2-3"), (4, "to the end of the file")]


# --- user labels --------------------------------------------------------------------------------------------


def test_user_labels_are_kept_and_disagreements_reported(tmp_path):
    _images(tmp_path / "images", [f"{i}.jpg" for i in range(8)])
    lines = [(0, 0, "zebra"), (1, 1, "ant"), (2, 2, "crane"), (3, 0, "zebra"),
             (4, 5, "crane"),   # one name, two labels
             (5, 1, "bee"),     # one label, two names
             (6, 4, None)]      # a label without a name is kept
    src = tmp_path / "l.jsonl"
    src.write_text("".join(json.dumps({"image": f"images/{i}.jpg", "text": "x", "label": lab,
                                       **({"class_name": name} if name else {})}) + "\n" for i, lab, name in lines))
    out = tmp_path / "l.lance"
    report = ingest([src], out, progress=False)
    ds = lance.dataset(str(out))
    table = ds.to_table(columns=["id", "label", "class_name"]).to_pylist()
    rows = {r["id"]: (r["label"], r["class_name"]) for r in table}
    assert rows == {"images/0.jpg": (0, "zebra"), "images/1.jpg": (1, "ant"), "images/2.jpg": (2, "crane"),
                    "images/3.jpg": (0, "zebra"), "images/4.jpg": (5, "crane"), "images/6.jpg": (4, None)}
    from vlkit.data.schema import class_names

    # both cranes are kept under their own labels (ImageNet's 1000 classes stay 1000), the clash is noticed
    assert class_names(ds.schema) == ["zebra", "ant", "crane", "class_3", "class_4", "crane"]
    assert [str(p) for p in report.notices] == [
        f"{src}:5: class 'crane' has label 5 here and label 2 at {src}:3: both kept, but prompts built from class "
        "names cannot tell them apart"]
    assert [str(p) for p in report.problems] == [f"{src}:6: label 1 is named 'bee' here but 'ant' at {src}:2"]
    assert "kept, but note (1)" in report.summary()

    more = tmp_path / "m.jsonl"  # appending: new labels extend the classes, the stored ones still bind
    more.write_text(json.dumps({"image": "images/7.jpg", "text": "x", "label": 4, "class_name": "yak"}) + "\n"
                    + json.dumps({"image": "images/5.jpg", "text": "x", "label": 0, "class_name": "horse"}) + "\n")
    report = ingest([more], out, progress=False)
    assert class_names(lance.dataset(str(out)).schema) == ["zebra", "ant", "crane", "class_3", "yak", "crane"]
    assert [p.reason for p in report.problems] == ["label 0 is named 'horse' here but 'zebra' in the dataset"]


def _classes(path: Path) -> list[str]:
    from vlkit.data.schema import class_names

    return class_names(lance.dataset(str(path)).schema)


def _labels(path: Path) -> dict[str, int]:
    return {r["id"]: r["label"] for r in lance.dataset(str(path)).to_table(columns=["id", "label"]).to_pylist()}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"text": "x", **row}) + "\n" for row in rows))
    return path


def test_new_classes_never_take_a_label_that_unnamed_rows_carry(tmp_path):
    _images(tmp_path / "images", ["0.jpg", "1.jpg", "2.jpg"])
    _images(tmp_path / "folders" / "dog", ["d.jpg"])
    src = _jsonl(tmp_path / "a.jsonl", [{"image": "images/0.jpg", "label": 0, "class_name": "cat"},
                                        {"image": "images/1.jpg", "label": 1}])
    out = tmp_path / "a.lance"
    ingest([src], out, progress=False)
    assert _classes(out) == ["cat", "class_1"]  # the unnamed label is in the list
    ingest([tmp_path / "folders"], out, progress=False)
    assert _classes(out) == ["cat", "class_1", "dog"]
    assert _labels(out) == {"images/0.jpg": 0, "images/1.jpg": 1, "dog/d.jpg": 2}

    # in one batch: a label without a name and a class folder
    both = tmp_path / "b.lance"
    ingest([_jsonl(tmp_path / "b.jsonl", [{"image": "images/2.jpg", "label": 0}]), tmp_path / "folders"], both,
           progress=False)
    assert _labels(both) == {"images/2.jpg": 0, "dog/d.jpg": 1} and _classes(both) == ["class_0", "dog"]


def test_a_label_beyond_the_stored_classes_extends_them(tmp_path):
    from vlkit.data.classes import assign_classes
    from vlkit.data.records import Record
    from vlkit.tasks.labels import classes_present

    _images(tmp_path / "folders" / "cat", ["c.jpg"])
    _images(tmp_path / "folders" / "dog", ["d.jpg"])
    _images(tmp_path / "images", ["5.jpg"])
    out = tmp_path / "c.lance"
    ingest([tmp_path / "folders"], out, progress=False)
    ingest([_jsonl(tmp_path / "c.jsonl", [{"image": "images/5.jpg", "label": 5}])], out, progress=False)
    assert _classes(out) == ["cat", "dog", "class_2", "class_3", "class_4", "class_5"]
    assert classes_present(_labels(out).values(), _classes(out)) == ["cat", "dog", "class_5"]
    # a dataset stored before its rows' labels were all in its class list: no IndexError, no merged classes
    assert classes_present([0, 5], ["cat", "dog"]) == ["cat", "class_5"]
    [bird], classes = assign_classes([Record(id="b", image_path=Path("b.jpg"), source="s", class_name="bird")],
                                     ["cat", "dog"], [], stored_labels=[0, 5])
    assert bird.label == 6 and classes == ["cat", "dog", "class_2", "class_3", "class_4", "class_5", "bird"]


# --- one open of the dataset, one decode of each image ------------------------------------------------------


def test_ingest_opens_the_dataset_once(tmp_path, monkeypatch):
    _images(tmp_path / "images", [f"{i}.jpg" for i in range(4)])
    out = tmp_path / "o.lance"
    ingest([_jsonl(tmp_path / "s.jsonl", [{"image": "images/0.jpg", "label": 0, "class_name": "a"}])], out,
           progress=False)
    opened, real_open = [], lance.dataset
    monkeypatch.setattr(lance, "dataset", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    # a new class, a new column, new rows: the class list, the column, the rows and two indices are committed
    more = [{"image": f"images/{i}.jpg", "label": i, "class_name": f"c{i}", "score": i} for i in range(1, 4)]
    report = ingest([_jsonl(tmp_path / "m.jsonl", more)], out, progress=False)
    assert len(opened) == 1
    ds = real_open(str(out))
    assert report.rows_added == 3 and report.version_after == ds.version == report.version_before + 5
    assert _classes(out) == ["a", "c1", "c2", "c3"] and "score" in ds.schema.names
    assert sorted(i.name for i in ds.describe_indices()) == ["id_idx", "split_idx"]
    assert ds.to_table(filter="id = 'images/3.jpg'", columns=["score"]).column("score").to_pylist() == [3]


@pytest.mark.parametrize("keep", [None, 0])  # default: the checked images are kept; 0: re-read, not decoded
def test_strict_decodes_each_image_once(tmp_path, monkeypatch, keep):
    from vlkit.data import images

    names = [f"{i}.jpg" for i in range(5)]
    _images(tmp_path / "images", names)
    src = _jsonl(tmp_path / "s.jsonl", [{"image": f"images/{n}"} for n in names])
    decoded, real_load = [], images.load_image
    monkeypatch.setattr(images, "load_image", lambda img: decoded.append(img.size) or real_load(img))
    if keep is not None:
        from vlkit.data import ingest_images

        monkeypatch.setattr(ingest_images, "KEEP_CHECKED_BYTES", keep)
        real_bytes = images.read_bytes
        monkeypatch.setattr(ingest_images, "read_bytes",  # 4.jpg is changed after the check
                            lambda path, *a: real_bytes(path, *a) + (b"!" if path.name == "4.jpg" else b""))
    out = tmp_path / "s.lance"
    report = ingest([src], out, strict=True, workers=2, progress=False)
    assert len(decoded) == len(names)
    ds = lance.dataset(str(out))
    blobs = ds.read_blobs("image", indices=list(range(ds.count_rows())), preserve_order=True)
    stored = {key: data for key, (_, data) in zip(_ids(out), blobs)}
    expected = names if keep is None else names[:4]
    assert stored == {f"images/{n}": (tmp_path / "images" / n).read_bytes() for n in expected}
    assert [p.reason.split(" (")[0] for p in report.problems] == (
        [] if keep is None else ["the image file changed during the ingest"])


# --- a damaged dataset --------------------------------------------------------------------------------------


def test_missing_data_file_is_one_line_naming_dataset_and_file(tmp_path):
    _images(tmp_path / "images", [f"{i}.jpg" for i in range(6)])
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"image": f"images/{i}.jpg", "text": "x"}) + "\n" for i in range(6)))
    out = tmp_path / "d.lance"
    ingest([src], out, fragment_rows=2, progress=False)
    victim = sorted((out / "data").iterdir())[1]
    victim.unlink()
    with pytest.raises(DamagedDataset, match=f"{out}: the dataset is damaged: data file {victim.name} is missing"):
        open_dataset(out)
    with pytest.raises(DamagedDataset, match=victim.name):
        ingest([src], out, progress=False)
    for args in (["data", "info", str(out)], ["ingest", str(src), "--out", str(out)]):
        proc = run_cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and victim.name in proc.stderr and str(out) in proc.stderr


# --- paths, special files, byte and pixel limits ------------------------------------------------------------


@pytest.fixture()
def escape(tmp_path):
    """A JSONL in ``root/`` naming images inside it, beside it (``..``), by absolute path and via symlinks."""
    root = tmp_path / "root"
    _images(root, ["ok.jpg"])
    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes())
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "inner.jpg").symlink_to(root / "ok.jpg")
    src = root / "e.jsonl"
    names = ["ok.jpg", "../secret.jpg", str(tmp_path / "secret.jpg"), "link.jpg", "inner.jpg"]
    src.write_text("".join(json.dumps({"image": n, "text": f"t{i}", "id": f"r{i}"}) + "\n"
                           for i, n in enumerate(names)))
    return src


def test_images_outside_the_root_are_refused_unless_allowed(escape, tmp_path):
    report = ingest([escape], tmp_path / "in.lance", progress=False)
    assert sorted(_ids(tmp_path / "in.lance")) == ["r0", "r4"]
    outside = sorted(p.reason.split(" (listed at ")[1].rstrip(")") for p in report.problems
                     if "outside the images root" in p.reason)
    assert outside == [f"{escape}:{n}" for n in (2, 3, 4)]
    report = ingest([escape], tmp_path / "all.lance", allow_outside_root=True, progress=False)
    assert report.rows_added == 5 and not report.problems

    root = escape.parent  # with --images-root, the root is that folder, not the source's
    sub = root / "sub"
    sub.mkdir()
    with pytest.raises(DataError, match="no usable images"):
        ingest([escape], tmp_path / "sub.lance", images_root=sub, progress=False)
    saved = json.loads(report_path(tmp_path / "sub.lance").read_text())["problems"]
    reasons = sorted(p["reason"].split(" (")[0] for p in saved)  # '..' and the absolute path leave sub/
    assert reasons == ["image file not found"] * 3 + ["outside the images root " + str(sub)] * 2


def test_special_files_and_byte_limit(tmp_path):
    root = tmp_path / "root"
    _images(root, ["ok.jpg"])
    os.mkfifo(root / "pipe.jpg")
    (root / "big.jpg").write_bytes(jpeg_bytes(size=(400, 400)))
    src = root / "s.jsonl"
    src.write_text("".join(json.dumps({"image": n, "text": "t"}) + "\n"
                           for n in ("ok.jpg", "pipe.jpg", "big.jpg", "/dev/zero")))
    size = (root / "big.jpg").stat().st_size
    proc = run_cli("ingest", src, "--out", tmp_path / "s.lance", "--allow-outside-root", "--max-image-bytes",
                   str(size - 1), timeout=60)  # a FIFO or /dev/zero read would hang or exhaust memory
    assert proc.returncode == 0, proc.stderr
    reasons = {p["file"].rsplit("/", 1)[-1]: p["reason"] for p in json.loads(report_path(tmp_path / "s.lance")
                                                                               .read_text())["problems"]}
    assert reasons["pipe.jpg"].startswith("not a regular file (a named pipe (FIFO))")
    assert reasons["zero"].startswith("not a regular file (a character device)")
    assert reasons["big.jpg"].startswith(f"image file is larger than the limit of {size - 1} bytes")
    assert _ids(tmp_path / "s.lance") == ["ok.jpg"]
    report = ingest([src], tmp_path / "s.lance", max_image_bytes=size, progress=False)
    assert report.rows_added == 1 and "big.jpg" in _ids(tmp_path / "s.lance")


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("1", size).save(buf, "PNG")
    return buf.getvalue()


def test_pixel_limit_refuses_decompression_bombs_before_decoding(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(_png((9000, 9000)))  # ~10 KB on disk, 81 Mpx
    (tmp_path / "mid.png").write_bytes(_png((3000, 3000)))   # 9 Mpx
    src = tmp_path / "b.jsonl"
    src.write_text("".join(json.dumps({"image": n, "text": "t"}) + "\n" for n in ("bomb.png", "mid.png")))
    report = ingest([src], tmp_path / "b.lance", progress=False)
    assert _ids(tmp_path / "b.lance") == ["mid.png"]
    [problem] = report.problems
    assert "9000x9000" in problem.reason and "64.0 Mpx" in problem.reason

    monkeypatch.setenv(decode.ENV_VAR, "4000000")
    with pytest.raises(DataError, match="no usable images"):
        ingest([src], tmp_path / "env.lance", progress=False)
    assert "3000x3000" in "\n".join(p["reason"] for p in json.loads(report_path(tmp_path / "env.lance")
                                                                    .read_text())["problems"])
    monkeypatch.delenv(decode.ENV_VAR)
    decode.set_max_pixels(100_000_000)
    try:
        assert ingest([src], tmp_path / "big.lance", progress=False).rows_added == 2
    finally:
        decode.set_max_pixels(None)


def test_cli_size_option_and_its_default():
    import argparse

    from vlkit.cli import ingest as cli_ingest
    from vlkit.data import images

    assert cli_ingest.DEFAULT_MAX_IMAGE_BYTES == images.DEFAULT_MAX_IMAGE_BYTES
    assert [cli_ingest.parse_size(t) for t in ("123", "64K", "64M", "1GiB", "2mb")] == [
        123, 64 << 10, 64 << 20, 1 << 30, 2 << 20]
    for bad in ("lots", "0", "-5M", "inf", "1e400", "nan", "1e300G"):  # non-finite: no OverflowError
        with pytest.raises(argparse.ArgumentTypeError):
            cli_ingest.parse_size(bad)
    proc = run_cli("ingest", "nothing.jsonl", "--out", "never.lance", "--max-image-bytes", "1e400")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not a size: '1e400'" in proc.stderr


def test_report_log_keeps_every_run(tmp_path):
    _images(tmp_path, ["a.jpg", "b.jpg"])
    for i, name in enumerate(("a.jpg", "b.jpg")):
        (tmp_path / f"{i}.jsonl").write_text(json.dumps({"image": name, "text": "t"}) + "\n")
        ingest([tmp_path / f"{i}.jsonl"], tmp_path / "r.lance", progress=False)
    runs = read_log(tmp_path / "r.lance")
    assert [r["sources"] for r in runs] == [[str(tmp_path / "0.jsonl")], [str(tmp_path / "1.jsonl")]]
    assert log_path(tmp_path / "r.lance").parent == tmp_path
