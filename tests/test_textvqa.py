"""TextVQA: its ``{"data": [...]}`` file ingests with the OCR tokens as a column; the tokens go to the model after
the question; the OCR pointer scores token positions and copies answers from them, words never seen in training
included."""

from __future__ import annotations

import contextlib
import json
import math

import lance
import pytest
import torch

from vlkit.data.answers import AnswerVocab, ocr_targets
from vlkit.data.ingest import ingest
from vlkit.data.readers import detect_format
from vlkit.data.text import build_word_tokenizer
from vlkit.modules.heads.ocr_pointer import NO_TOKEN, OCRPointer
from vlkit.tasks.vqa_inputs import QuestionBatch, decode_answers, head_inputs

from .conftest import jpeg_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _entry(image_id: str, question: str, answers: list[str], ocr, qid: int) -> dict:
    return {"question": question, "image_id": image_id, "image_classes": ["Poster"], "question_id": qid,
            "flickr_original_url": f"https://example.invalid/{image_id}_o.jpg",
            "flickr_300k_url": f"https://example.invalid/{image_id}_z.jpg", "image_width": 48, "image_height": 32,
            "answers": answers, "question_tokens": question.rstrip("?").split(), "set_name": "train",
            "ocr_tokens": ocr}


@pytest.fixture(scope="module")
def textvqa_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("textvqa")
    (root / "train_images").mkdir()
    for i, image_id in enumerate(["0054c91397f2fe05", "005635e119b9f32f", "00685bc495504d61"]):
        (root / "train_images" / f"{image_id}.jpg").write_bytes(jpeg_bytes((60 * i, 90, 30)))
    data = [
        _entry("0054c91397f2fe05", "what is the brand of this camera?", ["nous les gosses"] * 3 + ["dakota"] * 7,
               ["nous", "les", "gosses", "Dakota"], 34602),
        _entry("0054c91397f2fe05", "what does the small white text spell?", ["copenhagen"] * 10,
               ["nous", "les", "gosses", "Dakota"], 34603),
        _entry("005635e119b9f32f", "what kind of beer is this?", ["ale"] * 9 + ["sublimely self-righteous ale"],
               ["SUBLIMELY", "SELF-RIGHTEOUS", "ALE"], 34604),
        _entry("00685bc495504d61", "what number is on the jersey?", ["22"] * 10, "22", 34605),  # bad tokens
        _entry("ffffffffffffffff", "what is written here?", ["stop"] * 10, ["STOP"], 34606),  # no image
    ]
    path = root / "TextVQA_0.5.1_train.json"
    path.write_text(json.dumps({"dataset_type": "train", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                                "data": data}))
    return path


def test_textvqa_file_ingests_with_ocr_tokens_per_image(textvqa_file, tmp_path):
    assert detect_format(textvqa_file) == "textvqa"
    report = ingest([textvqa_file], tmp_path / "t.lance", split="train", progress=False)
    reasons = " | ".join(str(p) for p in report.problems)
    assert "data[3]: ocr_tokens must be a list of strings" in reasons
    assert "data[4]: no image for this question (ffffffffffffffff)" in reasons
    ds = lance.dataset(str(tmp_path / "t.lance"))
    assert str(ds.schema.field("ocr_tokens").type) == "list<item: string>"
    rows = {r["id"]: r for r in ds.to_table(columns=["id", "questions", "answers", "ocr_tokens"]).to_pylist()}
    assert set(rows) == {"train_images/0054c91397f2fe05.jpg", "train_images/005635e119b9f32f.jpg"}
    camera = rows["train_images/0054c91397f2fe05.jpg"]
    assert camera["questions"] == ["what is the brand of this camera?", "what does the small white text spell?"]
    assert camera["answers"][0] == ["nous les gosses"] * 3 + ["dakota"] * 7
    assert camera["ocr_tokens"] == ["nous", "les", "gosses", "Dakota"]


def test_a_word_vocabulary_learns_the_ocr_tokens(textvqa_file, tmp_path):
    """A model trained from scratch builds its word vocabulary from the OCR tokens too, so they reach it as words."""
    from vlkit.config.load import load_config
    from vlkit.train.model_setup import training_captions

    ingest([textvqa_file], tmp_path / "t.lance", split="train", progress=False)
    cfg = load_config(None, [f"datasets={{t: {{path: {tmp_path / 't.lance'}, val_split: null}}}}",
                             "tasks=[{name: vqa, dataset: t}]", "model.name=albef-tiny"])
    texts = training_captions(cfg)
    assert {"gosses", "Dakota", "SELF-RIGHTEOUS"} <= set(texts)  # words only the OCR tokens hold
    assert "what kind of beer is this?" in texts


def test_the_official_question_file_and_the_rosetta_ocr_file_ingest_together(textvqa_file, tmp_path):
    root = textvqa_file.parent
    data = json.loads(textvqa_file.read_text())["data"][:3]
    for entry in data:
        del entry["ocr_tokens"]  # the official 0.5.1 files have none: they are in the OCR file
    questions = root / "TextVQA_0.5.1_val.json"
    questions.write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    ocr = root / "TextVQA_Rosetta_OCR_v0.2_val.json"
    ocr.write_text(json.dumps({"data": [
        {"image_id": "005635e119b9f32f", "ocr_tokens": ["SUBLIMELY", "ALE"], "ocr_info": [{"word": "SUBLIMELY"}]},
        {"image_id": "0054c91397f2fe05", "ocr_tokens": ["Dakota"], "ocr_info": []}]}))
    assert detect_format(ocr) == "textvqa"
    for order in ([questions, ocr], [ocr, questions]):
        out = tmp_path / f"{order[0].stem}.lance"
        report = ingest(order, out, split="val", progress=False)
        assert not report.problems
        rows = {r["id"]: r for r in lance.dataset(str(out)).to_table(
            columns=["id", "questions", "ocr_tokens"]).to_pylist()}
        assert rows["train_images/005635e119b9f32f.jpg"]["ocr_tokens"] == ["SUBLIMELY", "ALE"]
        assert rows["train_images/0054c91397f2fe05.jpg"]["ocr_tokens"] == ["Dakota"]
        assert len(rows["train_images/0054c91397f2fe05.jpg"]["questions"]) == 2


def test_ocr_tokens_follow_the_question_and_their_positions_are_found():
    tok = build_word_tokenizer(["what word is written on the left?", "stop exit self righteous ale"], max_length=14)
    qb = QuestionBatch(owner=[0, 1], questions=["what word is written on the left?", "what word?"],
                       answers=[["stop"], ["ale"]], answerable=[None, None], answer_types=[None, None],
                       ocr_tokens=[["STOP", "exit", "ale", "stop"], ["self-righteous", "ale"]])
    images = torch.zeros(2, 3, 8, 8)
    inputs = head_inputs(tok, images, qb, pointer=True, device="cpu")
    ids, positions = inputs.args[1], inputs.kwargs["ocr_positions"]
    for i, words in enumerate(qb.ocr_tokens):
        for k, word in enumerate(words[: positions.shape[1]]):
            p = int(positions[i, k])
            if p >= 0:  # the token at the position is the word's first piece (lowercased, split at punctuation)
                assert tok.tokenizer.id_to_token(int(ids[i, p])) == word.lower().split("-")[0]
    # question 0: [CLS] 8 question tokens [SEP] = 10, then 4 words would need 14 + [SEP]: the last is cut off
    assert positions[0].tolist() == [10, 11, 12, -1]
    assert positions[1].tolist()[:2] == [5, 8]  # [CLS] what word ? [SEP], then "self - righteous" is three tokens
    assert inputs.slots == [["STOP", "exit", "ale", ""], ["self-righteous", "ale"]]
    plain = head_inputs(tok, images, qb, pointer=False, device="cpu")  # OCR as text without a pointer
    assert plain.kwargs == {} and plain.slots is None and torch.equal(plain.args[1], ids)
    # copy targets: every slot holding a (normalised) human answer; a cut-off token is never a target
    vocab = AnswerVocab(["yes", "no"])
    from vlkit.tasks.vqa_inputs import answer_targets

    targets = answer_targets(vocab, qb, inputs)
    assert targets.shape == (2, 2 + positions.shape[1])
    # "stop" at slot 3 was cut off by the length: no target there
    assert targets[0, 2:].tolist() == pytest.approx([1 / 3, 0.0, 0.0, 0.0])
    assert targets[1, 2:].tolist()[:2] == pytest.approx([0.0, 1 / 3])


@torch.no_grad()
def test_pointer_scores_equal_a_slow_loop():
    torch.manual_seed(0)
    pointer = OCRPointer(8, dim=4)
    pooled, tokens = torch.randn(2, 8), torch.randn(2, 6, 8)
    positions = torch.tensor([[1, 4, -1], [5, -1, -1]])
    got = pointer(pooled, tokens, positions)
    for b in range(2):
        q = pointer.query.weight @ pooled[b] + pointer.query.bias
        for k in range(3):
            p = int(positions[b, k])
            if p < 0:
                assert got[b, k] == NO_TOKEN
                continue
            key = pointer.key.weight @ tokens[b, p] + pointer.key.bias
            assert got[b, k].item() == pytest.approx(float(q @ key) / math.sqrt(4), rel=1e-5, abs=1e-6)


def test_ocr_targets_and_decoding():
    answers = ["Dakota"] * 7 + ["nous les gosses"] * 3
    assert ocr_targets(answers, ["nous", "DAKOTA", "dakota.", "x"], 6).tolist() == [0, 1, 1, 0, 0, 0]
    assert ocr_targets(["ale", "ale"], ["ale"], 1).tolist() == [pytest.approx(2 / 3)]
    vocab = AnswerVocab(["yes", "no"])
    logits = torch.tensor([[0.0, 1.0, 0.5, NO_TOKEN], [0.0, 0.0, 0.1, 3.0]])
    assert decode_answers(logits, vocab, [["stop", ""], ["a", "exit"]]) == ["no", "exit"]


# ---------------------------------------------------------------- training on written words

TINY = ["model.name=albef-tiny", "progress=false", "tensorboard=false", "log_every=1", "precision=fp32",
        "optim.warmup_steps=10", "optim.lr_image=1e-3", "optim.lr_text=1e-3", "optim.lr_head=1e-3",
        "optim.weight_decay=0.01", "eval_every=100000", "save_every=100000"]


@pytest.fixture(scope="module")
def pointer_run(tmp_path_factory):
    from vlkit.config.load import load_config
    from vlkit.data.synth_qa import generate_kind
    from vlkit.train.trainer import Trainer

    root = tmp_path_factory.mktemp("text_synth")
    ingest([generate_kind(root / "d", 200, "text", seed=3)], root / "d.lance", progress=False, val_fraction=0.2,
           test_fraction=0.0)
    cfg = load_config(None, [f"datasets={{qa: {{path: {root / 'd.lance'}}}}}", "tasks=[{name: vqa, dataset: qa}]",
                             f"output_dir={root / 'run'}", "batch_size=32", "epochs=20",
                             "model.args={ocr_pointer: true}", *TINY])
    metrics = Trainer(cfg).run()
    return root / "run", metrics


def test_the_pointer_learns_to_read_the_written_word(pointer_run):
    run, metrics = pointer_run
    print(f"\nwritten-word questions ({metrics['val/qa/vqa_questions']:.0f}): tiny ALBEF with the OCR pointer "
          f"{metrics['val/qa/vqa_acc']:.1f}%, majority answer {metrics['val/qa/vqa_majority_acc']:.1f}%")
    assert metrics["val/qa/vqa_acc"] > 80.0 and metrics["val/qa/vqa_majority_acc"] < 15.0


def test_the_pointer_copies_words_never_seen_in_training(pointer_run, tmp_path, monkeypatch):
    from vlkit.data.dataset import LanceImageTextDataset
    from vlkit.data.synth_qa import generate_kind
    from vlkit.inference.loading import load_for_inference
    from vlkit.tasks.vqa import QA_COLUMNS, answer_questions
    from vlkit.train.distributed import DistInfo

    run, _ = pointer_run
    monkeypatch.setattr("vlkit.data.synth_qa.WORDS", ("lagoon", "violin", "marble", "falcon", "copper", "quartz"))
    ingest([generate_kind(tmp_path / "new", 40, "text", seed=8)], tmp_path / "new.lance", split="val",
           progress=False)
    loaded = load_for_inference(run)
    vocab = loaded.model.config.answers
    assert not {"lagoon", "violin", "marble", "falcon", "copper", "quartz"} & set(vocab)
    # opened as vlkit eval opens it (without the OCR column): the answering reads the column itself
    ds = LanceImageTextDataset(tmp_path / "new.lance", "val", loaded.model.preprocess.image_transform(train=False),
                               None, captions="none", columns=QA_COLUMNS, require=["questions"])
    result = answer_questions(loaded.model, loaded.tokenizer, ds, DistInfo(), contextlib.nullcontext(), 32)
    right = sum(r.prediction == r.answers[0] for r in result)
    print(f"\nquestions about {len(result)} words never seen in training: {100 * right / len(result):.1f}% copied "
          "right by the OCR pointer")
    # no vocabulary answer can be right here; choosing a word of the image at random is right about 60% of the time
    assert right / len(result) > 0.85, [(r.prediction, r.answers) for r in result[:10]]


def test_a_generative_model_reads_the_ocr_tokens_in_its_prompt(tmp_path, monkeypatch):
    from vlkit.config.load import load_config
    from vlkit.data.synth_qa import generate_kind
    from vlkit.tasks import vqa as vqa_task
    from vlkit.train.trainer import Trainer

    jsonl = generate_kind(tmp_path / "d", 48, "text", seed=5)
    tokens_of = {}
    for line in jsonl.read_text().splitlines():
        row = json.loads(line)
        for q in row["questions"]:
            tokens_of.setdefault(q, set()).add(" ".join(row["ocr_tokens"]))
    ingest([jsonl], tmp_path / "d.lance", progress=False, val_fraction=0.25, test_fraction=0.0)
    seen: list[str] = []
    original = vqa_task.vqa_prompts
    monkeypatch.setattr(vqa_task, "vqa_prompts", lambda qs, t=None: seen.extend(qs) or original(qs, t))
    cfg = load_config(None, [f"datasets={{qa: {{path: {tmp_path / 'd.lance'}}}}}", "tasks=[{name: vqa, dataset: qa}]",
                             f"output_dir={tmp_path / 'run'}", "batch_size=16", "epochs=1", "model.name=coca-tiny",
                             "progress=false", "tensorboard=false", "precision=fp32", "eval_every=100000",
                             "save_every=100000"])
    metrics = Trainer(cfg).run()
    assert "val/qa/vqa_acc" in metrics and seen
    for text in seen:  # training and evaluation prompts: "<question> ocr: <the image's tokens>"
        question, ocr = text.split(" ocr: ")
        assert ocr in tokens_of[question]


@pytest.mark.parametrize("name", ["albef-tiny", "vilt-tiny", "vlmo-tiny"])
def test_each_fusion_family_puts_the_pointer_beside_its_answer_head(name):
    from vlkit.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(name, answers=["yes", "no", "2"], ocr_pointer=True, vocab_size=40).eval()
    size = model.preprocess.image_size
    images, ids = torch.randn(2, 3, size, size), torch.randint(5, 40, (2, 9))
    positions = torch.tensor([[4, 6, 7], [5, -1, -1]])
    with torch.no_grad():
        both = model(images, ids, torch.ones_like(ids), head="answer", ocr_positions=positions)
        plain = model(images, ids, torch.ones_like(ids), head="answer")  # no positions: the vocabulary alone
    assert both.shape == (2, 3 + 3) and torch.allclose(both[:, :3], plain, atol=1e-5)
    assert both[1, 4:].tolist() == [NO_TOKEN, NO_TOKEN] and (both[0, 3:] > NO_TOKEN).all()


def test_a_saved_vlmo_without_a_pointer_starts_one_with_its_answer_head(tmp_path):
    from vlkit.models.io import save_model
    from vlkit.models.registry import create_model

    saved = create_model("vlmo-tiny", answers=["yes", "no", "2"], vocab_size=40)
    save_model(saved, tmp_path / "m")
    loaded = create_model("vlmo-tiny", tmp_path / "m", answers=["yes", "no", "2"], ocr_pointer=True)
    assert loaded.ocr_pointer is not None and loaded.config.ocr_pointer
    for key, value in saved.answer_head.state_dict().items():
        assert torch.equal(loaded.answer_head.state_dict()[key], value)
