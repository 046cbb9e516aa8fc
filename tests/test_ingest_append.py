"""Appending adds only new ids; re-running changes nothing; a killed ingest leaves the last version intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import lance

from vlkit.data.ingest import ingest

from .conftest import COCO, FLICKR, needs_shared


def _ids(path):
    return sorted(lance.dataset(str(path)).to_table(columns=["id"]).column("id").to_pylist())


def test_append_is_idempotent(tmp_path):
    out = tmp_path / "coco.lance"
    ingest([COCO / "vqa_questions.json"], out, progress=False)
    first = _ids(out)
    assert 0 < len(first) < 76
    report = ingest([COCO / "captions.json"], out, progress=False)
    assert report.rows_added == 76 - len(first) and report.rows_existing == len(first)
    assert _ids(out) == sorted({*first, *_ids(out)}) and len(_ids(out)) == 76
    version = lance.dataset(str(out)).version
    again = ingest([COCO / "captions.json", COCO / "vqa_questions.json"], out, progress=False)
    assert again.rows_added == 0 and again.rows_existing == 76
    ds = lance.dataset(str(out))
    assert ds.version == version and ds.count_rows() == 76


def test_class_labels_survive_append(tmp_path):
    from .conftest import jpeg_bytes

    root = tmp_path / "classes"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        (root / cls / "1.jpg").write_bytes(jpeg_bytes())
    out = tmp_path / "c.lance"
    ingest([root], out, progress=False)
    (root / "ant").mkdir()
    (root / "ant" / "1.jpg").write_bytes(jpeg_bytes())
    (root / "dog" / "2.jpg").write_bytes(jpeg_bytes())
    ingest([root], out, progress=False)
    ds = lance.dataset(str(out))
    from vlkit.data.schema import class_names

    assert class_names(ds.schema) == ["cat", "dog", "ant"]
    rows = {r["id"]: r["label"] for r in ds.to_table(columns=["id", "label"]).to_pylist()}
    assert rows == {"cat/1.jpg": 0, "dog/1.jpg": 1, "ant/1.jpg": 2, "dog/2.jpg": 1}


@needs_shared
def test_killed_ingest_leaves_previous_version(tmp_path):
    captions = FLICKR / "captions.txt"
    head = tmp_path / "head.csv"
    head.write_text("".join(open(captions).readlines()[:201]))  # header + 40 images
    out = tmp_path / "f.lance"
    ingest([head], out, images_root=FLICKR / "images", progress=False)
    before = lance.dataset(str(out))
    version, ids = before.version, _ids(out)
    files_before = {p for p in out.rglob("*") if p.is_file()}

    proc = subprocess.Popen(
        [sys.executable, "-m", "vlkit", "ingest", str(captions), "--images-root", str(FLICKR / "images"),
         "--out", str(out), "--fragment-rows", "16", "--workers", "1", "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        new = {p for p in (out / "data").rglob("*") if p.is_file()} - files_before
        if len(new) >= 2:  # fragments of the new commit are being written
            break
        time.sleep(0.005)
    assert proc.poll() is None, "ingest finished before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    after = lance.dataset(str(out))
    assert after.version == version and _ids(out) == ids and after.count_rows() == 40
    after.validate()
    report = ingest([captions], out, images_root=FLICKR / "images", progress=False)
    assert report.rows_added == 960 and lance.dataset(str(out)).count_rows() == 1000


def test_extra_fields_become_columns_and_never_overwrite_core_ones(tmp_path):
    from .conftest import jpeg_bytes

    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(size=(20, 10)))
    (tmp_path / "d.jsonl").write_text(
        '{"image": "a.jpg", "text": "red", "source": "web", "width": 999, "score": 0.5, "tags": ["x"]}\n'
        '{"image": "b.jpg", "text": ["red", "small"], "score": 1.5, "tags": []}\n'
    )
    out = tmp_path / "d.lance"
    ingest([tmp_path / "d.jsonl"], out, progress=False)
    rows = {r["id"]: r for r in lance.dataset(str(out)).to_table().drop(["image"]).to_pylist()}
    assert rows["a.jpg"]["width"] == 48 and rows["a.jpg"]["extra_width"] == 999
    assert rows["a.jpg"]["source"].endswith("a.jpg") and rows["a.jpg"]["extra_source"] == "web"
    assert (rows["a.jpg"]["score"], rows["b.jpg"]["score"]) == (0.5, 1.5)
    assert rows["a.jpg"]["tags"] == ["x"] and rows["b.jpg"]["captions"] == ["red", "small"]
    assert rows["b.jpg"]["width"] == 20 and rows["b.jpg"]["extra_source"] is None
