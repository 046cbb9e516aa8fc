"""vlkit serve/search --runtime onnx: queries embedded by onnxruntime find the same hits with the same scores
as the PyTorch runtime, from an ONNX export folder (no PyTorch weights read) or the model exported at load."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from tests.test_export_torchscript import make_run
from vlkit.errors import DataError, VlkitError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "a red circle on a blue square"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny CLIP run, a 40-image synthetic dataset indexed with it, and its ONNX export."""
    from vlkit.data.ingest import ingest
    from vlkit.data.synth import generate
    from vlkit.export.onnx import export_onnx
    from vlkit.inference.loading import load_for_inference
    from vlkit.search.index import build_index

    root = tmp_path_factory.mktemp("serve-onnx")
    run, _, _ = make_run(root)
    source = generate(root / "shapes", 40, seed=3)
    ingest([source], root / "shapes.lance", progress=False)
    loaded = load_for_inference(run)
    loaded.precision = "fp32"  # where embeddings may use bf16 autocast, the index is built in fp32
    build_index(loaded, root / "shapes.lance", root / "index")
    export_onnx(loaded, root / "onnx")
    images = sorted((root / "shapes" / "images").iterdir())
    return {"root": root, "run": run, "index": root / "index", "onnx": root / "onnx",
            "image": images[5].read_bytes()}


@pytest.fixture(scope="module")
def torch_searcher(setup):
    from vlkit.search.searcher import Searcher

    searcher = Searcher(setup["index"])
    searcher.loaded.precision = "fp32"  # queries in fp32, as onnxruntime computes them
    return searcher


def _same_hits(got, want, key="id"):
    """Same scores rank by rank (1e-4) and the same ids, where two neighbours' scores are not tied (1e-5)."""
    assert len(got) == len(want) > 0
    assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-4)
    for i, (g, w) in enumerate(zip(got, want)):
        tied = any(abs(want[j].score - w.score) < 1e-5 for j in (i - 1, i + 1) if 0 <= j < len(want))
        if not tied:
            assert getattr(g, key) == getattr(w, key)
    extra = {getattr(h, key) for h in got} - {getattr(h, key) for h in want}
    assert all(abs(h.score - want[-1].score) < 1e-5 for h in got if getattr(h, key) in extra)  # a tie at place k


def _check_searcher(onnx, reference, image):
    from vlkit.export.onnx_runtime import OnnxEncoders

    assert isinstance(onnx.loaded.model, OnnxEncoders)
    assert onnx.model_matches and onnx.loaded.tag == reference.loaded.tag
    _same_hits(onnx.search_text(TEXT, 8), reference.search_text(TEXT, 8))
    _same_hits(onnx.search_image(image, 8), reference.search_image(image, 8))
    _same_hits(onnx.image_to_text(image, 8), reference.image_to_text(image, 8), key="text")
    with torch.no_grad():  # the query embeddings themselves
        assert (onnx.embed_text(TEXT) - reference.embed_text(TEXT)).abs().max() <= 1e-4
        assert (onnx.embed_image(image) - reference.embed_image(image)).abs().max() <= 1e-4


def test_an_onnx_export_answers_like_torch_without_the_torch_weights(setup, torch_searcher, tmp_path, monkeypatch):
    """The export folder copied alone (no model.safetensors anywhere near it) and PyTorch model loading
    disabled: the queries still run, and match the PyTorch runtime."""
    import vlkit.inference.loading as loading
    from vlkit.search.searcher import Searcher

    alone = tmp_path / "exported"
    shutil.copytree(setup["onnx"], alone)

    def no_torch(*args, **kwargs):
        raise AssertionError("the PyTorch model was loaded")

    monkeypatch.setattr(loading, "load_model", no_torch)
    monkeypatch.setattr(loading, "_load_checkpoint", no_torch)
    _check_searcher(Searcher(setup["index"], alone, runtime="onnx"), torch_searcher, setup["image"])


def test_the_model_exported_at_load_answers_like_torch(setup, torch_searcher, tmp_path, monkeypatch):
    """The index's own PyTorch model, exported to a temporary folder that is gone once the sessions hold it."""
    import tempfile

    from vlkit.search.searcher import Searcher

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    onnx = Searcher(setup["index"], runtime="onnx")
    assert list(tmp_path.iterdir()) == []
    _check_searcher(onnx, torch_searcher, setup["image"])


def test_the_served_api_answers_like_torch(setup, torch_searcher):
    from fastapi.testclient import TestClient

    from vlkit.search.searcher import Searcher
    from vlkit.search.server import create_app

    onnx = Searcher(setup["index"], setup["onnx"], runtime="onnx")
    with TestClient(create_app(onnx), base_url="http://127.0.0.1:8000") as client:
        text = client.get("/api/search", params={"q": TEXT, "k": 5}).json()["results"]
        image = client.post("/api/search/image?k=5", content=setup["image"],
                            headers={"Content-Type": "image/png"}).json()["results"]
        info = client.get("/api/info").json()
    for got, want in ((text, torch_searcher.search_text(TEXT, 5)),
                      (image, torch_searcher.search_image(setup["image"], 5))):
        assert [h["score"] for h in got] == pytest.approx([h.score for h in want], abs=1e-4)
        assert {h["id"] for h in got} == {h.id for h in want}
    assert info["query_model_tag"] == torch_searcher.loaded.tag


def test_vlkit_search_runtime_onnx_prints_the_torch_results(setup, capsys):
    from vlkit.cli import main

    outputs = {}
    for runtime in ("torch", "onnx"):
        args = ["search", str(setup["index"]), TEXT, "--k", "4", "--json", "--runtime", runtime]
        assert main(args + (["--model", str(setup["onnx"])] if runtime == "onnx" else [])) == 0
        captured = capsys.readouterr()
        outputs[runtime] = json.loads(captured.out)["results"]
        assert captured.err == ""  # the export's model is the index's: no warning
    assert [h["score"] for h in outputs["onnx"]] == pytest.approx([h["score"] for h in outputs["torch"]], abs=1e-4)
    assert {h["id"] for h in outputs["onnx"]} == {h["id"] for h in outputs["torch"]}


def test_rerank_with_onnx_and_a_missing_onnxruntime_are_one_line(setup, capsys, monkeypatch):
    from vlkit.cli import main

    assert main(["search", str(setup["index"]), TEXT, "--rerank", "5", "--runtime", "onnx"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--rerank needs the PyTorch model" in lines[0]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    assert main(["search", str(setup["index"]), TEXT, "--runtime", "onnx"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--runtime onnx needs onnxruntime: pip install 'vlkit[onnx]'" in lines[0]
    assert main(["serve", str(setup["index"]), "--port", "0", "--runtime", "onnx"]) == 2
    assert "pip install 'vlkit[onnx]'" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda m: m["image"].update(file="../image_encoder.onnx"), r"'image\.file' must be a file name inside"),
    (lambda m: m["text"].update(file="missing.onnx"), r"'text\.file' names missing\.onnx, which is not a file"),
    (lambda m: m["preprocess"].update(mean=[0.5, 0.5]), r"'preprocess\.mean' must be three numbers"),
    (lambda m: m.pop("embed_dim"), r"'embed_dim' is missing"),
    (lambda m: m.update(format="torchscript"), r"not an ONNX export"),
])
def test_a_bad_export_json_is_one_error_naming_the_key(setup, tmp_path, change, message):
    from vlkit.inference.loading import load_for_inference

    folder = tmp_path / "onnx"
    shutil.copytree(setup["onnx"], folder)
    meta = json.loads((folder / "export.json").read_text())
    change(meta)
    (folder / "export.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"export\.json: " + message):
        from vlkit.export.onnx_runtime import load_onnx_export

        load_onnx_export(folder)
    if meta.get("format") == "onnx":
        with pytest.raises(DataError, match=message):
            load_for_inference(folder, runtime="onnx")


def test_an_unknown_runtime_is_refused(setup):
    from vlkit.inference.loading import load_for_inference

    with pytest.raises(VlkitError, match="runtime must be one of torch, onnx, not 'tensorrt'"):
        load_for_inference(setup["onnx"], runtime="tensorrt")


def test_an_index_embedded_in_bf16_gets_a_note(setup, tmp_path, capsys):
    """onnxruntime embeds in fp32 where the torch runtime follows the index's bf16: same hits, a one-line note,
    scores apart by bf16 rounding only."""
    from vlkit.cli import main
    from vlkit.inference.loading import load_for_inference
    from vlkit.search.index import build_index

    loaded = load_for_inference(setup["run"])
    loaded.precision = "bf16"
    info = build_index(loaded, setup["root"] / "shapes.lance", tmp_path / "index")
    if getattr(info, "precision", "fp32") != "bf16":
        pytest.skip("this vlkit builds indexes in fp32 only")
    results = {}
    for runtime in ("torch", "onnx"):
        args = ["search", str(tmp_path / "index"), TEXT, "--k", "4", "--json", "--runtime", runtime]
        assert main(args + (["--model", str(setup["onnx"])] if runtime == "onnx" else [])) == 0
        captured = capsys.readouterr()
        results[runtime] = json.loads(captured.out)["results"]
        notes = captured.err.strip().splitlines()
        assert notes == ([] if runtime == "torch" else [notes[0]])
    assert "the index was embedded in bf16; onnxruntime embeds queries in fp32" in notes[0]
    assert {h["id"] for h in results["onnx"]} == {h["id"] for h in results["torch"]}
    assert [h["score"] for h in results["onnx"]] == pytest.approx([h["score"] for h in results["torch"]], abs=2e-2)
