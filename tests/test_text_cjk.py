"""Chinese text through the built-in word tokenizer: every CJK ideograph is a token (as BERT's basic tokenizer
splits), ids round-trip, and a tiny CLIP trains on Chinese captions."""

from __future__ import annotations

import json
import unicodedata

import pytest

from vlkit.data.text import TextTokenizer, build_word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# BERT's _is_chinese_char ranges, written out here as the reference
CJK_RANGES = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]

CAPTIONS = ["一只红色的圆形在灰色背景上。", "蓝色的正方形，和一个小的三角形！", "A red circle 和 蓝色的 Square.",
            "𠀀𠀁 are extension-B ideographs", "한국어 텍스트 and かな stay whole", "café au lait"]


def _is_cjk(ch: str) -> bool:
    return any(lo <= ord(ch) <= hi for lo, hi in CJK_RANGES)


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(ch).startswith("P")


def reference_words(text: str) -> list[str]:
    """A slow loop of BERT's basic tokenisation (lowercase, accents kept): CJK ideographs and punctuation are
    words of their own, whitespace separates the rest."""
    words, current = [], ""
    for ch in text.lower():
        if ch.isspace() or _is_cjk(ch) or _is_punct(ch):
            if current:
                words.append(current)
            current = ""
            if not ch.isspace():
                words.append(ch)
        else:
            current += ch
    return words + ([current] if current else [])


def test_words_match_a_slow_reference_of_bert_basic_tokenisation():
    tok = build_word_tokenizer(CAPTIONS, max_length=64)
    for caption in CAPTIONS:
        normalized = tok.tokenizer.normalizer.normalize_str(caption)
        got = [w for w, _ in tok.tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]
        assert got == reference_words(caption), caption
    vocab = tok.tokenizer.get_vocab()
    assert {"红", "色", "圆", "形", "𠀀", "𠀁", "，", "。", "！"} <= set(vocab)
    assert "红色的圆形" not in vocab and "한국어" in vocab and "かな" in vocab and "café" in vocab


def test_words_match_the_bert_basic_tokenizer_of_transformers():
    legacy = pytest.importorskip("transformers.models.bert.tokenization_bert_legacy")
    basic = legacy.BasicTokenizer(do_lower_case=True, strip_accents=False)
    tok = build_word_tokenizer(CAPTIONS, max_length=64)
    for caption in CAPTIONS:
        ids = tok([caption])["input_ids"][0].tolist()[1:-1]
        assert [tok.tokenizer.id_to_token(i) for i in ids] == basic.tokenize(caption)


def test_chinese_round_trip_and_shared_characters(tmp_path):
    tok = build_word_tokenizer(CAPTIONS[:2], max_length=32)
    ids = tok(["红色的三角形"])["input_ids"][0].tolist()  # a sentence never seen whole: every character known
    assert tok.token_id("[UNK]") not in ids and len(ids) == 2 + 6
    text = tok.decode(ids)
    assert text.replace(" ", "") == "红色的三角形"
    again = TextTokenizer(tok.save(tmp_path), max_length=32)
    assert again(["红色的三角形"])["input_ids"][0].tolist() == ids
    assert again([text])["input_ids"][0].tolist() == ids  # the decoded text encodes to the same ids


_ZH_COLORS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"}
_ZH_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}


def test_tiny_clip_learns_from_chinese_captions(tmp_path):
    from vlkit.config.load import load_config
    from vlkit.data.ingest import ingest
    from vlkit.data.synth import generate
    from vlkit.train.trainer import Trainer

    jsonl = generate(tmp_path / "synth", 160, seed=11)
    rows = []
    for line in jsonl.read_text().splitlines():
        row = json.loads(line)
        color, shape = row["class_name"].split()
        zh = f"{_ZH_COLORS[color]}的{_ZH_SHAPES[shape]}"
        rows.append({"image": str(tmp_path / "synth" / row["image"]), "text": [f"一个{zh}", f"图片里有{zh}"]})
    zh_jsonl = tmp_path / "zh.jsonl"
    zh_jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    data = tmp_path / "zh.lance"
    ingest([zh_jsonl], data, images_root=tmp_path, val_fraction=0.25, test_fraction=0.0, progress=False)
    run = tmp_path / "run"
    cfg = load_config(None, [f"datasets={{zh: {{path: {data}}}}}", "tasks=[{name: retrieval, dataset: zh}]",
                             f"output_dir={run}", "model.name=clip-tiny", "batch_size=32", "epochs=15",
                             "log_every=1", "progress=false", "optim.warmup_steps=5", "optim.lr_image=1e-3",
                             "optim.lr_text=1e-3", "optim.lr_head=1e-3", "eval_every=1000", "save_every=1000"])
    metrics = Trainer(cfg).run()
    saved = TextTokenizer(run / "model", max_length=32)
    assert {"红", "圆", "正", "三"} <= set(saved.tokenizer.get_vocab())  # characters, not whole sentences
    losses = [json.loads(x)["train/loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in x]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    # ~40 val images: a random ranking puts the right one in the top 5 about 13% of the time
    assert metrics["val/zh/t2i_r5"] > 30.0
