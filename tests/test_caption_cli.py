"""Captioning on the command line: ``vlkit eval --task captioning``, ``vlkit caption`` and generative ``vlkit ask``,
on a tiny captioner trained here for a few steps; each output checked against the library called directly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vlkit.cli import main
from vlkit.data.store import open_dataset, split_indices

from .conftest import jpeg_bytes, run_cli, single_thread

EVAL_IMAGES = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when the machine is busy): here and in the
    commands' subprocesses."""
    with single_thread(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


def _train_captioner(dataset: Path, steps: int = 30):
    """captioner-tiny with a word vocabulary of the dataset's captions, fitted by teacher forcing for a few steps
    on the training images (decoded once) so that it writes words of the captions."""
    import random

    from vlkit.data.text import build_word_tokenizer
    from vlkit.inference.captions import caption_inputs
    from vlkit.models.registry import create_model
    from vlkit.modules.losses.captioning import caption_labels, caption_loss

    ds = open_dataset(dataset)
    offsets = split_indices(ds, "train")
    captions = ds.take(offsets, columns=["captions"]).column("captions").to_pylist()
    tokenizer = build_word_tokenizer([c for row in captions for c in row], max_length=32)
    torch.manual_seed(0)
    model = create_model("captioner-tiny", vocab_size=tokenizer.vocab_size)
    transform = model.preprocess.image_transform(train=False)
    blobs = [bytes(d) for _, d in ds.read_blobs("image", indices=offsets, preserve_order=True)]
    pixels = transform.normalize(torch.stack([transform(b) for b in blobs]))  # [images, 3, S, S]
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows = rng.sample(range(len(blobs)), min(16, len(blobs)))
        tokens = caption_inputs(tokenizer, model.generation, [rng.choice(captions[r]) for r in rows])
        logits = model(pixels[rows], tokens.input_ids, tokens.attention_mask)
        loss = caption_loss(logits, caption_labels(tokens.input_ids, tokens.attention_mask)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 40-image synthetic dataset, a trained captioner-tiny saved with its tokenizer, a random clip-tiny
    (no text decoder) and a few image files."""
    from vlkit.data.ingest import ingest
    from vlkit.data.synth import generate
    from vlkit.models.io import save_model
    from vlkit.models.registry import create_model

    root = tmp_path_factory.mktemp("captioning")
    dataset = root / "synth.lance"
    ingest([generate(root / "raw", 40, seed=7)], dataset, progress=False)
    model, tokenizer = _train_captioner(dataset)
    save_model(model, root / "captioner", tokenizer=tokenizer)
    clip = create_model("clip-tiny", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.token_id("[SEP]"))
    save_model(clip, root / "clip", tokenizer=tokenizer)
    ds = open_dataset(dataset)
    offsets = split_indices(ds, "train")
    blobs = [bytes(d) for _, d in ds.read_blobs("image", indices=offsets[:5], preserve_order=True)]
    images = []
    for i, data in enumerate(blobs):
        images.append(root / f"image{i}.png")
        images[-1].write_bytes(data)
    return {"root": root, "dataset": dataset, "model": root / "captioner", "clip": root / "clip", "images": images}


@pytest.fixture(scope="module")
def loaded(tiny):
    from vlkit.inference.loading import load_for_inference

    return load_for_inference(tiny["model"])


def _pixels(loaded, paths) -> torch.Tensor:
    transform = loaded.model.preprocess.image_transform(train=False)
    return transform.normalize(torch.stack([transform(Path(p).read_bytes()) for p in paths]))  # [n, 3, S, S]


# --------------------------------------------------------------------------- vlkit eval --task captioning
def test_eval_captioning_scores_the_predictions_file_and_writes_a_report(tiny, loaded, tmp_path):
    from vlkit.inference.captions import write_captions
    from vlkit.metrics.captioning import caption_metrics

    predictions, report = tmp_path / "captions.json", tmp_path / "report"
    proc = run_cli("eval", tiny["model"], "--task", "captioning", "--data", tiny["dataset"], "--split", "train",
                   "--limit", EVAL_IMAGES, "--beams", "2", "--max-new-tokens", "12", "--json",
                   "--predictions", predictions, "--report", report)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    prefix = "train/synth/"
    names = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
    assert set(out["metrics"]) == {prefix + n for n in names}
    assert all(0 <= out["metrics"][prefix + n] <= 100 for n in names if n != "cider")
    assert 0 <= out["metrics"][prefix + "cider"] <= 1000
    assert out["images"] == out["captioned_images"] == EVAL_IMAGES and "SPICE omitted" in out["note"]

    # the predictions file holds the captions write_captions gives for the same images, in split order
    written = json.loads(predictions.read_text())
    ds = open_dataset(tiny["dataset"])
    rows = ds.take(split_indices(ds, "train")[:EVAL_IMAGES], columns=["id", "captions"]).to_pydict()
    assert [w["image_id"] for w in written] == rows["id"]
    transform = loaded.model.preprocess.image_transform(train=False)
    blobs = [bytes(d) for _, d in ds.read_blobs("image", indices=split_indices(ds, "train")[:EVAL_IMAGES],
                                                 preserve_order=True)]
    pixels = transform.normalize(torch.stack([transform(b) for b in blobs]))
    direct = write_captions(loaded.model, loaded.tokenizer, pixels, None, num_beams=2, max_new_tokens=12,
                            min_new_tokens=1)
    assert [w["caption"] for w in written] == [d[0][0] for d in direct]

    # the metrics are caption_metrics of that file against the dataset's references (METEOR, a Java process that
    # takes seconds to start, is checked by the metric's own tests; here its range only)
    ref = caption_metrics([w["caption"] for w in written], rows["captions"], meteor=False,
                          tokenizer="ptb").as_dict(prefix)
    assert {k: v for k, v in out["metrics"].items() if not k.endswith("meteor")} == pytest.approx(ref, abs=1e-6)

    html = (report / "index.html").read_text()
    assert "Highest CIDEr-D" in html and "Lowest CIDEr-D" in html and "SPICE omitted" in html
    assert json.loads((report / "captions_results.json").read_text()) == written
    assert len(list((report / "thumbs").glob("*.jpg"))) == min(EVAL_IMAGES, 16)
    assert written[0]["caption"] in html or written[-1]["caption"] in html


def test_eval_captioning_refuses_what_it_cannot_do_in_one_line(tiny, tmp_path, capsys):
    common = ["--task", "captioning", "--data", str(tiny["dataset"]), "--split", "train", "--limit", "2"]
    cases = [([str(tiny["clip"]), *common], "no text decoder"),
             ([str(tiny["model"]), *common, "--predictions", str(tmp_path)], "is a directory"),
             ([str(tiny["model"]), *common, "--beams", "0"], "--beams must be at least 1"),
             ([str(tiny["model"]), "--data", str(tiny["dataset"]), "--split", "train", "--prompt", "a"],
              "--prompt applies to --task captioning")]
    for args, message in cases:
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_eval_captioning_needs_captions_before_the_model_loads(tmp_path, capsys):
    from vlkit.data.ingest import ingest

    folder = tmp_path / "folder"
    for label in ("red", "blue"):
        (folder / label).mkdir(parents=True)
        (folder / label / "a.jpg").write_bytes(jpeg_bytes((200, 0, 0) if label == "red" else (0, 0, 200)))
    ingest([folder], tmp_path / "labels.lance", progress=False)
    assert main(["eval", str(tmp_path / "no-model"), "--task", "captioning", "--data", str(tmp_path / "labels.lance"),
                 "--split", "train"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no captions" in err, err


# --------------------------------------------------------------------------- vlkit caption
def test_caption_prints_what_write_captions_writes(tiny, loaded):
    from vlkit.inference.captions import write_captions

    paths = tiny["images"][:3]
    proc = run_cli("caption", tiny["model"], *paths, "--beams", "3", "--num-captions", "2", "--batch-size", "2",
                   "--max-new-tokens", "10", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    direct = []
    for batch in (paths[:2], paths[2:]):
        direct += write_captions(loaded.model, loaded.tokenizer, _pixels(loaded, batch), None, num_beams=3,
                                 num_return_sequences=2, max_new_tokens=10, min_new_tokens=1)
    assert [i["image"] for i in out["images"]] == [str(p) for p in paths]
    for image, want in zip(out["images"], direct):
        assert [c["caption"] for c in image["captions"]] == [t for t, _ in want]
        assert [c["score"] for c in image["captions"]] == pytest.approx([s for _, s in want], abs=1e-4)
        assert image["captions"][0]["score"] >= image["captions"][1]["score"]


def test_caption_follows_the_models_generation_defaults(tiny, loaded, tmp_path, capsys):
    """A model saved with generation.json (the prompt and decoding of its training run) captions with them unless
    the command line says otherwise; a damaged generation.json is one line."""
    import shutil

    from vlkit.inference.captions import write_captions
    from vlkit.inference.defaults import GENERATION_NAME, GenerationDefaults

    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    defaults = GenerationDefaults(prompt="a picture of", num_beams=2, max_new_tokens=6, no_repeat_ngram_size=1)
    (model / GENERATION_NAME).write_text(defaults.to_json())
    paths = tiny["images"][:2]
    pixels = _pixels(loaded, paths)

    def caption(*extra):
        assert main(["caption", str(model), *map(str, paths), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    out = caption()
    assert out["prompt"] == "a picture of" and out["settings"]["num_beams"] == 2
    want = write_captions(loaded.model, loaded.tokenizer, pixels, "a picture of", num_beams=2, max_new_tokens=6,
                          min_new_tokens=1, no_repeat_ngram_size=1)
    assert [i["captions"][0]["caption"] for i in out["images"]] == [w[0][0] for w in want]
    plain = write_captions(loaded.model, loaded.tokenizer, pixels, None, num_beams=4, max_new_tokens=6,
                           min_new_tokens=1, no_repeat_ngram_size=1)
    out = caption("--prompt", "", "--beams", "4")  # the command line wins, and --prompt '' drops the prompt
    assert [i["captions"][0]["caption"] for i in out["images"]] == [w[0][0] for w in plain]
    (model / GENERATION_NAME).write_text('{"prompt": "x", "beams": 2}')
    assert main(["caption", str(model), str(paths[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and GENERATION_NAME in err[0], err


def test_caption_sampling_with_a_seed_repeats(tiny, loaded, capsys):
    from vlkit.inference.captions import write_captions

    paths = [str(p) for p in tiny["images"][:3]]
    args = ["caption", str(tiny["model"]), *paths, "--sample", "--temperature", "2", "--num-captions", "3", "--json"]
    runs = []
    for seed in ("5", "5", "6"):
        assert main([*args, "--seed", seed]) == 0
        runs.append(json.loads(capsys.readouterr().out)["images"])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    direct = write_captions(loaded.model, loaded.tokenizer, _pixels(loaded, paths), None, do_sample=True,
                            temperature=2.0, num_return_sequences=3, max_new_tokens=30, min_new_tokens=1,
                            generator=torch.Generator().manual_seed(5))
    assert [[c["caption"] for c in image["captions"]] for image in runs[0]] == [[t for t, _ in d] for d in direct]
    # plain text: one line per image, then its captions with their scores
    assert main(["caption", str(tiny["model"]), paths[0], "--beams", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == paths[0] and len(lines) == 2 and float(lines[1].split()[0]) <= 0


def test_caption_refuses_bad_input_in_one_line(tiny, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    big = tmp_path / "big.jpg"
    big.write_bytes(jpeg_bytes(size=(60, 50)))
    model, image = str(tiny["model"]), str(tiny["images"][0])
    cases = [(["caption", model, str(tmp_path / "missing.png")], "no such image file"),
             (["caption", model, image, str(text)], "not a readable image"),
             (["caption", model, image, "--sample", "--beams", "3"], "cannot be combined with --beams 3"),
             (["caption", model, image, "--num-captions", "4"], "--num-captions 4 needs"),
             (["caption", model, image, "--seed", "1"], "--seed applies to sampling only"),
             (["caption", str(tiny["clip"]), image], "no text decoder"),
             (["--max-pixels", "2999", "caption", model, str(big)], "too large")]  # last: it sets the limit
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (args, err)
        assert err.startswith("vlkit: error: ")


def test_caption_and_ask_decode_each_image_once(tiny, tmp_path, capsys, monkeypatch):
    """Files are checked from their headers before the model loads, then decoded once; a file whose body does
    not decode is named in one line before any caption is written."""
    from vlkit.data import transforms

    calls = []
    real = transforms.decode_rgb_scaled
    monkeypatch.setattr(transforms, "decode_rgb_scaled", lambda *a, **k: calls.append(1) or real(*a, **k))
    paths = [str(p) for p in tiny["images"][:3]]
    assert main(["caption", str(tiny["model"]), *paths, "--beams", "1", "--json"]) == 0
    assert len(calls) == 3
    calls.clear()
    assert main(["ask", str(tiny["model"]), paths[0], "what colour is it?", "--json"]) == 0
    assert len(calls) == 1
    capsys.readouterr()
    whole = jpeg_bytes(size=(60, 50))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[: len(whole) // 2])  # a valid header, half a body
    assert main(["caption", str(tiny["model"]), paths[0], str(cut)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "cut.jpg" in captured.err


# --------------------------------------------------------------------------- vlkit ask, generative
def test_ask_a_generative_model_answers_by_generation(tiny, loaded, capsys):
    from vlkit.inference.captions import write_captions
    from vlkit.tasks.vqa import vqa_prompts

    image = tiny["images"][1]
    question = "what colour is the circle?"
    assert main(["ask", str(tiny["model"]), str(image), question, "--top", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answered_by"] == "generated" and len(out["answers"]) == 3
    direct = write_captions(loaded.model, loaded.tokenizer, _pixels(loaded, [image]), vqa_prompts([question]),
                            num_beams=3, num_return_sequences=3, max_new_tokens=10, min_new_tokens=1,
                            length_penalty=0.0)[0]
    assert [a["answer"] for a in out["answers"]] == [t for t, _ in direct]
    probs = [a["probability"] for a in out["answers"]]
    assert probs == pytest.approx([math.exp(s) for _, s in direct], rel=1e-4)
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6  # distinct sequences of one model


def test_eval_vqa_with_a_generative_model_answers_by_generation(tiny, loaded, capsys):
    import contextlib

    from vlkit.data.dataset import LanceImageTextDataset
    from vlkit.metrics.vqa import vqa_metrics
    from vlkit.tasks.vqa import QA_COLUMNS, answer_settings, answer_split
    from vlkit.train.distributed import DistInfo

    assert main(["eval", str(tiny["model"]), "--task", "vqa", "--data", str(tiny["dataset"]), "--split", "train",
                 "--limit", "6", "--beams", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["generative"] is True and "train" in out["majority_from"]
    ds = LanceImageTextDataset(tiny["dataset"], "train", loaded.model.preprocess.image_transform(train=False), None,
                               captions="none", columns=QA_COLUMNS, require=["questions"])
    ds.offsets = ds.offsets[:6]
    pairs = answer_split(loaded.model, loaded.tokenizer, ds, DistInfo(), contextlib.nullcontext(),
                         settings=answer_settings(2, 30))
    human = [a for _, a in pairs]
    assert out["questions"] == len(pairs) > 6
    assert out["metrics"]["train/synth/vqa_acc"] == pytest.approx(vqa_metrics([p for p, _ in pairs], human).accuracy)
    majority = vqa_metrics([out["majority_answer"]] * len(pairs), human).accuracy
    assert out["metrics"]["train/synth/vqa_majority_acc"] == pytest.approx(majority) and majority > 0
