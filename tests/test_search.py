"""Embeddings into the dataset, the LanceDB index, and search from Python and the command line."""

from __future__ import annotations

import json
import shutil

import lance
import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from vlkit.errors import VlkitError
from vlkit.inference import embed as embed_mod
from vlkit.inference.embed import IMAGE_COLUMN, TEXT_COLUMN, compute_embeddings, read_embeddings, write_embeddings
from vlkit.search.index import build_index, read_index_info
from vlkit.inference.loading import load_for_inference
from vlkit.search.searcher import QueryError, Searcher


@pytest.fixture(scope="module")
def loaded(trained_run):
    """The model in fp32: these tests compare the pipeline's embeddings with ones computed by hand."""
    loaded = load_for_inference(trained_run[0])
    loaded.precision = "fp32"
    return loaded


@pytest.fixture(scope="module")
def data(synth, tmp_path_factory):
    """A private copy of the synthetic dataset (embedding columns get written into it)."""
    path = tmp_path_factory.mktemp("search") / "synth.lance"
    shutil.copytree(synth, path)
    return path


@pytest.fixture(scope="module")
def index(loaded, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "index"
    build_index(loaded, data, out)
    return out


def _by_hand(loaded, ds: lance.LanceDataset, offsets: list[int]) -> torch.Tensor:
    """Image embeddings computed one image at a time, outside the batched pipeline."""
    transform = loaded.model.preprocess.image_transform(train=False)
    out = []
    with torch.no_grad():
        for _, data in ds.read_blobs("image", indices=offsets, preserve_order=True):
            out.append(loaded.model.encode_image(transform.normalize(transform(data)[None]))[0])
    return torch.stack(out)


def test_load_from_run_model_and_checkpoint(trained_run, loaded):
    run, _ = trained_run
    assert load_for_inference(run / "model").tag == loaded.tag
    best = load_for_inference(run / "checkpoints" / "best")
    latest = load_for_inference(run / "checkpoints" / "latest")
    assert best.embed_dim == latest.embed_dim == loaded.embed_dim
    with pytest.raises(VlkitError, match="no such run"):
        load_for_inference(run / "nope")
    with pytest.raises(VlkitError, match="not a vlkit run"):
        load_for_inference(run / "checkpoints" / "best" / "..")  # the checkpoints folder itself


def test_embed_adds_columns_without_rewriting_images(loaded, data):
    ds = lance.dataset(str(data))
    blobs_before = [b for _, b in ds.read_blobs("image", indices=[0, 7, 42], preserve_order=True)]
    files_before = {f.fragment_id: {d.path for d in f.data_files()} for f in ds.get_fragments()}
    emb = compute_embeddings(loaded, data)
    version = write_embeddings(data, emb, loaded.tag, str(loaded.source))
    ds = lance.dataset(str(data))
    assert ds.version == version
    # every data file of the old columns is still referenced: only new files were added
    for frag in ds.get_fragments():
        assert files_before[frag.fragment_id] < {d.path for d in frag.data_files()}
    assert [b for _, b in ds.read_blobs("image", indices=[0, 7, 42], preserve_order=True)] == blobs_before
    meta = read_embeddings(data)
    assert meta["vlkit.model"] == loaded.tag and meta["vlkit.dim"] == str(loaded.embed_dim)
    rows = ds.take([0, 7, 42], columns=["id", "captions", IMAGE_COLUMN, TEXT_COLUMN]).to_pylist()
    stored = torch.tensor([r[IMAGE_COLUMN] for r in rows])
    torch.testing.assert_close(stored, _by_hand(loaded, ds, [0, 7, 42]), atol=1e-5, rtol=1e-4)
    for r in rows:  # one embedding per caption, equal to encoding the caption directly
        assert len(r[TEXT_COLUMN]) == len(r["captions"])
        tok = loaded.tokenizer(r["captions"])
        with torch.no_grad():
            want = loaded.model.encode_text(tok["input_ids"], tok["attention_mask"])
        torch.testing.assert_close(torch.tensor(r[TEXT_COLUMN]), want, atol=1e-5, rtol=1e-4)
    # embedding again replaces the columns instead of adding more
    write_embeddings(data, emb, loaded.tag, str(loaded.source))
    names = lance.dataset(str(data)).schema.names
    assert names.count(IMAGE_COLUMN) == 1 and names.count(TEXT_COLUMN) == 1


def test_index_reuses_stored_embeddings(loaded, data, tmp_path, monkeypatch):
    write_embeddings(data, compute_embeddings(loaded, data), loaded.tag, str(loaded.source))

    def refuse(*args, **kwargs):
        raise AssertionError("embeddings were recomputed")

    monkeypatch.setattr("vlkit.search.index.compute_embeddings", refuse)
    info = build_index(loaded, data, tmp_path / "index")
    assert info.images == lance.dataset(str(data)).count_rows()
    assert embed_mod.read_embeddings(data)["vlkit.model"] == info.model_tag


def test_text_search_equals_brute_force(loaded, data, index):
    searcher = Searcher(index)
    emb = compute_embeddings(loaded, data)
    for query in ["a red circle", "a blue square above a green triangle", "two shapes"]:
        hits = searcher.search_text(query, k=10)
        tok = loaded.tokenizer([query])
        with torch.no_grad():
            q = loaded.model.encode_text(tok["input_ids"], tok["attention_mask"])[0]
        scores = (emb.image @ q).numpy()
        order = np.argsort(-scores, kind="stable")[:10]
        assert [h.id for h in hits] == [emb.ids[i] for i in order]
        np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)
        assert hits[0].caption in hits[0].captions


def test_image_search_finds_itself_and_its_captions(loaded, data, index):
    searcher = Searcher(index)
    ds = lance.dataset(str(data))
    for offset in (3, 150):
        row = ds.take([offset], columns=["id", "captions"]).to_pylist()[0]
        blob = next(iter(ds.read_blobs("image", indices=[offset])))[1]
        hits = searcher.search_image(blob, k=3)
        assert hits[0].id == row["id"] and hits[0].score == pytest.approx(1.0, abs=1e-4)
        texts = searcher.image_to_text(blob, k=5)
        emb = compute_embeddings(loaded, data)
        scores = (emb.text @ emb.image[emb.ids.index(row["id"])]).numpy()
        want = sorted(scores, reverse=True)[:5]
        np.testing.assert_allclose([t.score for t in texts], want, atol=1e-5)
        assert searcher.thumbnail(row["id"])[:2] == b"\xff\xd8"  # a JPEG
    assert searcher.thumbnail("no/such/id") is None


def test_approximate_index_keeps_recall(loaded, data, index, tmp_path):
    info = build_index(loaded, data, tmp_path / "ann", ann_threshold=100)
    assert info.search == {"images": "IVF_SQ", "captions": "IVF_SQ"}
    exact, approx = Searcher(index), Searcher(tmp_path / "ann")
    queries = ["a red circle", "a green square", "three shapes", "a yellow triangle below a purple circle"]
    found = [len({h.id for h in exact.search_text(q, 10)} & {h.id for h in approx.search_text(q, 10)})
             for q in queries]
    assert sum(found) / (10 * len(queries)) >= 0.9


def test_bad_queries(index):
    searcher = Searcher(index)
    with pytest.raises(QueryError, match="empty"):
        searcher.search_text("   ")
    for k in (0, 101, -1):
        with pytest.raises(QueryError, match="k must be"):
            searcher.search_text("a red circle", k)
    with pytest.raises(QueryError, match="not a readable image"):
        searcher.search_image(b"not an image at all")
    with pytest.raises(QueryError, match="empty"):
        searcher.search_image(b"")


def test_model_with_another_embedding_size_is_refused(index, tmp_path):
    from vlkit.models.io import save_model
    from vlkit.models.registry import create_model

    other = create_model("clip-tiny", embed_dim=16, vocab_size=64)
    save_model(other, tmp_path / "other")
    with pytest.raises(VlkitError, match="16 dimensions.*32-dimensional|rebuild"):
        Searcher(index, tmp_path / "other")


def test_cli_embed_index_search(trained_run, synth, data, tmp_path):
    run, _ = trained_run
    r = run_cli("embed", run, "--data", data, "--no-progress", "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert "caption embeddings" in r.stdout
    r = run_cli("index", run, "--data", data, "--out", tmp_path / "idx", "--no-progress", "--split", "val")
    assert r.returncode == 0, r.stderr
    info = read_index_info(tmp_path / "idx")
    assert info.split == "val" and info.search["images"] == "exact"
    r = run_cli("search", tmp_path / "idx", "a red circle", "--k", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["results"]) == 4
    scores = [h["score"] for h in out["results"]]
    assert scores == sorted(scores, reverse=True)
    image = next((synth.parent / "images").glob("*.png"))
    r = run_cli("search", tmp_path / "idx", "--image", image, "--captions", "--k", "2")
    assert r.returncode == 0, r.stderr and len(r.stdout.strip().splitlines()) == 2
    for args, message in [((tmp_path / "missing", "x"), "no such index"),
                          ((tmp_path / "idx", ""), "query is empty"),
                          ((tmp_path / "idx", "x", "--k", "0"), "k must be"),
                          ((tmp_path / "idx", "--image", tmp_path / "nope.jpg"), "no such image file")]:
        r = run_cli("search", *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
