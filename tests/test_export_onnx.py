"""vlkit export --format onnx: the ONNX encoders run by onnxruntime equal encode_image/encode_text."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

import vlkit
from tests.conftest import run_cli
from vlkit.errors import VlkitError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red circle on a blue square", "two green triangles", "a small yellow star above a big circle",
            "one square"]


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _listing(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A saved clip-tiny (word vocabulary) exported once through the command line."""
    from vlkit.data.text import build_word_tokenizer
    from vlkit.models.io import save_model

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(CAPTIONS, max_length=12)
    model = vlkit.create_model("clip-tiny", context_length=12, eos_token_id=tokenizer.token_id("[SEP]")).eval()
    save_model(model, root / "model", tokenizer)
    proc = run_cli("export", root / "model", "--format", "onnx", "--out", root / "onnx", "--opset", "18")
    assert proc.returncode == 0, proc.stderr
    return root, model, tokenizer, proc


def test_onnxruntime_equals_the_encoders(exported):
    """Two batch sizes and two text lengths (captions through the exported tokenizer, padded rows included)."""
    from vlkit.data.text import TextTokenizer

    root, model, _, proc = exported
    assert "exported clip" in proc.stdout and proc.stderr.strip() == ""
    out = root / "onnx"
    image, text = _session(out / "image_encoder.onnx"), _session(out / "text_encoder.onnx")
    assert [i.name for i in text.get_inputs()] == ["input_ids", "attention_mask"]
    tokenizer = TextTokenizer(out / "tokenizer.json", max_length=12)
    gen = torch.Generator().manual_seed(1)
    for batch, texts in [(2, CAPTIONS[1:3]), (3, [CAPTIONS[3], CAPTIONS[1], "one circle"])]:
        pixels = torch.randn(batch, 3, 32, 32, generator=gen)
        got = torch.from_numpy(image.run(None, {"pixels": pixels.numpy()})[0])
        with torch.no_grad():
            want = model.encode_image(pixels)
        assert got.shape == (batch, 32)
        assert (got - want).abs().max() <= 1e-4
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(batch), atol=1e-5, rtol=0)  # L2-normalised
        feeds = tokenizer(texts)
        assert feeds["attention_mask"].min() == 0  # a padded row is exercised
        got = torch.from_numpy(text.run(None, {k: v.numpy() for k, v in feeds.items()})[0])
        with torch.no_grad():
            want = model.encode_text(**feeds)
        assert got.shape == (batch, 32)
        assert (got - want).abs().max() <= 1e-4
    lengths = {tokenizer(t)["input_ids"].shape[1] for t in (CAPTIONS[1:3], [CAPTIONS[3], CAPTIONS[1], "one circle"])}
    assert len(lengths) == 2  # two text lengths went through the dynamic axis


def test_export_json_holds_what_it_claims(exported):
    root, model, tokenizer, _ = exported
    out = root / "onnx"
    report = json.loads((out / "export.json").read_text())
    digest = hashlib.sha256((root / "model" / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert report["format"] == "onnx" and report["model"] == "clip"
    assert report["fingerprint"] == digest and report["opset"] == 18 and report["embed_dim"] == 32
    pre = report["preprocess"]
    assert pre["image_size"] == 32 and pre["context_length"] == 12
    assert pre["mean"] == pytest.approx(list(model.preprocess.mean))
    assert pre["std"] == pytest.approx(list(model.preprocess.std))
    assert pre["tokenizer"] == "tokenizer.json" and pre["pad_id"] == tokenizer.pad_id
    assert 0 <= report["max_abs_diff"]["image"] <= 1e-4 and 0 <= report["max_abs_diff"]["text"] <= 1e-4
    assert report["checked"] == {"batch": [2, 3], "length": [5, 12]}
    for part, name, inputs in [("image", "image_encoder.onnx", ["pixels"]),
                               ("text", "text_encoder.onnx", ["input_ids", "attention_mask"])]:
        graph = onnx.load(str(out / name))
        assert report[part]["file"] == name
        assert {o.domain or "ai.onnx": o.version for o in graph.opset_import}["ai.onnx"] == 18
        shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
        assert list(shapes) == inputs
        assert all(shapes[k][0] == "batch" for k in inputs)  # dynamic batch axis, named as export.json says
        assert {k: [s if isinstance(s, int) else "batch" if s == "batch" else "length" for s in v]
                for k, v in shapes.items()} == report[part]["inputs"]
    from vlkit.data.text import TextTokenizer

    copied = TextTokenizer(out / "tokenizer.json", max_length=12)
    assert torch.equal(copied(CAPTIONS)["input_ids"], tokenizer(CAPTIONS)["input_ids"])


def test_foreign_out_folder_is_refused(exported, tmp_path):
    root = exported[0]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = run_cli("export", root / "model", "--out", foreign, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an earlier vlkit export" in lines[0]
    assert _listing(foreign) == {"notes.txt": b"keep me"} and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_bad_run_path_is_one_line(tmp_path):
    proc = run_cli("export", tmp_path / "nope", "--out", tmp_path / "onnx", timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope: no such run, model or checkpoint" in lines[0]
    assert not (tmp_path / "onnx").exists()


def test_a_failed_check_leaves_the_earlier_export_as_it_was(exported, tmp_path):
    """An export whose outputs miss the tolerance (here a negative one) raises and replaces nothing."""
    from vlkit.export.onnx import export_onnx
    from vlkit.inference.loading import load_for_inference

    root = exported[0]
    earlier = tmp_path / "earlier"
    shutil.copytree(root / "onnx", earlier)
    before = _listing(earlier)
    loaded = load_for_inference(root / "model")
    with pytest.raises(VlkitError, match=r"clip: the ONNX \w+ encoder differs from PyTorch"):
        export_onnx(loaded, earlier, tolerance=-1.0)
    assert _listing(earlier) == before and sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]


def test_a_model_without_encoders_is_one_clear_error(tmp_path):
    from vlkit.export.onnx import export_onnx
    from vlkit.inference.loading import LoadedModel

    class NoText(torch.nn.Module):
        architecture = "toy"

        def encode_image(self, images):
            return images.flatten(1)

    with pytest.raises(VlkitError, match="toy: the model has no encode_text"):
        export_onnx(LoadedModel(NoText(), None, tmp_path, "x"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_brivl_two_tower_exports(tmp_path):
    """BriVL (EfficientNet + MSPP, MiniLM + self-attention): the second family; the check inside the export
    compares onnxruntime with PyTorch, and a re-run here compares again on other inputs."""
    from vlkit.export.onnx import export_onnx
    from vlkit.models.io import load_tokenizer
    from vlkit.inference.loading import LoadedModel

    torch.manual_seed(0)
    model = vlkit.create_model("brivl-tiny").eval()
    loaded = LoadedModel(model, load_tokenizer(tmp_path, model), tmp_path, "brivl-test")
    report = export_onnx(loaded, tmp_path / "onnx")
    assert report.model == "brivl" and max(report.max_abs_diff.values()) <= 1e-4
    size = model.preprocess.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    got = _session(tmp_path / "onnx" / "image_encoder.onnx").run(None, {"pixels": pixels.numpy()})[0]
    with torch.no_grad():
        assert (torch.from_numpy(got) - model.encode_image(pixels)).abs().max() <= 1e-4


def test_hf_format_writes_a_clip_model_transformers_loads(exported, tmp_path, capsys):
    """--format hf: transformers' CLIPModel from the folder gives the same normalised embeddings."""
    transformers = pytest.importorskip("transformers")
    from vlkit.cli import main

    root, model, tokenizer, _ = exported
    assert main(["export", str(root / "model"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "Hugging Face CLIPModel" in capsys.readouterr().out
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    feeds = tokenizer(CAPTIONS[:2])
    with torch.no_grad():
        image = hf.get_image_features(pixel_values=pixels)
        text = hf.get_text_features(**feeds)
        image = getattr(image, "pooler_output", image)
        text = getattr(text, "pooler_output", text)
        torch.testing.assert_close(torch.nn.functional.normalize(image, dim=-1), model.encode_image(pixels),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.nn.functional.normalize(text, dim=-1), model.encode_text(**feeds),
                                   atol=1e-5, rtol=0)
    assert main(["export", str(root / "model"), "--format", "hf", "--out", str(root / "onnx")]) == 2  # not a model folder
    assert "holds a vlkit export" in capsys.readouterr().err


def test_missing_onnxruntime_is_one_line(monkeypatch):
    import sys

    from vlkit.export.onnx import require_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(VlkitError, match=r"onnxruntime is missing\): pip install 'vlkit\[onnx\]'"):
        require_onnx()


def test_the_card_snippet_runs_with_onnxruntime_alone(exported):
    """README.md's code, run in a fresh interpreter in the export folder: the embeddings equal the model's and
    no vlkit module is imported."""
    import re
    import subprocess
    import sys

    from vlkit.data.text import TextTokenizer

    root, model, _, _ = exported
    out = root / "onnx"
    card = (out / "README.md").read_text()
    assert card.startswith("# clip `") and "(ONNX)" in card.splitlines()[0]
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code += "\nimport json, sys\nprint(json.dumps({'vlkit': any(m.split('.')[0] == 'vlkit' for m in sys.modules), " \
            "'text': text_embeds.tolist(), 'image': image_embeds.tolist()}))\n"
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=out, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["vlkit"] is False
    feeds = TextTokenizer(out / "tokenizer.json", max_length=12)(["a photo of a dog"])
    with torch.no_grad():
        assert (torch.tensor(got["text"]) - model.encode_text(**feeds)).abs().max() <= 1e-4
        assert (torch.tensor(got["image"]) - model.encode_image(torch.zeros(1, 3, 32, 32))).abs().max() <= 1e-4
