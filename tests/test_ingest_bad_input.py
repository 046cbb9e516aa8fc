"""Bad input is skipped and listed (file, row, reason); --strict writes nothing; errors are one line."""

from __future__ import annotations

import json

import lance
import pytest

from vlkit.data.ingest import ingest, report_path
from vlkit.errors import DataError

from .conftest import jpeg_bytes, run_cli


@pytest.fixture()
def messy(tmp_path):
    """A caption CSV and JSONL over good and broken images."""
    img = tmp_path / "images"
    img.mkdir()
    good = jpeg_bytes()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (img / name).write_bytes(good)
    (img / "truncated.jpg").write_bytes(jpeg_bytes(size=(200, 200))[:300])
    (img / "zero.jpg").write_bytes(b"")
    (img / "text.jpg").write_text("this is not an image")
    csv = tmp_path / "captions.csv"
    csv.write_bytes(
        b"image,caption\n"
        b"a.jpg,a red square\n"              # row 2 ok
        b"a.jpg,another caption of a\n"      # row 3 ok
        b"b.jpg,\n"                          # row 4 empty caption (b still has row 5)
        b"b.jpg,a red block\n"               # row 5 ok
        b"c.jpg,caf\xe9 latin-1\n"           # row 6 undecodable (c has no other caption)
        b"truncated.jpg,cut short\n"         # row 7 truncated image
        b"zero.jpg,empty file\n"             # row 8 zero bytes
        b"text.jpg,not an image\n"           # row 9 not an image
        b"missing.jpg,no such file\n"        # row 10 missing
        b"a.jpg,too,many,fields\n"           # row 11 wrong field count
    )
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_bytes(
        b'{"image": "images/a.jpg", "text": "one more for a"}\n'
        b'{"image": "images/b.jpg", "text": ["x", 3]}\n'
        b"{not json}\n"
        b'{"text": "no image key"}\n'
    )
    return tmp_path, csv, jsonl


def test_problems_are_skipped_and_listed(messy):
    root, csv, _ = messy
    out = root / "d.lance"
    report = ingest([csv], out, images_root=root / "images", progress=False)
    ds = lance.dataset(str(out))
    rows = {r["id"]: r["captions"] for r in ds.to_table(columns=["id", "captions"]).to_pylist()}
    assert rows == {"a.jpg": ["a red square", "another caption of a"], "b.jpg": ["a red block"]}
    text = "\n".join(map(str, report.problems))
    assert f"{csv}:4: empty caption" in text
    assert f"{csv}:6: undecodable text" in text
    assert f"{csv}:11: expected 2 fields, found 4" in text
    by_image = {p.file.rsplit("/", 1)[-1]: p.reason.split(" (listed at")[0] for p in report.problems
                if p.file.endswith(".jpg")}
    assert by_image["truncated.jpg"].startswith("truncated or corrupt image")
    assert by_image["zero.jpg"] == "empty image file (0 bytes)"
    assert by_image["text.jpg"].startswith("not an image")
    assert by_image["missing.jpg"] == "image file not found"
    saved = json.loads(report_path(out).read_text())
    assert len(saved["problems"]) == len(report.problems) == 7
    assert {"file", "row", "reason"} <= set(saved["problems"][0])


def test_jsonl_problems(messy):
    root, _, jsonl = messy
    report = ingest([jsonl], root / "j.lance", progress=False)
    text = "\n".join(map(str, report.problems))
    assert f"{jsonl}:2: text: text is int, not a string" in text
    assert f"{jsonl}:3: invalid JSON" in text
    assert f"{jsonl}:4: missing 'image' path" in text
    assert report.rows_added == 1


def test_strict_writes_nothing(messy):
    root, csv, _ = messy
    out = root / "strict.lance"
    with pytest.raises(DataError, match="--strict: 7 problems found, nothing written"):
        ingest([csv], out, images_root=root / "images", strict=True, progress=False)
    assert not out.exists()
    assert report_path(out).exists()


def test_strict_leaves_existing_dataset_untouched(messy):
    root, csv, jsonl = messy
    out = root / "d.lance"
    ingest([jsonl], out, progress=False)
    before = lance.dataset(str(out)).version
    with pytest.raises(DataError):
        ingest([csv], out, images_root=root / "images", strict=True, progress=False)
    assert lance.dataset(str(out)).version == before


def test_cli_errors_are_one_line(messy, tmp_path):
    root, csv, _ = messy
    cases = [
        (["ingest", str(root / "nope.csv"), "--out", str(tmp_path / "x.lance")], "no such file"),
        (["ingest", str(csv), "--out", str(tmp_path / "y.lance"), "--strict", "--images-root", str(root / "images")],
         "--strict: 7 problems"),
        (["data", "info", str(tmp_path / "absent.lance")], "no such dataset"),
    ]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{ not json")
    cases.append((["ingest", str(bad_json), "--out", str(tmp_path / "z.lance")], "not valid JSON"))
    for args, needle in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        first = proc.stderr.strip().splitlines()[0]
        assert first.startswith("vlkit: error:") and needle in first, proc.stderr
