"""vlkit export --format hf: a CLIP as a folder transformers loads with the same embeddings, with its model card;
the families that map onto no transformers class are refused in one line and nothing is written."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

import vlkit
from tests.test_export_torchscript import CAPTIONS, make_run
from vlkit.errors import VlkitError

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from vlkit.cli import main

    root = tmp_path_factory.mktemp("hf")
    run, model, tokenizer = make_run(root)
    assert main(["export", str(run), "--format", "hf", "--out", str(root / "hf")]) == 0
    return root, model, tokenizer


def _features(out):
    return getattr(out, "pooler_output", out)


def test_transformers_loads_the_folder_with_the_same_embeddings(exported):
    """Captions through the exported tokenizer (a padded row included) and random images, batch 3."""
    from vlkit.data.text import TextTokenizer

    root, model, _ = exported
    out = root / "hf"
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    assert type(hf).__name__ == "CLIPModel"
    feeds = TextTokenizer(out / "tokenizer.json", max_length=12)(CAPTIONS[1:])
    assert feeds["attention_mask"].min() == 0
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        text = F.normalize(_features(hf.get_text_features(**feeds)), dim=-1)
        image = F.normalize(_features(hf.get_image_features(pixel_values=pixels)), dim=-1)
        assert (text - model.encode_text(**feeds)).abs().max() <= 1e-4
        assert (image - model.encode_image(pixels)).abs().max() <= 1e-4
    assert json.loads((out / "preprocessor_config.json").read_text())["crop_size"] == {"height": 32, "width": 32}


def test_the_report_and_the_card(exported):
    root, _, _ = exported
    out = root / "hf"
    digest = hashlib.sha256((root / "run" / "model" / "model.safetensors").read_bytes()).hexdigest()[:12]
    report = json.loads((out / "vlkit_export.json").read_text())
    assert report["format"] == "hf" and report["class"] == "CLIPModel" and report["fingerprint"] == digest
    assert 0 <= report["max_abs_diff"]["image"] <= 1e-4 and 0 <= report["max_abs_diff"]["text"] <= 1e-4
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"# clip `{digest}` (Hugging Face transformers)" in card
    assert "| shapes | `/data/shapes.lance` | train | val | retrieval |" in card
    assert "| val/shapes/t2i_r1 | 62.5 |" in card and "CLIPModel.from_pretrained" in card


def test_exporting_again_replaces_the_export_and_a_foreign_folder_is_refused(exported, tmp_path, capsys):
    from vlkit.cli import main

    root, _, _ = exported
    again = tmp_path / "again"
    assert main(["export", str(root / "run"), "--format", "hf", "--out", str(again)]) == 0
    (again / "model.safetensors").write_bytes(b"stale")
    assert main(["export", str(root / "run"), "--format", "hf", "--out", str(again)]) == 0  # an earlier export
    assert (again / "model.safetensors").read_bytes() == (root / "hf" / "model.safetensors").read_bytes()
    capsys.readouterr()
    foreign = tmp_path / "hub-checkout"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    assert main(["export", str(root / "run"), "--format", "hf", "--out", str(foreign)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "hub-checkout" in lines[0] and "name a new folder" in lines[0]
    assert [p.name for p in foreign.iterdir()] == ["config.json"]


@pytest.mark.parametrize("name", ["brivl-tiny", "coca-tiny", "blip-tiny", "albef-tiny"])
def test_families_without_a_transformers_class_are_refused(name, tmp_path):
    from vlkit.export.hf import export_hf_folder
    from vlkit.inference.loading import LoadedModel

    model = vlkit.create_model(name).eval()
    family = model.architecture
    with pytest.raises(VlkitError) as err:
        export_hf_folder(LoadedModel(model, None, tmp_path, "x"), tmp_path / "hf")
    message = str(err.value)
    assert message.startswith(f"{family}: --format hf exports CLIP models only (as transformers CLIPModel): ")
    assert message.endswith("use --format onnx or --format torchscript") and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_a_clip_hf_cannot_reproduce_is_refused(tmp_path):
    """Mean pooling of the image tower: CLIPModel pools the class token."""
    from vlkit.export.hf import export_hf_folder
    from vlkit.inference.loading import LoadedModel

    model = vlkit.create_model("clip-tiny").eval()
    model.config.vision.pool = "mean"
    with pytest.raises(VlkitError, match=r"^clip: cannot be written as transformers CLIPModel: .*pool='mean'"):
        export_hf_folder(LoadedModel(model, None, tmp_path, "x"), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_the_command_refuses_before_writing(tmp_path, capsys):
    from vlkit.cli import main
    from vlkit.models.io import save_model

    from vlkit.data.text import build_word_tokenizer

    tokenizer = build_word_tokenizer(CAPTIONS, max_length=12)
    save_model(vlkit.create_model("coca-tiny"), tmp_path / "coca", tokenizer)
    assert main(["export", str(tmp_path / "coca"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "coca: --format hf exports CLIP models only" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coca"]
