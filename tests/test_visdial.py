"""Visual Dialog: the VisDial reader, the ranking metrics against slow loops, the dialog texts, synthetic dialogs
checked against the shapes they describe, a tiny ALBEF that ranks answers above chance, and vlkit eval."""

from __future__ import annotations

import itertools
import json
import math
import random

import lance
import pytest
import torch

from tests.conftest import jpeg_bytes, run_cli
from vlkit.data.ingest import ingest
from vlkit.errors import DataError
from vlkit.metrics.ranking import answer_ranks, chance_mrr, ndcg_visdial, ranking_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["is it red?", "how many dogs?", "what is it?", "is it sunny?"]
ANSWERS = ["yes", "no", "two", "a dog", "a cat", "three", "maybe"]


def _round(question: int, answer: int | None, options: list[int] | None, gt: int | None) -> dict:
    out: dict = {"question": question}
    if answer is not None:
        out["answer"] = answer
    if options is not None:
        out["answer_options"] = options
    if gt is not None:
        out["gt_index"] = gt
    return out


def _write_visdial(folder, dialogs, dense=None, split="val2018", stem="visdial_1.0_val"):
    body = {"version": "1.0", "split": split, "data": {"questions": QUESTIONS, "answers": ANSWERS, "dialogs": dialogs}}
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(body))
    if dense is not None:
        (folder / f"{stem}_dense_annotations.json").write_text(json.dumps(dense))
    return path


def _image(folder, number: int, prefix: str = "VisualDialog_val2018_"):
    (folder / "images").mkdir(exist_ok=True)
    (folder / "images" / f"{prefix}{number:012d}.jpg").write_bytes(jpeg_bytes((10 * number % 255, 90, 40)))


DIALOGS = [
    {"image_id": 42, "caption": "a dog on grass", "dialog": [
        _round(1, 3, [0, 2, 3, 5], 2),
        _round(2, 3, [3, 4, 6, 1], 0),
        _round(0, 1, [6, 1, 0, 2], 1)]},
    {"image_id": 7, "caption": "a cat indoors", "dialog": [
        _round(3, 0, [0, 1, 6, 5], 0),
        _round(2, 4, [2, 4, 3, 0], 1)]},
]
DENSE = [{"image_id": 42, "round_id": 2, "gt_relevance": [1, 0.5, 0, 0.25]},
         {"image_id": 7, "round_id": 1, "gt_relevance": [0.75, 0, 0, 0]}]


def _expected(dialog: dict) -> dict:
    """The stored columns of a dialog, read from the tables of the file by hand."""
    rounds = dialog["dialog"]
    return {"captions": [dialog["caption"]],
            "dialog_questions": [QUESTIONS[r["question"]] for r in rounds],
            "dialog_answers": [ANSWERS[r["answer"]] for r in rounds],
            "dialog_options": [[ANSWERS[k] for k in r["answer_options"]] for r in rounds],
            "dialog_gt_index": [r["gt_index"] for r in rounds]}


def test_reader_stores_rounds_options_gt_index_and_relevance_exactly(tmp_path):
    _image(tmp_path, 42)
    _image(tmp_path, 7, prefix="COCO_train2014_")
    path = _write_visdial(tmp_path, DIALOGS, DENSE)
    report = ingest([path], tmp_path / "vd.lance", progress=False)
    assert not report.problems, [str(p) for p in report.problems]
    columns = ["id", "split", "captions", "dialog_questions", "dialog_answers", "dialog_options", "dialog_gt_index",
               "dialog_relevance"]
    rows = {r["id"]: r for r in lance.dataset(str(tmp_path / "vd.lance")).to_table(columns=columns).to_pylist()}
    assert set(rows) == {"images/VisualDialog_val2018_000000000042.jpg", "images/COCO_train2014_000000000007.jpg"}
    for dialog in DIALOGS:
        row = next(r for k, r in rows.items() if k.endswith(f"{dialog['image_id']:012d}.jpg"))
        assert row["split"] == "val"  # the file's split ("val2018")
        for key, value in _expected(dialog).items():
            assert row[key] == value, key
        # the answer is the option at gt_index in every round
        assert all(o[g] == a for o, g, a in zip(row["dialog_options"], row["dialog_gt_index"], row["dialog_answers"]))
    # dense relevance lands on its round (round_id counts from 1), the other rounds hold none
    assert rows["images/VisualDialog_val2018_000000000042.jpg"]["dialog_relevance"] == [None, [1, 0.5, 0, 0.25],
                                                                                         None]
    assert rows["images/COCO_train2014_000000000007.jpg"]["dialog_relevance"] == [[0.75, 0, 0, 0], None]


def test_test_split_rounds_without_answer_keep_nulls(tmp_path):
    _image(tmp_path, 3)
    dialog = {"image_id": 3, "caption": "a dog", "dialog": [_round(0, 0, None, None), _round(1, None, [2, 5, 6], None)]}
    path = _write_visdial(tmp_path, [dialog], split="test2018", stem="visdial_1.0_test")
    ingest([path], tmp_path / "t.lance", progress=False)
    row = lance.dataset(str(tmp_path / "t.lance")).to_table().to_pylist()[0]
    assert row["split"] == "test"
    assert row["dialog_answers"] == ["yes", None]
    assert row["dialog_options"] == [[], ["two", "three", "maybe"]]
    assert row["dialog_gt_index"] == [None, None]
    assert "dialog_relevance" not in lance.dataset(str(tmp_path / "t.lance")).schema.names


@pytest.mark.parametrize("bad, message", [
    (_round(1, 3, [0, 2, 3, 5], 4), "round 1: gt_index 4 is outside its 4 answer options"),
    (_round(1, 3, [0, 2, 3, 5], 0), "round 1: gt_index 0 points at option 'yes', not the answer 'a dog'"),
    (_round(1, 3, [0, 2, 99, 5], 1), "round 1: answer_options[2] 99 is not an index of the 7 entries"),
    (_round(9, 3, [0, 2, 3, 5], 2), "round 1: question 9 is not an index of the 4 entries"),
])
def test_a_bad_round_is_one_line_naming_the_dialog(tmp_path, bad, message):
    _image(tmp_path, 42)
    _image(tmp_path, 7)
    dialogs = [DIALOGS[0], {**DIALOGS[1], "dialog": [bad, DIALOGS[1]["dialog"][1]]}]
    path = _write_visdial(tmp_path, dialogs)
    report = ingest([path], tmp_path / "vd.lance", progress=False)
    lines = [str(p) for p in report.problems]
    assert len(lines) == 1 and lines[0].startswith(f"{path}:data.dialogs[1] (image_id 7): {message}")
    assert lance.dataset(str(tmp_path / "vd.lance")).count_rows() == 1  # the good dialog is kept
    # --strict refuses the whole file and writes nothing
    with pytest.raises(DataError, match=r"data\.dialogs\[1\] \(image_id 7\)"):
        ingest([path], tmp_path / "strict.lance", progress=False, strict=True)
    assert not (tmp_path / "strict.lance").exists()


def test_a_missing_image_and_a_bad_dense_entry_are_named(tmp_path):
    _image(tmp_path, 42)  # no image for id 7
    dense = [DENSE[0], {"image_id": 42, "round_id": 3, "gt_relevance": [1, 0]}]  # 2 scores for 4 options
    path = _write_visdial(tmp_path, DIALOGS, dense)
    report = ingest([path], tmp_path / "vd.lance", progress=False)
    lines = sorted(str(p) for p in report.problems)
    dense_path = tmp_path / "visdial_1.0_val_dense_annotations.json"
    assert lines == sorted([
        f"{dense_path}:[1]: image_id 42 round_id 3: 2 relevance scores for 4 answer options; left out",
        f"{path}:data.dialogs[1] (image_id 7): no image for this dialog (image_id 7)"])
    row = lance.dataset(str(tmp_path / "vd.lance")).to_table().to_pylist()[0]
    assert row["dialog_relevance"] == [None, [1, 0.5, 0, 0.25], None]  # the good annotation is kept


def test_detect_format_and_cli_ingest(tmp_path):
    from vlkit.data.readers import detect_format

    _image(tmp_path, 42)
    _image(tmp_path, 7)
    path = _write_visdial(tmp_path, DIALOGS)
    assert detect_format(path) == "visdial"
    r = run_cli("ingest", path, "--out", tmp_path / "cli.lance")
    assert r.returncode == 0, r.stderr
    assert lance.dataset(str(tmp_path / "cli.lance")).count_rows() == 2


# ------------------------------------------------------------------------------------------------ metrics


def _slow_rank(scores: list[float], gt: int) -> int:
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))  # ties: the earlier option first
    return order.index(gt) + 1


def _slow_ndcg(scores: list[float], relevance: list[float]) -> float | None:
    k = sum(1 for r in relevance if r > 0)
    if k == 0:
        return None
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k]
    dcg = sum(relevance[j] / math.log2(i + 2) for i, j in enumerate(order))
    ideal = sum(r / math.log2(i + 2) for i, r in enumerate(sorted(relevance, reverse=True)[:k]))
    return dcg / ideal


def test_ranking_metrics_equal_a_slow_loop():
    rng = random.Random(0)
    scores, gts, rels = [], [], []
    for q in range(60):
        n = rng.choice([4, 10, 100])
        s = [float(rng.randint(0, 5)) for _ in range(n)]  # many ties
        scores.append(s)
        gts.append(rng.randrange(n) if q % 7 else None)
        rels.append([rng.choice([0, 0, 0.5, 1]) for _ in range(n)] if q % 3 == 0 else None)
    m = ranking_metrics([torch.tensor(s) for s in scores], gts,
                        [None if r is None else torch.tensor(r) for r in rels])
    ranks = [_slow_rank(s, g) for s, g in zip(scores, gts) if g is not None]
    ndcgs = [v for v in (_slow_ndcg(s, r) for s, r in zip(scores, rels) if r is not None) if v is not None]
    assert m.num_queries == len(ranks) and m.num_relevance == len(ndcgs) > 5
    assert m.mrr == pytest.approx(100 * sum(1 / r for r in ranks) / len(ranks))
    assert m.mean_rank == pytest.approx(sum(ranks) / len(ranks))
    for k in (1, 5, 10):
        assert getattr(m, f"r{k}") == pytest.approx(100 * sum(r <= k for r in ranks) / len(ranks))
    assert m.ndcg == pytest.approx(100 * sum(ndcgs) / len(ndcgs))
    assert set(m.as_dict("val/x/")) == {f"val/x/{k}" for k in ("mrr", "r1", "r5", "r10", "mean_rank", "ndcg")}


def test_ndcg_by_hand_and_chance_mrr_by_enumeration():
    # relevance [0, 1, 0.5]: K = 2; ranked by scores: option 2 (0.5), option 1 (1)
    value = ndcg_visdial(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 1.0, 0.5]))
    assert value == pytest.approx((0.5 + 1 / math.log2(3)) / (1 + 0.5 / math.log2(3)))
    assert ndcg_visdial(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])) is None
    # every ordering of 5 options equally likely: the mean reciprocal rank of option 0
    perms = list(itertools.permutations(range(5)))
    ranks = answer_ranks([torch.tensor(p, dtype=torch.float) for p in perms], [0] * len(perms))
    assert 100 * float((1 / ranks.double()).mean()) == pytest.approx(chance_mrr([5]))
    assert chance_mrr([10]) == pytest.approx(100 * sum(1 / r for r in range(1, 11)) / 10)


# ------------------------------------------------------------------------------------------------ dialog texts


def test_context_keeps_the_last_rounds_and_long_pairs_keep_question_and_candidate():
    from vlkit.data.text import build_word_tokenizer
    from vlkit.tasks.dialog_inputs import PairEncoder, dialog_context

    qs, ans = ["q one", "q two", "q three", "q four"], ["a1", "a2", "a3", None]
    assert dialog_context("cap", qs, ans, 3, 2) == "cap [SEP] q two a2 [SEP] q three a3 [SEP] q four"
    assert dialog_context("cap", qs, ans, 3, 0) == "cap [SEP] q four"
    words = "cap one two three four q a1 a2 a3 zebra".split()
    tok = build_word_tokenizer([" ".join(words)], max_length=10)
    context = dialog_context("cap " * 20, qs, ans, 3, 3)  # far longer than 10 tokens
    ids = PairEncoder(tok)([context], ["zebra"])["input_ids"][0].tolist()
    sep, cls = tok.token_id("[SEP]"), tok.token_id("[CLS]")
    assert len(ids) == 10 and ids[0] == cls
    # the caption went; the question and the candidate are whole at the end
    assert ids[-5:] == [tok.token_id("q"), tok.token_id("four"), sep, tok.token_id("zebra"), sep]
    assert tok.token_id("cap") not in ids


def test_training_candidates_and_loss():
    from vlkit.tasks.dialog_inputs import DialogRound
    from vlkit.tasks.visdial import candidate_loss, training_candidates

    rd = DialogRound(0, 0, 0, "ctx", ["no", "yes", "two", "yes", "red"], gt_index=1)
    picked = training_candidates(rd, 10, random.Random(0))
    assert picked[0] == "yes" and sorted(picked[1:]) == ["no", "red", "two"]  # a copy of the answer is no negative
    assert len(training_candidates(rd, 2, random.Random(0))) == 3
    scores = torch.tensor([2.0, 0.5, -1.0, 0.3, 0.1])
    expected = (-torch.log_softmax(scores[:3], 0)[0] - torch.log_softmax(scores[3:], 0)[0]) / 2
    assert float(candidate_loss(scores, [3, 2])) == pytest.approx(float(expected))


# ------------------------------------------------------------------------------------------------ synthetic data


def test_synthetic_dialogs_describe_the_shapes(tmp_path):
    from vlkit.data.synth import COLORS, _make_example
    from vlkit.data.synth_qa import generate_kind

    path = generate_kind(tmp_path / "d", 30, "dialog", seed=5)
    body = json.loads(path.read_text())
    answers, questions = body["data"]["answers"], body["data"]["questions"]
    dense = json.loads((tmp_path / "d" / "visdial_synth_dense_annotations.json").read_text())
    for dialog, annotation in zip(body["data"]["dialogs"], dense):
        image, record = _make_example(5, dialog["image_id"], 64)  # what the shapes generator drew
        colours_drawn = {c for _, c in image.getcolors(64 * 64)}
        rounds = dialog["dialog"]
        assert all(len(r["answer_options"]) == 10 and r["answer_options"][r["gt_index"]] == r["answer"]
                   for r in rounds)
        assert answers[rounds[0]["answer"]] == ("one", "two", "three")[record["count"] - 1]
        assert answers[rounds[1]["answer"]] == record["class_name"].split()[0]  # the largest object's colour
        name = questions[rounds[2]["question"]].split(" ", 3)[-1].rstrip("?")  # "is there a red circle?"
        if answers[rounds[2]["answer"]] == "yes":  # its colour is in the pixels (exact in PNG)
            assert COLORS[name.split()[0]] in colours_drawn
        else:
            assert name != record["class_name"]
        relevance = annotation["gt_relevance"]
        assert annotation["round_id"] == 2 and relevance[rounds[1]["gt_index"]] == 1.0
    assert generate_kind(tmp_path / "again", 30, "dialog", seed=5).read_bytes() == path.read_bytes()


# ------------------------------------------------------------------------------------------------ training, eval


@pytest.fixture(scope="module")
def trained_dialogs(tmp_path_factory):
    """A tiny ALBEF trained on 120 synthetic dialogs; returns (dataset, run, final metrics)."""
    from vlkit.config.load import load_config
    from vlkit.data.synth_dialog import generate_dialogs
    from vlkit.train.trainer import Trainer

    root = tmp_path_factory.mktemp("visdial")
    data = root / "d.lance"
    ingest([generate_dialogs(root / "d", 120, seed=3)], data, progress=False, val_fraction=0.25, test_fraction=0.0)
    cfg = load_config(None, [
        f"datasets={{vd: {{path: {data}}}}}", "tasks=[{name: visdial, dataset: vd, negatives: 5, history_rounds: 1}]",
        f"output_dir={root / 'run'}", "batch_size=16", "epochs=10", "model.name=albef-tiny", "progress=false",
        "tensorboard=false", "log_every=1", "precision=fp32", "optim.warmup_steps=10", "optim.lr_image=1e-3",
        "optim.lr_text=1e-3", "optim.lr_head=1e-3", "optim.weight_decay=0.01", "eval_every=100000",
        "save_every=100000"])
    return data, root / "run", Trainer(cfg).run()


def test_tiny_albef_ranks_answers_above_chance(trained_dialogs):
    _, _, m = trained_dialogs
    mrr, chance = m["val/vd/mrr"], m["val/vd/chance_mrr"]
    print(f"\nsynthetic dialogs: MRR {mrr:.1f} (random {chance:.1f}), R@1 {m['val/vd/r1']:.1f}, "
          f"mean rank {m['val/vd/mean_rank']:.2f}, NDCG {m['val/vd/ndcg']:.1f}")
    assert chance == pytest.approx(100 * sum(1 / r for r in range(1, 11)) / 10)  # ten options per round
    assert mrr > chance + 15
    assert m["val/vd/mean_rank"] < 5.5 - 1  # a random ranking of ten has mean rank 5.5
    assert 0 <= m["val/vd/ndcg"] <= 100


def test_vlkit_eval_task_visdial_scores_as_training_did(trained_dialogs, tmp_path, capsys):
    from vlkit.eval.dialog import print_dialog_table

    data, run, m = trained_dialogs
    r = run_cli("eval", run, "--task", "visdial", "--data", data, "--split", "val", "--json",
                "--report", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["history_rounds"] == 1  # read from the run's config
    for key in ("mrr", "r1", "r5", "r10", "mean_rank", "ndcg"):
        assert out["metrics"][f"val/d/{key}"] == pytest.approx(m[f"val/vd/{key}"], abs=1e-6), key
    assert out["rounds_with_answer"] == 3 * out["images"] and out["rounds_with_relevance"] == out["images"]
    assert out["chance_mrr"] == pytest.approx(m["val/vd/chance_mrr"]) and out["chance_mean_rank"] == 5.5
    assert "Visual Dialog" in (tmp_path / "report" / "index.html").read_text()
    print_dialog_table(out)
    table = capsys.readouterr().out
    assert f"{'MRR':12}{out['metrics']['val/d/mrr']:8.2f}   (random ranking 29.29)" in table


def test_vlkit_predict_task_visdial_ranks_reproduce_the_metrics(trained_dialogs, tmp_path):
    """Each predicted round's ranks give back vlkit eval's MRR, R@1 and mean rank."""
    data, run, m = trained_dialogs
    out = tmp_path / "preds.jsonl"
    r = run_cli("predict", run, "--task", "visdial", "--data", data, "--split", "val", "--out", out)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    scored = [line for line in lines if line["gt_index"] is not None]
    assert scored and all(sorted(line["ranks"]) == list(range(1, len(line["ranks"]) + 1)) for line in lines)
    assert all(line["ranks"][line["best_option"]] == 1 and 1 <= line["round"] <= 3 for line in lines)
    gt_ranks = [line["ranks"][line["gt_index"]] for line in scored]
    assert 100 * sum(1 / rank for rank in gt_ranks) / len(gt_ranks) == pytest.approx(m["val/vd/mrr"], abs=1e-6)
    assert 100 * sum(rank == 1 for rank in gt_ranks) / len(gt_ranks) == pytest.approx(m["val/vd/r1"], abs=1e-6)
    assert sum(gt_ranks) / len(gt_ranks) == pytest.approx(m["val/vd/mean_rank"], abs=1e-6)


def test_vlkit_eval_task_visdial_on_data_without_dialogs_is_one_line(trained_dialogs, synth):
    _, run, _ = trained_dialogs
    r = run_cli("eval", run, "--task", "visdial", "--data", synth, "--split", "val")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no dialogs" in r.stderr


def test_dialog_keys_belong_to_the_visdial_task(tmp_path):
    from vlkit.config.load import load_config
    from vlkit.errors import VlkitError

    data = f"datasets={{a: {{path: {tmp_path / 'a.lance'}}}}}"
    with pytest.raises(VlkitError, match=r"tasks\.0\.negatives: only the visdial task reads it"):
        load_config(None, [data, "tasks=[{name: vqa, dataset: a, negatives: 3}]"])
    with pytest.raises(VlkitError, match=r"tasks\.0\.negatives"):
        load_config(None, [data, "tasks=[{name: visdial, dataset: a, negatives: 0}]"])
    cfg = load_config(None, [data, "tasks=[{name: visdial, dataset: a, negatives: 3, history_rounds: 0}]"])
    assert (cfg.tasks[0].negatives, cfg.tasks[0].history_rounds) == (3, 0)
