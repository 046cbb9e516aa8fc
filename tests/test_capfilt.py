"""CapFilt: the decision rule, writing the kept captions (a new version, or a new dataset), and the trust rules
of the command. The end-to-end test with a trained BLIP is in tests/test_blip_capfilt.py."""

from __future__ import annotations

import lance
import pytest

from vlkit.data.capfilt_store import DROPPED, SCORES, SOURCES, check_out, write_capfilt
from vlkit.errors import VlkitError
from vlkit.inference.capfilt import ORIGINAL, SYNTHETIC, ScoredText, decide

from .conftest import run_cli


@pytest.fixture()
def small(tmp_path):
    """A 12-image synthetic dataset of our own (the tests write versions into it)."""
    from vlkit.data.ingest import ingest
    from vlkit.data.synth import generate

    ingest([generate(tmp_path / "src", 12, seed=1)], tmp_path / "small.lance", progress=False)
    return tmp_path / "small.lance"


def _rows(path, version=None):
    ds = lance.dataset(str(path), version=version)
    names = [n for n in ("id", "captions", "split", SOURCES, SCORES, DROPPED) if n in ds.schema.names]
    return {r["id"]: r for r in ds.to_table(columns=names).to_pylist()}


def test_decide_keeps_at_threshold_and_rescues_the_best():
    texts = [ScoredText("a", ORIGINAL, 0.5), ScoredText("b", ORIGINAL, 0.49), ScoredText("c", SYNTHETIC, 0.9)]
    assert decide(texts, 0.5) is False
    assert [t.kept for t in texts] == [True, False, True]
    low = [ScoredText("a", ORIGINAL, 0.1), ScoredText("b", SYNTHETIC, 0.3), ScoredText("c", ORIGINAL, 0.2)]
    assert decide(low, 0.5) is True
    assert [t.kept for t in low] == [False, True, False]


def _decisions(rows, ids):
    """Drop every caption but the first of ``ids`` and add one synthetic caption to each."""
    out = {}
    for image_id in ids:
        caps = rows[image_id]["captions"]
        texts = [(caps[0], ORIGINAL, 0.9, True)] + [(c, ORIGINAL, 0.1, False) for c in caps[1:]]
        out[image_id] = texts + [(f"synthetic {image_id}", SYNTHETIC, 0.7, True)]
    return out


def test_new_version_keeps_the_old_and_leaves_other_rows(small):
    before = _rows(small)
    version = lance.dataset(str(small)).version
    chosen = sorted(before)[:5]
    outcome = write_capfilt(small, _decisions(before, chosen), {"threshold": 0.5})
    assert (outcome.version_before, outcome.copied) == (version, False) and outcome.version > version
    after = _rows(small)
    for image_id, row in after.items():
        if image_id in chosen:
            assert row["captions"] == [before[image_id]["captions"][0], f"synthetic {image_id}"]
            assert row[SOURCES] == [ORIGINAL, SYNTHETIC]
            assert row[SCORES] == pytest.approx([0.9, 0.7])
            assert row[DROPPED] == before[image_id]["captions"][1:]
        else:  # not filtered: captions as they were, every one original, no scores
            assert row["captions"] == before[image_id]["captions"]
            assert row[SOURCES] == [ORIGINAL] * len(row["captions"]) and row[SCORES] is None
        assert row["split"] == before[image_id]["split"]
    assert _rows(small, version) == before  # the version before is intact
    ds = lance.dataset(str(small))
    images = ds.take([0], columns=["image"]).column("image").to_pylist()
    assert images and images[0]  # the image column still reads
    # a second run over the first run's output remembers which captions were synthetic
    again = {i: [(c, ORIGINAL, 0.8, True) for c in after[i]["captions"]] for i in chosen}
    write_capfilt(small, again, {"threshold": 0.5})
    assert _rows(small)[chosen[0]][SOURCES] == [ORIGINAL, SYNTHETIC]


def test_out_writes_a_new_dataset_and_leaves_the_source(small, tmp_path):
    before = _rows(small)
    version = lance.dataset(str(small)).version
    chosen = sorted(before)[:3]
    out = tmp_path / "filtered.lance"
    outcome = write_capfilt(small, _decisions(before, chosen), {"threshold": 0.5}, out)
    assert outcome.copied and outcome.path == out
    assert lance.dataset(str(small)).version == version and _rows(small) == before
    written = _rows(out)
    assert set(written) == set(before)
    assert written[chosen[0]]["captions"][-1] == f"synthetic {chosen[0]}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".filtered.lance")]  # no temporary left
    src_images = lance.dataset(str(small)).take([0, 5], columns=["image"]).column("image").to_pylist()
    out_images = lance.dataset(str(out)).take([0, 5], columns=["image"]).column("image").to_pylist()
    assert src_images == out_images
    with pytest.raises(VlkitError, match="already exists"):
        write_capfilt(small, _decisions(before, chosen), {}, out)


def test_check_out_refuses(small, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(VlkitError, match="already exists"):
        check_out(small, tmp_path / "taken")
    with pytest.raises(VlkitError, match="inside the source"):
        check_out(small, small / "sub.lance")
    with pytest.raises(VlkitError, match="no such folder"):
        check_out(small, tmp_path / "missing" / "x.lance")
    check_out(small, None)
    check_out(small, tmp_path / "new.lance")


def test_cli_refuses_before_loading_a_model(small, tmp_path):
    version = lance.dataset(str(small)).version
    cases = [
        (["--threshold", "1.5"], "--threshold must be in [0, 1]"),
        (["--num-synthetic", "3", "--beams", "2"], "needs at least as many --beams"),
        (["--split", "nosuch"], "nosuch"),
        (["--out", str(small)], "already exists"),
        (["--decisions", str(small)], "already exists"),
        (["--decisions", str(tmp_path / "nosuch" / "d.jsonl")], "no such folder"),
    ]
    for extra, message in cases:
        proc = run_cli("capfilt", tmp_path / "no-model", "--data", small, *extra)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("capfilt", tmp_path / "no-model", "--data", small)
    assert proc.returncode == 2 and "no such run" in proc.stderr
    assert lance.dataset(str(small)).version == version
