"""TextTokenizer against plain ``tokenizers.Tokenizer.encode`` as the reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from vlkit.data.text import TextTokenizer, build_word_tokenizer
from vlkit.errors import VlkitError

CAPTIONS = [
    "A black dog runs across the grass.",
    "Two children play on a red slide, laughing.",
    "A man rides a bicycle down a steep hill",
    "a dog",
    "",
]


def caption_words() -> set[str]:
    """The lowercased words of CAPTIONS, without the punctuation they contain."""
    return {w for text in CAPTIONS for w in re.sub(r"[,.]", " ", text.lower()).split()}


def reference_tokenizer() -> Tokenizer:
    """A word-level tokenizer built directly with ``tokenizers``, with [CLS]/[SEP] template."""
    words = sorted(caption_words())
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    vocab.update({word: i + 4 for i, word in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


def clip_like_tokenizer() -> Tokenizer:
    """A tiny byte-level BPE with CLIP's start/end tokens and no [PAD] token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CAPTIONS * 3, trainer=trainer)
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    return tok


@pytest.mark.parametrize("make", [reference_tokenizer, clip_like_tokenizer])
def test_ids_and_mask_match_reference(make) -> None:
    ref = make()
    tok = TextTokenizer.from_tokenizer(ref, max_length=77)
    batch = tok(CAPTIONS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    expected = [ref.encode(text).ids for text in CAPTIONS]
    longest = max(len(e) for e in expected)
    assert ids.dtype == mask.dtype == torch.int64
    assert ids.shape == mask.shape == (len(CAPTIONS), longest)
    for row, exp in enumerate(expected):
        assert ids[row, : len(exp)].tolist() == exp
        assert ids[row, len(exp) :].eq(tok.pad_id).all()
        assert mask[row].tolist() == [1] * len(exp) + [0] * (longest - len(exp))


def test_pad_id_lookup() -> None:
    assert TextTokenizer.from_tokenizer(reference_tokenizer()).pad_id == 0
    clip = clip_like_tokenizer()
    assert TextTokenizer.from_tokenizer(clip).pad_id == clip.token_to_id("<|endoftext|>") != 0
    bare = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    assert TextTokenizer.from_tokenizer(bare).pad_id == 0
    padded = reference_tokenizer()
    padded.enable_padding(pad_id=3, pad_token="[SEP]")
    assert TextTokenizer.from_tokenizer(padded).pad_id == 3


def test_wrapping_does_not_change_the_given_tokenizer() -> None:
    ref = reference_tokenizer()
    ref.enable_padding(pad_id=0, pad_token="[PAD]", length=50)
    TextTokenizer.from_tokenizer(ref, max_length=4)
    assert len(ref.encode("a dog").ids) == 50


def test_truncation_keeps_max_length_and_end_token() -> None:
    ref = reference_tokenizer()
    tok = TextTokenizer.from_tokenizer(ref, max_length=6)
    ids = tok(CAPTIONS)["input_ids"]
    assert ids.shape[1] == 6
    for row, text in enumerate(CAPTIONS):
        full = ref.encode(text).ids
        if len(full) > 6:
            assert ids[row].tolist() == full[:5] + [3]  # [CLS] + 4 words + [SEP]
        else:
            assert ids[row, : len(full)].tolist() == full


def test_pad_to_max() -> None:
    tok = TextTokenizer.from_tokenizer(reference_tokenizer(), max_length=20, pad_to_max=True)
    batch = tok(["a dog"])
    assert batch["input_ids"].shape == (1, 20)
    assert batch["attention_mask"].sum().item() == 4
    assert tok([])["input_ids"].shape == (0, 20)


def test_single_string_is_a_batch_of_one() -> None:
    tok = TextTokenizer.from_tokenizer(reference_tokenizer())
    assert torch.equal(tok("a dog")["input_ids"], tok(["a dog"])["input_ids"])


def test_max_length_shorter_than_specials_raises() -> None:
    with pytest.raises(VlkitError, match="max_length"):
        TextTokenizer.from_tokenizer(reference_tokenizer(), max_length=1)
    with pytest.raises(VlkitError, match="max_length"):
        TextTokenizer.from_tokenizer(reference_tokenizer(), max_length=0)


def test_save_load_round_trip_file_and_directory(tmp_path: Path) -> None:
    tok = TextTokenizer.from_tokenizer(clip_like_tokenizer(), max_length=12)
    written = tok.save(tmp_path / "tok")
    assert written == tmp_path / "tok" / "tokenizer.json" and written.is_file()
    from_dir = TextTokenizer(tmp_path / "tok", max_length=12)
    from_file = TextTokenizer(str(written), max_length=12)
    for loaded in (from_dir, from_file):
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.pad_id == tok.pad_id
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(loaded(CAPTIONS)[key], tok(CAPTIONS)[key])
    assert tok.save(tmp_path / "named.json") == tmp_path / "named.json"
    assert TextTokenizer(tmp_path / "named.json").vocab_size == tok.vocab_size


def test_missing_or_bad_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(VlkitError, match="nowhere"):
        TextTokenizer(missing)
    with pytest.raises(VlkitError, match=str(tmp_path)):
        TextTokenizer(tmp_path)  # a directory without tokenizer.json
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(VlkitError, match="bad.json"):
        TextTokenizer(bad)


def test_word_tokenizer() -> None:
    tok = build_word_tokenizer(CAPTIONS, max_length=32)
    vocab = tok.tokenizer.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert tok.pad_id == 0 and tok.max_length == 32
    ids = tok(["A DOG, laughing!", "zebra dog"])["input_ids"].tolist()
    comma, unk = vocab[","], 1
    assert ids[0][:5] == [2, vocab["a"], vocab["dog"], comma, vocab["laughing"]]
    assert ids[0][5] == unk  # "!" never appeared in the training texts
    assert ids[0][6] == 3
    assert ids[1][:4] == [2, unk, vocab["dog"], 3]
    # Every training word is known.
    words = caption_words()
    assert all(w in vocab for w in words)
    assert tok.vocab_size == len(words) + 5 + 2  # words, specials, "," and "."


def test_word_tokenizer_is_deterministic() -> None:
    a = build_word_tokenizer(CAPTIONS).tokenizer.get_vocab()
    b = build_word_tokenizer(reversed(CAPTIONS)).tokenizer.get_vocab()
    assert a == b
