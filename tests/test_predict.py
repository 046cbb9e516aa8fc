"""``vlkit predict``: every task's lines checked against ``vlkit eval``'s own numbers (recall@K from the
retrieval lines, accuracy from the class lines, VQA accuracy from the answers, the same captions as the COCO
results of ``vlkit eval --predictions``), the official formats, and the rules of the output file."""

from __future__ import annotations

import json
import pytest
import torch

from vlkit.cli import main
from vlkit.eval.evaluate import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def _predict(capsys, *args) -> tuple[int, str]:
    code = main(["predict", *map(str, args)])
    return code, capsys.readouterr().err


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def vqa_data(synth, tmp_path_factory):
    """A VQA question file over 16 synthetic images (with question ids, as VQA releases them), ingested as
    split 'test', and an untrained albef-tiny with an answer head over its answers (the predictions need not
    be good to be checked against the evaluation)."""
    from vlkit.data.ingest import ingest
    from vlkit.data.text import build_word_tokenizer
    from vlkit.models.io import save_model
    from vlkit.models.registry import create_model

    root = tmp_path_factory.mktemp("vqa_predict")
    lines = [json.loads(x) for x in (synth.parent / "synth.jsonl").read_text().splitlines()[:16]]
    entries, qid = [], 9000
    for line in lines:
        for question, answers in zip(line["questions"], line["answers"]):
            entries.append({"image": line["image"], "question": question, "answers": answers, "question_id": qid})
            qid += 1
    path = root / "questions.json"
    path.write_text(json.dumps(entries))
    ingest([path], root / "vqa.lance", images_root=synth.parent, split="test", progress=False)
    answers = sorted({a for e in entries for a in e["answers"]})
    tokenizer = build_word_tokenizer([e["question"] for e in entries] + answers, max_length=32)
    torch.manual_seed(0)
    model = create_model("albef-tiny", vocab_size=tokenizer.vocab_size, answers=answers)
    save_model(model.eval(), root / "albef", tokenizer)
    return root / "vqa.lance", root / "albef", entries


@pytest.fixture(scope="module")
def captioner(synth, tmp_path_factory):
    """An untrained captioner-tiny with a word vocabulary of the synthetic captions."""
    from vlkit.data.store import open_dataset
    from vlkit.data.text import build_word_tokenizer
    from vlkit.models.io import save_model
    from vlkit.models.registry import create_model

    captions = open_dataset(synth).to_table(columns=["captions"]).column("captions").to_pylist()
    tokenizer = build_word_tokenizer([c for row in captions for c in row], max_length=32)
    torch.manual_seed(0)
    model = create_model("captioner-tiny", vocab_size=tokenizer.vocab_size)
    out = tmp_path_factory.mktemp("captioner") / "model"
    save_model(model.eval(), out, tokenizer)
    return out


def test_retrieval_lines_give_the_recall_of_vlkit_eval(trained_run, synth, tmp_path, capsys):
    run, _ = trained_run
    out = tmp_path / "retrieval.jsonl"
    code, err = _predict(capsys, run, "--task", "retrieval", "--data", synth, "--split", "test", "--out", out,
                         "--top-k", "5", "--precision", "fp32")
    assert code == 0, err
    lines = _lines(out)
    images = [x for x in lines if x["query"] == "image"]
    captions = [x for x in lines if x["query"] == "caption"]
    expected = evaluate(run, "retrieval", synth, "test", precision="fp32")  # a separate evaluation
    m = expected.metrics
    assert (len(images), len(captions)) == (expected.details["images"], expected.details["captions"])
    assert all(len(x["captions"]) == 5 for x in images) and all(len(x["images"]) == 5 for x in captions)
    for k, key in ((1, "r1"), (5, "r5")):
        i2t = 100 * sum(any(h["correct"] for h in x["captions"][:k]) for x in images) / len(images)
        t2i = 100 * sum(any(h["correct"] for h in x["images"][:k]) for x in captions) / len(captions)
        assert i2t == pytest.approx(m[f"test/synth/i2t_{key}"]) and t2i == pytest.approx(m[f"test/synth/t2i_{key}"])
    for x in captions[:20]:  # hits best first; 'correct' is the caption's own image
        scores = [h["score"] for h in x["images"]]
        assert scores == sorted(scores, reverse=True)
        assert all(h["correct"] == (h["id"] == x["id"]) for h in x["images"])


def test_class_lines_give_the_accuracy_of_vlkit_eval(trained_run, synth, entail_run, synth_entail, tmp_path,
                                                     capsys):
    for model, data, task, metric in ((trained_run[0], synth, "zeroshot", "top1"),
                                      (entail_run, synth_entail, "classification", "accuracy")):
        out = tmp_path / f"{task}.jsonl"
        code, err = _predict(capsys, model, "--task", task, "--data", data, "--split", "test", "--out", out,
                             "--precision", "fp32")
        assert code == 0, err
        lines = _lines(out)
        expected = evaluate(model, task, data, "test", precision="fp32")
        accuracy = 100 * sum(x["class"] == x["true_class"] for x in lines) / len(lines)
        assert accuracy == pytest.approx(next(v for k, v in expected.metrics.items() if k.endswith(metric)))
        assert [x["true_label"] for x in lines] == expected.labels.tolist()
        for x in lines:
            probs = list(x["probabilities"].values())
            assert probs == sorted(probs, reverse=True) and x["class"] == next(iter(x["probabilities"]))
    assert all(sum(x["probabilities"].values()) == pytest.approx(1, abs=1e-5) for x in lines)  # all 3 classes
    from vlkit.data.store import open_dataset, split_indices

    ds = open_dataset(synth_entail)
    rows = ds.take(split_indices(ds, "test"), columns=["id", "captions"]).to_pylist()
    assert [(x["id"], x["text"]) for x in lines] == [(r["id"], r["captions"][0]) for r in rows]


def test_vqa_answers_give_the_accuracy_of_vlkit_eval_and_the_official_file(vqa_data, tmp_path, capsys):
    from vlkit.metrics.vqa import vqa_accuracy

    data, model, entries = vqa_data
    out = tmp_path / "answers.jsonl"
    code, err = _predict(capsys, model, "--task", "vqa", "--data", data, "--split", "test", "--out", out)
    assert code == 0, err
    lines = _lines(out)
    by_id = {e["question_id"]: e for e in entries}
    assert sorted(x["question_id"] for x in lines) == sorted(by_id)  # every question once, with its id
    for x in lines:
        assert x["question"] == by_id[x["question_id"]]["question"] and 0 < x["score"] < 1
    accuracy = 100 * sum(vqa_accuracy(x["answer"], by_id[x["question_id"]]["answers"]) for x in lines) / len(lines)
    expected = evaluate(model, "vqa", data, "test")
    assert accuracy == pytest.approx(expected.metrics["test/vqa/vqa_acc"])
    official = tmp_path / "official.json"
    code, err = _predict(capsys, model, "--task", "vqa", "--data", data, "--split", "test", "--out", official,
                         "--format", "official")
    assert code == 0, err
    assert json.loads(official.read_text()) == [{"question_id": x["question_id"], "answer": x["answer"]}
                                                for x in lines]


def test_captions_are_those_of_vlkit_eval(captioner, synth, tmp_path, capsys, monkeypatch):
    for module in ("vlkit.metrics.caption_tokenize", "vlkit.metrics.captioning"):  # no JVM start per evaluation:
        monkeypatch.setattr(f"{module}.java_path", lambda: None)  # METEOR is left out, the captions compared
    common = ["--data", synth, "--split", "test", "--limit", "6", "--beams", "1", "--max-new-tokens", "5"]
    assert main(["eval", str(captioner), "--task", "captioning", *map(str, common), "--predictions",
                 str(tmp_path / "eval.json")]) == 0
    code, err = _predict(capsys, captioner, "--task", "captioning", *common, "--out", tmp_path / "coco.json",
                         "--format", "official")
    assert code == 0, err
    official = json.loads((tmp_path / "coco.json").read_text())
    assert official == json.loads((tmp_path / "eval.json").read_text()) and len(official) == 6
    code, err = _predict(capsys, captioner, "--task", "captioning", *common, "--out", tmp_path / "caps.jsonl")
    assert code == 0, err
    assert [(x["id"], x["caption"]) for x in _lines(tmp_path / "caps.jsonl")] == \
        [(str(x["image_id"]), x["caption"]) for x in official]


def test_the_output_file_is_replaced_only_when_vlkit_wrote_it(entail_run, synth_entail, tmp_path, capsys):
    args = [entail_run, "--task", "classification", "--data", synth_entail, "--split", "test", "--limit", "4"]
    mine = tmp_path / "preds.jsonl"
    mine.write_text("my own notes\n")
    code, err = _predict(capsys, *args, "--out", mine)
    assert code == 2 and "vlkit did not write it" in err and mine.read_text() == "my own notes\n"
    code, err = _predict(capsys, *args, "--out", mine, "--force")
    assert code == 0, err
    assert len(_lines(mine)) == 4
    code, err = _predict(capsys, *args, "--out", mine, "--top-k", "1")  # vlkit's own file: replaced
    assert code == 0, err
    assert all(len(x["probabilities"]) == 1 for x in _lines(mine))
    with open(mine, "a") as fh:
        fh.write("{}\n")  # changed by hand since: kept
    code, err = _predict(capsys, *args, "--out", mine)
    assert code == 2 and mine.read_text().endswith("{}\n")
    code, err = _predict(capsys, *args, "--out", synth_entail)
    assert code == 2 and "--out" in err
    code, err = _predict(capsys, *args, "--out", tmp_path / "x.json", "--format", "official")
    assert code == 2 and "no official submission format" in err and not (tmp_path / "x.json").exists()
