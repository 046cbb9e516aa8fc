"""VizWiz: ``answerable`` and ``answer_type`` survive ingest, the VQA task predicts "unanswerable" and reports the
accuracy on answerable and unanswerable questions apart; datasets without those fields keep working."""

from __future__ import annotations

import json

import lance
import numpy as np
import pytest
from PIL import Image

from vlkit.data.ingest import ingest
from vlkit.metrics.vqa import vqa_accuracy, vqa_metrics

from .conftest import jpeg_bytes, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _answers(*pairs: tuple[str, int]) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes"} for a, n in pairs for _ in range(n)]


@pytest.fixture(scope="module")
def vizwiz_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("vizwiz")
    for i in range(3):
        (root / f"VizWiz_train_{i:08d}.jpg").write_bytes(jpeg_bytes((80 * i, 40, 200)))
    entries = [
        {"image": "VizWiz_train_00000000.jpg", "question": "What's the name of this product?",
         "answers": _answers(("basil leaves", 8), ("basil", 2)), "answer_type": "other", "answerable": 1},
        {"image": "VizWiz_train_00000001.jpg", "question": "Can you tell me what is in this can please?",
         "answers": _answers(("unanswerable", 7), ("unsuitable", 3)), "answer_type": "unanswerable",
         "answerable": 0},
        {"image": "VizWiz_train_00000002.jpg", "question": "Is this a coin?", "answers": _answers(("yes", 10)),
         "answer_type": "yes/no", "answerable": 1},
        {"image": "VizWiz_train_00000002.jpg", "question": "What is this?", "answers": _answers(("coin", 10)),
         "answer_type": "other"},  # a second question of the same image, answerability not given
    ]
    path = root / "train.json"
    path.write_text(json.dumps(entries))
    return path


def test_answerable_and_answer_type_are_kept_per_question(vizwiz_file, tmp_path):
    ingest([vizwiz_file], tmp_path / "v.lance", split="train", progress=False)
    ds = lance.dataset(str(tmp_path / "v.lance"))
    assert str(ds.schema.field("answerable").type) == "list<item: bool>"
    assert str(ds.schema.field("answer_type").type) == "list<item: string>"
    rows = {r["id"]: r for r in ds.to_table(columns=["id", "questions", "answers", "answerable",
                                                     "answer_type"]).to_pylist()}
    assert rows["VizWiz_train_00000001.jpg"]["answerable"] == [False]
    assert rows["VizWiz_train_00000001.jpg"]["answers"] == [["unanswerable"] * 7 + ["unsuitable"] * 3]
    coin = rows["VizWiz_train_00000002.jpg"]
    assert coin["questions"] == ["Is this a coin?", "What is this?"]
    assert coin["answerable"] == [True, None] and coin["answer_type"] == ["yes/no", "other"]


def test_a_vqa_file_without_them_gets_no_such_columns(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "q.json").write_text(json.dumps([{"image": "a.jpg", "question": "what colour?",
                                                  "answers": ["red"] * 3}]))
    ingest([tmp_path / "q.json"], tmp_path / "q.lance", split="train", progress=False)
    names = lance.dataset(str(tmp_path / "q.lance")).schema.names
    assert "answerable" not in names and "answer_type" not in names
    from vlkit.tasks.vqa_inputs import QA_COLUMNS, qa_columns

    assert qa_columns(str(tmp_path / "q.lance")) == QA_COLUMNS


def test_accuracy_on_answerable_and_unanswerable_questions_equals_a_slow_loop():
    predictions = ["unanswerable", "basil", "yes", "unanswerable", "coin", "no"]
    answers = [["unanswerable"] * 7 + ["unsuitable"] * 3, ["basil leaves"] * 8 + ["basil"] * 2, ["yes"] * 10,
               ["blue"] * 10, ["coin"] * 10, ["unanswerable"] * 2 + ["no"] * 8]
    answerable = [False, True, True, True, None, False]
    m = vqa_metrics(predictions, answers, answerable=answerable)
    for flag, got, count in ((True, m.answerable_accuracy, m.answerable_count),
                             (False, m.unanswerable_accuracy, m.unanswerable_count)):
        scores = []
        for p, a, f in zip(predictions, answers, answerable):
            if f is flag:
                scores.append(vqa_accuracy(p, a))
        assert count == len(scores) and got == pytest.approx(100 * sum(scores) / len(scores))
    assert m.accuracy == pytest.approx(100 * sum(vqa_accuracy(p, a) for p, a in zip(predictions, answers)) / 6)
    d = m.as_dict("val/vizwiz/")
    assert d["val/vizwiz/unanswerable_accuracy"] == pytest.approx(m.unanswerable_accuracy)
    assert d["val/vizwiz/answerable_count"] == 3.0
    assert vqa_metrics(predictions, answers).answerable_accuracy is None  # not given: not reported
    assert "val/vizwiz/answerable_accuracy" not in vqa_metrics(predictions, answers).as_dict("val/vizwiz/")


def test_synthetic_unanswerable_questions_ask_about_colours_absent_from_the_pixels(tmp_path):
    from vlkit.data.synth import COLORS
    from vlkit.data.synth_qa import generate_kind

    jsonl = generate_kind(tmp_path / "u", 40, "unanswerable", seed=5)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    unanswerable = checked = 0
    for row in rows:
        assert len(row["answerable"]) == len(row["answer_type"]) == len(row["questions"]) == len(row["answers"])
        pixels = np.asarray(Image.open(tmp_path / "u" / row["image"]).convert("RGB")).reshape(-1, 3)
        present = {name for name, rgb in COLORS.items() if (pixels == rgb).all(axis=1).any()}
        for q, a, ok, kind in zip(row["questions"], row["answers"], row["answerable"], row["answer_type"]):
            assert (a == ["unanswerable"]) == (not ok) == (kind == "unanswerable")
            unanswerable += not ok
            if q.startswith("what shape is the "):
                color = q.removeprefix("what shape is the ").removesuffix(" object?")
                assert (color in present) == ok, (row["image"], q, present)
                checked += 1
    assert unanswerable >= 20 and checked >= 10


# ---------------------------------------------------------------- training on unanswerable questions


@pytest.fixture(scope="module")
def unanswerable_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("unanswerable")
    r = run_cli("data", "synth", "--kind", "unanswerable", "--n", "300", "--seed", "3", "--out", root / "d")
    assert r.returncode == 0, r.stderr
    data = root / "d.lance"  # the CLI ingests with the default splits; re-ingest with a larger validation split
    ingest([root / "d" / "synth.jsonl"], data, progress=False, val_fraction=0.2, test_fraction=0.0)
    names = lance.dataset(str(root / "d" / "synth.lance")).schema.names
    assert "answerable" in names and "answer_type" in names
    return data


def test_tiny_albef_learns_answerable_and_unanswerable_questions(unanswerable_data, tmp_path):
    from vlkit.config.load import load_config
    from vlkit.train.trainer import Trainer

    cfg = load_config(None, [
        f"datasets={{qa: {{path: {unanswerable_data}}}}}", "tasks=[{name: vqa, dataset: qa}]",
        f"output_dir={tmp_path / 'run'}", "batch_size=32", "epochs=60", "model.name=albef-tiny", "progress=false",
        "tensorboard=false", "log_every=1", "precision=fp32", "optim.warmup_steps=10", "optim.lr_image=1e-3",
        "optim.lr_text=1e-3", "optim.lr_head=1e-3", "optim.weight_decay=0.01", "eval_every=100000",
        "save_every=100000"])
    m = Trainer(cfg).run()
    acc, majority = m["val/qa/vqa_acc"], m["val/qa/vqa_majority_acc"]
    yes, no = m["val/qa/vqa_acc_answerable"], m["val/qa/vqa_acc_unanswerable"]
    print(f"\nsynthetic questions, a quarter unanswerable ({m['val/qa/vqa_questions']:.0f}): tiny ALBEF {acc:.1f}% "
          f"(answerable {yes:.1f}%, unanswerable {no:.1f}%), majority answer {majority:.1f}%")
    # the majority answer is "unanswerable": it scores 100% on those and 0% on the others
    assert acc > majority + 15
    assert no > 50.0 and yes > 20.0
    # per answer type too; the synthetic "unanswerable" type is exactly the unanswerable questions
    assert m["val/qa/vqa_acc_type_unanswerable"] == pytest.approx(no)
    assert {"val/qa/vqa_acc_type_yes_no", "val/qa/vqa_acc_type_number", "val/qa/vqa_acc_type_other"} <= set(m)
    # vlkit eval reports the same breakdown as the trainer's validation, from the saved model
    import json

    r = run_cli("eval", tmp_path / "run", "--task", "vqa", "--data", unanswerable_data, "--split", "val", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)["metrics"]
    name = unanswerable_data.stem
    for key in ("vqa_acc", "vqa_acc_answerable", "vqa_acc_unanswerable", "vqa_acc_type_number"):
        assert got[f"val/{name}/{key}"] == pytest.approx(m[f"val/qa/{key}"], abs=1e-6), key
