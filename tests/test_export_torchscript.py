"""vlkit export --format torchscript: frozen traces equal encode_image/encode_text at other batch sizes and text
lengths than traced, load with torch.jit.load without vlkit, and come with a model card built from the run."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import vlkit
from tests.conftest import run_cli
from vlkit.errors import VlkitError

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.\w+` is deprecated:DeprecationWarning")]

CAPTIONS = ["a red circle on a blue square", "two green triangles", "a small yellow star above a big circle",
            "one square"]
RUN_CONFIG = """\
model:
  name: clip-tiny
  pretrained: null
datasets:
  shapes:
    path: /data/shapes.lance
    train_split: train
    val_split: val
  extra:
    path: /data/extra.lance
    train_split: all
    val_split: null
tasks:
- name: retrieval
  dataset: shapes
- name: retrieval
  dataset: extra
epochs: 3
max_steps: null
batch_size: 16
seed: 7
"""
METRICS = [{"step": 1, "train/loss": 2.0},
           {"step": 5, "val/shapes/t2i_r1": 40.0, "val/shapes/rsum": 300.0},
           {"step": 10, "train/loss": 1.25},
           {"step": 10, "val/shapes/t2i_r1": 62.5, "val/shapes/rsum": 412.25}]


def make_run(root):
    """A run folder as training leaves it: ``model/`` (a clip-tiny with a word tokenizer), ``config.yaml`` with two
    datasets, ``metrics.jsonl`` with two evaluations and a ``vlkit eval`` report. Returns (run, model, tokenizer)."""
    from vlkit.data.text import build_word_tokenizer
    from vlkit.models.io import save_model
    from vlkit.utils.fs import write_marker

    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(CAPTIONS, max_length=12)
    model = vlkit.create_model("clip-tiny", context_length=12, eos_token_id=tokenizer.token_id("[SEP]")).eval()
    run = root / "run"
    save_model(model, run / "model", tokenizer)
    (run / "config.yaml").write_text(RUN_CONFIG)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in METRICS))
    report = run / "eval-test"
    report.mkdir()
    write_marker(report, "report")
    (report / "metrics.json").write_text(json.dumps({"task": "retrieval", "dataset": "/data/shapes.lance",
                                                     "split": "test", "metrics": {"test/shapes/i2t_r5": 55.5}}))
    return run, model, tokenizer


def _listing(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchscript")
    run, model, tokenizer = make_run(root)
    proc = run_cli("export", run, "--format", "torchscript", "--out", root / "ts")
    assert proc.returncode == 0, proc.stderr
    return root, model, tokenizer, proc


def test_the_files_equal_the_encoders_at_other_shapes(exported):
    """Traced at batch 2 and text length 8; run at batches 1 and 4 and two other lengths (padded rows included)."""
    from vlkit.data.text import TextTokenizer

    root, model, _, proc = exported
    assert "exported clip" in proc.stdout and "TorchScript" in proc.stdout and proc.stderr.strip() == ""
    out = root / "ts"
    image, text = torch.jit.load(str(out / "image_encoder.pt")), torch.jit.load(str(out / "text_encoder.pt"))
    tokenizer = TextTokenizer(out / "tokenizer.json", max_length=12)
    gen = torch.Generator().manual_seed(1)
    lengths = set()
    for batch, texts in [(1, [CAPTIONS[3]]), (4, CAPTIONS)]:
        pixels = torch.randn(batch, 3, 32, 32, generator=gen)
        feeds = tokenizer(texts)
        lengths.add(feeds["input_ids"].shape[1])
        with torch.no_grad():
            got_image, want_image = image(pixels), model.encode_image(pixels)
            got_text, want_text = text(feeds["input_ids"], feeds["attention_mask"]), model.encode_text(**feeds)
        assert got_image.shape == (batch, 32) and got_text.shape == (batch, 32)
        assert (got_image - want_image).abs().max() <= 1e-4
        assert (got_text - want_text).abs().max() <= 1e-4
    assert len(lengths) == 2 and 8 not in lengths  # neither the traced length nor one length only


def test_the_card_snippet_runs_without_vlkit(exported):
    """The README's code, run in a fresh interpreter in the export folder: no vlkit module is imported and the
    embeddings equal the model's."""
    from vlkit.data.text import TextTokenizer

    root, model, _, _ = exported
    out = root / "ts"
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    code += "\nimport json, sys\nprint(json.dumps({'vlkit': any(m.split('.')[0] == 'vlkit' for m in sys.modules), " \
            "'ids': enc.ids, 'text': text_embeds.tolist(), 'image': image_embeds.tolist()}))\n"
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=out, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["vlkit"] is False
    feeds = TextTokenizer(out / "tokenizer.json", max_length=12)(["a photo of a dog"])
    assert got["ids"] == feeds["input_ids"][0].tolist()
    with torch.no_grad():
        assert (torch.tensor(got["text"]) - model.encode_text(**feeds)).abs().max() <= 1e-4
        assert (torch.tensor(got["image"]) - model.encode_image(torch.zeros(1, 3, 32, 32))).abs().max() <= 1e-4


def test_export_json_and_the_card_hold_what_the_run_recorded(exported):
    root, _, tokenizer, _ = exported
    out = root / "ts"
    report = json.loads((out / "export.json").read_text())
    digest = hashlib.sha256((root / "run" / "model" / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert report["format"] == "torchscript" and report["model"] == "clip" and report["fingerprint"] == digest
    assert report["embed_dim"] == 32 and report["image"]["file"] == "image_encoder.pt"
    assert report["checked"] == {"batch": [2, 3], "length": [5, 12]}
    assert 0 <= report["max_abs_diff"]["image"] <= 1e-4 and 0 <= report["max_abs_diff"]["text"] <= 1e-4
    assert report["preprocess"]["pad_id"] == tokenizer.pad_id and report["preprocess"]["context_length"] == 12
    card = (out / "README.md").read_text()
    assert card.startswith(f"# clip `{digest}` (TorchScript)")
    rows = {line for line in card.splitlines() if line.startswith("|")}
    assert "| shapes | `/data/shapes.lance` | train | val | retrieval |" in rows
    assert "| extra | `/data/extra.lance` | all | - | retrieval |" in rows
    assert "epochs 3" in card and "batch size 16" in card and "seed 7" in card
    # the last evaluation (step 10), not the earlier one, and no training losses
    assert "step 10" in card and "| val/shapes/t2i_r1 | 62.5 |" in rows and "| val/shapes/rsum | 412.2 |" in rows
    assert "| 40 |" not in card and "train/loss" not in card
    assert "`eval-test`" in card and "| test/shapes/i2t_r5 | 55.5 |" in rows
    params = sum(p.numel() for p in exported[1].parameters())
    assert f"{params:,} parameters" in card and "32-d" in card and "at most 12 tokens" in card


def test_a_foreign_out_folder_is_refused_in_one_line(exported, tmp_path, capsys):
    from vlkit.cli import main

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", str(exported[0] / "run"), "--format", "torchscript", "--out", str(foreign)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not an earlier vlkit export" in lines[0]
    assert _listing(foreign) == {"notes.txt": b"keep me"} and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_failed_check_leaves_the_earlier_export_as_it_was(exported, tmp_path):
    from vlkit.export.torchscript import export_torchscript
    from vlkit.inference.loading import load_for_inference

    earlier = tmp_path / "earlier"
    shutil.copytree(exported[0] / "ts", earlier)
    before = _listing(earlier)
    with pytest.raises(VlkitError, match=r"clip: the TorchScript \w+ encoder differs from PyTorch"):
        export_torchscript(load_for_inference(exported[0] / "run"), earlier, tolerance=-1.0)
    assert _listing(earlier) == before and sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]


def test_coca_exports_with_a_dynamic_text_length(tmp_path):
    """CoCa's ONNX export fixes its text length; its TorchScript trace runs at any length up to the context.
    A model folder outside a run gets a card that says its training is not recorded."""
    from vlkit.data.text import build_word_tokenizer
    from vlkit.export.torchscript import export_torchscript
    from vlkit.inference.loading import LoadedModel

    torch.manual_seed(0)
    model = vlkit.create_model("coca-tiny").eval()
    context = model.preprocess.context_length
    tokenizer = build_word_tokenizer(CAPTIONS, max_length=context)
    report = export_torchscript(LoadedModel(model, tokenizer, tmp_path, "coca-test"), tmp_path / "ts")
    assert report.model == "coca" and max(report.max_abs_diff.values()) <= 1e-4
    text = torch.jit.load(str(tmp_path / "ts" / "text_encoder.pt"))
    gen = torch.Generator().manual_seed(2)
    for length in (3, context):
        ids = torch.randint(5, tokenizer.vocab_size, (2, length), generator=gen)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            assert (text(ids, mask) - model.encode_text(ids, mask)).abs().max() <= 1e-4
    assert "without its training run" in (tmp_path / "ts" / "README.md").read_text()


def test_a_model_without_encoders_is_one_clear_error(tmp_path):
    from vlkit.export.torchscript import export_torchscript
    from vlkit.inference.loading import LoadedModel

    class NoText(torch.nn.Module):
        architecture = "toy"

        def encode_image(self, images):
            return images.flatten(1)

    with pytest.raises(VlkitError, match="toy: the model has no encode_text"):
        export_torchscript(LoadedModel(NoText(), None, tmp_path, "x"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
