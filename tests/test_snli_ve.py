"""SNLI-VE end to end: the reader on files written here (official keys, bad lines, --format), the synthetic
entailment triples checked on the pixels, the classification head saved with the model, and
``vlkit eval --task classification`` checked against a slow loop and above chance on held-out pairs."""

from __future__ import annotations

import json
import re
import shutil

import lance
import numpy as np
import pytest
import torch
from PIL import Image

from vlkit.data.ingest import ingest
from vlkit.data.readers import detect_format

from .conftest import jpeg_bytes, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

LABEL = {"entailment": 0, "neutral": 1, "contradiction": 2}  # the order every SNLI-VE dataset keeps


def _line(image: str, premise: str, hypothesis: str, gold: str, pair: str) -> dict:
    """An SNLI-VE line with every key the official files have."""
    return {"annotator_labels": [gold] * 5, "captionID": f"{image}#0", "gold_label": gold, "pairID": pair,
            "sentence1": premise, "sentence1_binary_parse": "( x )", "sentence1_parse": "(ROOT x)",
            "sentence2": hypothesis, "sentence2_binary_parse": "( y )", "sentence2_parse": "(ROOT y)",
            "Flikr30kID": image}


def _write(path, lines: list) -> None:
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))


@pytest.fixture()
def official(tmp_path):
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    (images / "1000092795.jpg").write_bytes(jpeg_bytes((200, 30, 30), (48, 32)))
    (images / "1001773457.jpg").write_bytes(jpeg_bytes((30, 30, 200), (40, 40)))
    train = [_line("1000092795.jpg", "Two young guys outside.", "Two men are outdoors.", "entailment",
                   "1000092795.jpg#0r1e"),
             _line("1000092795.jpg", "Two young guys outside.", "Two men are asleep indoors.", "contradiction",
                   "1000092795.jpg#0r1c"),
             _line("1001773457", "A dog runs.", "The dog is chasing a cat.", "neutral",  # a bare id: .jpg added
                   "1001773457.jpg#1r1n")]
    dev = [_line("1001773457.jpg", "A dog runs.", "An animal moves.", "entailment", "1001773457.jpg#1r1e")]
    _write(tmp_path / "snli_ve_train.jsonl", train)
    _write(tmp_path / "snli_ve_dev.jsonl", dev)
    return tmp_path, train + dev


def test_official_files_ingest_one_row_per_pair(official):
    root, lines = official
    r = run_cli("ingest", root / "snli_ve_train.jsonl", root / "snli_ve_dev.jsonl", "--images-root",
                root / "flickr30k-images", "--out", root / "ve.lance")
    assert r.returncode == 0, r.stderr
    ds = lance.dataset(str(root / "ve.lance"))
    assert json.loads(ds.schema.metadata[b"vlkit.classes"]) == ["entailment", "neutral", "contradiction"]
    rows = {x["id"]: x for x in ds.to_table(columns=["id", "captions", "label", "class_name", "split", "premise",
                                                      "width", "height"]).to_pylist()}
    assert sorted(rows) == sorted(line["pairID"] for line in lines)  # a row per pair, its id the pairID
    for line in lines:
        row = rows[line["pairID"]]
        assert row["captions"] == [line["sentence2"]]  # the hypothesis is the text; the premise is not
        assert row["label"] == LABEL[line["gold_label"]] and row["class_name"] == line["gold_label"]
        assert row["premise"] == line["sentence1"]
        assert (row["width"], row["height"]) == ((48, 32) if line["Flikr30kID"].startswith("1000") else (40, 40))
    assert {rows[p]["split"] for p in rows} == {"train", "val"}  # from the file names: train, dev -> val
    assert rows["1001773457.jpg#1r1e"]["split"] == "val"


def test_bad_lines_are_named_and_skipped(official, tmp_path):
    root, _ = official
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes())
    path = root / "snli_ve_test.jsonl"
    _write(path, [_line("1000092795.jpg", "p", "A man sits.", "entailment", "a"),
                  _line("1000092795.jpg", "p", "A man sits.", "-", "b"),  # no consensus
                  {**_line("1000092795.jpg", "p", "x", "neutral", "c"), "sentence2": ""},
                  _line("1000092795.jpg", "p", "Another.", "neutral", "a"),  # the same pairID again
                  "{not json",
                  {k: v for k, v in _line("x.jpg", "p", "h", "neutral", "e").items() if k != "Flikr30kID"},
                  _line("../outside.jpg", "p", "Escapes the images folder.", "neutral", "f")])
    report = ingest([path], tmp_path / "t.lance", images_root=root / "flickr30k-images", progress=False)
    reasons = {p.row: p.reason for p in report.problems if p.row is not None}
    assert "gold_label must be one of" in reasons[2] and "'-'" in reasons[2]
    assert reasons[3].startswith("sentence2:")
    assert "repeats line 1" in reasons[4]
    assert "invalid JSON" in reasons[5]
    assert reasons[6].startswith("Flikr30kID")
    assert any("outside.jpg" in str(p) for p in report.problems)  # confined to --images-root by ingest
    ids = lance.dataset(str(tmp_path / "t.lance")).to_table(columns=["id"]).column("id").to_pylist()
    assert ids == ["a"]


def test_format_is_detected_from_the_keys_or_named(official, tmp_path):
    root, lines = official
    assert detect_format(root / "snli_ve_train.jsonl") == "snli-ve"
    plain = tmp_path / "plain.jsonl"
    _write(plain, [{"image": "a.jpg", "text": "a cat"}])
    assert detect_format(plain) == "jsonl"
    renamed = root / "pairs.txt"  # a name that says nothing: --format snli-ve reads it
    shutil.copy(root / "snli_ve_dev.jsonl", renamed)
    r = run_cli("ingest", renamed, "--format", "snli-ve", "--images-root", root / "flickr30k-images",
                "--out", tmp_path / "n.lance")
    assert r.returncode == 0, r.stderr
    row = lance.dataset(str(tmp_path / "n.lance")).to_table(columns=["id", "label"]).to_pylist()
    assert row == [{"id": "1001773457.jpg#1r1e", "label": 0}]


def _drawn(path) -> set[tuple[str, str]]:
    """(colour, shape) of every object in a synthetic PNG, from its pixels: each blob of an exact colour,
    its shape from how much of its bounding box it fills (square 1, circle ~0.78, triangle ~0.52)."""
    from scipy import ndimage

    from vlkit.data.synth import COLORS

    pixels = np.array(Image.open(path).convert("RGB"))
    found = set()
    for color, rgb in COLORS.items():
        blobs, n = ndimage.label(np.all(pixels == rgb, axis=-1))
        for k in range(1, n + 1):
            ys, xs = np.nonzero(blobs == k)
            fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            found.add((color, "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"))
    return found


def test_synthetic_hypotheses_are_true_neutral_and_false_on_the_pixels(tmp_path):
    from vlkit.data.synth import COLORS, SHAPES
    from vlkit.data.synth_entail import PROPERTIES, generate_entailment

    jsonl = generate_entailment(tmp_path, 24, seed=5)
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert len(lines) == 72
    named = re.compile(rf"({'|'.join(COLORS)}) ({'|'.join(SHAPES)})")
    by_image: dict[str, list] = {}
    for line in lines:
        by_image.setdefault(line["Flikr30kID"], []).append(line)
    for image, triple in by_image.items():
        assert sorted(x["gold_label"] for x in triple) == ["contradiction", "entailment", "neutral"]
        assert len({x["split"] for x in triple}) == 1  # an image's pairs never straddle splits
        drawn = _drawn(tmp_path / image)
        for x in triple:
            said = tuple(named.search(x["sentence2"]).groups())
            if x["gold_label"] == "contradiction":
                assert said not in drawn, (image, x["sentence2"], drawn)
            else:
                assert said in drawn, (image, x["sentence2"], drawn)
            if x["gold_label"] == "neutral":
                assert any(x["sentence2"].endswith(p) for p in PROPERTIES)
    assert generate_entailment(tmp_path / "again", 24, seed=5).read_text() == jsonl.read_text()


def _slow_predictions(loaded, dataset, split):
    """Each pair of ``split`` classified alone: decoded, tokenised and passed through the model and the head."""
    from vlkit.data.store import open_dataset, split_indices

    ds = open_dataset(dataset)
    offsets = split_indices(ds, split)
    table = ds.take(offsets, columns=["captions", "label"]).to_pylist()
    blobs = [bytes(d) for _, d in ds.read_blobs("image", indices=offsets, preserve_order=True)]
    transform = loaded.model.preprocess.image_transform(train=False)
    head = loaded.classifier.head
    predicted = []
    with torch.no_grad():
        for row, blob in zip(table, blobs):
            image = transform.normalize(transform(blob)[None])
            tokens = loaded.tokenizer([row["captions"][0]])
            cls = loaded.model(image, tokens["input_ids"], tokens["attention_mask"], head="cls")
            predicted.append(int(head(cls.float()).argmax()))
    return predicted, [r["label"] for r in table]


def test_head_saved_with_the_model_and_eval_agrees_with_a_slow_loop(entail_run, synth_entail):
    from vlkit.eval.evaluate import evaluate
    from vlkit.inference.loading import load_for_inference
    from vlkit.models.io import load_classifier

    model_dir = entail_run / "model"
    assert (model_dir / "classifier.safetensors").is_file()
    saved = load_classifier(model_dir)
    assert saved.class_names == ["entailment", "neutral", "contradiction"] and saved.prompt is None
    latest = (entail_run / "checkpoints" / "latest").read_text().strip()  # the last step's checkpoint
    state = torch.load(entail_run / "checkpoints" / latest / "state.pt", weights_only=True)
    assert torch.equal(saved.head.weight, state["tasks"][0]["head.weight"].float())  # the trained head, as is

    result = evaluate(entail_run, "classification", synth_entail, "test", precision="fp32")
    predicted, labels = _slow_predictions(load_for_inference(entail_run), synth_entail, "test")
    expected = np.zeros((3, 3), dtype=int)
    for y, p in zip(labels, predicted):
        expected[y, p] += 1
    assert result.classification.confusion.tolist() == expected.tolist()
    assert result.metrics["test/synth/accuracy"] == pytest.approx(100 * np.trace(expected) / len(labels))
    recall = result.summary()["per_class_recall"]
    for k, name in enumerate(saved.class_names):
        assert recall[name] == pytest.approx(100 * expected[k, k] / expected[k].sum())


def test_eval_cli_scores_held_out_pairs_above_chance_with_a_report(entail_run, synth_entail, tmp_path):
    r = run_cli("eval", entail_run, "--task", "classification", "--data", synth_entail, "--split", "test",
                "--json", "--report", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    accuracy = summary["metrics"]["test/synth/accuracy"]
    print(f"\nsynthetic visual entailment, held-out pairs: accuracy {accuracy:.1f}% (chance 33.3%), "
          f"recall per class {summary['per_class_recall']}")
    assert accuracy > 45  # chance is 1/3
    matrix = summary["confusion"]["matrix"]
    assert summary["confusion"]["classes"] == ["entailment", "neutral", "contradiction"]
    assert sum(map(sum, matrix)) == summary["pairs"] and summary["chance"] == pytest.approx(100 / 3)
    assert accuracy == pytest.approx(100 * sum(matrix[k][k] for k in range(3)) / summary["pairs"])
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Image-text classification" in page and "Confusion matrix" in page
    assert (tmp_path / "report" / "confusion.png").is_file()
    from vlkit.eval.evaluate import evaluate

    again = evaluate(entail_run / "checkpoints" / "latest", "classification", synth_entail, "test")
    assert again.metrics["test/synth/accuracy"] == pytest.approx(accuracy)  # the head rebuilt from the checkpoint


def test_a_model_without_a_head_or_with_a_damaged_one_is_one_line(entail_run, synth_entail, tmp_path, capsys):
    from vlkit.cli import main

    bare = tmp_path / "bare"
    shutil.copytree(entail_run / "model", bare)
    for name in ("classifier.json", "classifier.safetensors"):
        (bare / name).unlink()
    code = main(["eval", str(bare), "--task", "classification", "--data", str(synth_entail), "--split", "test"])
    err = capsys.readouterr().err
    assert code == 2 and "no classification head" in err and len(err.strip().splitlines()) == 1
    damaged = tmp_path / "damaged"
    shutil.copytree(entail_run / "model", damaged)
    (damaged / "classifier.json").write_text('{"classes": ["yes", "no"], "prompt": null}')  # 2 names, 3 rows
    code = main(["eval", str(damaged), "--task", "classification", "--data", str(synth_entail), "--split", "test"])
    err = capsys.readouterr().err
    assert code == 2 and "classifier.safetensors" in err and len(err.strip().splitlines()) == 1, err
