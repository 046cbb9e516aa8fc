"""Caption tokenisation on Hugging Face ``tokenizers``.

:class:`TextTokenizer` wraps a ``tokenizer.json`` (CLIP BPE, BERT WordPiece, or the small
word-level vocabulary :func:`build_word_tokenizer` trains for test models) and turns a
batch of captions into padded ``input_ids`` and ``attention_mask`` tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from vlkit.errors import VlkitError

TOKENIZER_FILE = "tokenizer.json"

#: Pad tokens looked up, in order, when the tokenizer does not configure padding itself.
PAD_TOKENS = ("[PAD]", "<pad>", "<|endoftext|>")

#: Special tokens of :func:`build_word_tokenizer`, in id order.
WORD_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _resolve_path(path: str | Path) -> Path:
    """The tokenizer.json that ``path`` names: the file itself or one inside the directory."""
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def _find_pad_id(tok: Tokenizer) -> int:
    """Pad id the tokenizer configures, else the id of a known pad token, else 0."""
    if tok.padding is not None:
        return int(tok.padding["pad_id"])
    for token in PAD_TOKENS:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0


class TextTokenizer:
    """Batches of captions to padded token-id tensors.

    Texts are encoded with the tokenizer's own normaliser, pre-tokeniser, model and
    post-processor (special tokens included), truncated to ``max_length`` by the
    tokenizer (so template tokens such as ``[SEP]`` survive truncation), then padded.

    Args:
        path: a ``tokenizer.json`` file, or a directory that contains one.
        max_length: most tokens per text, special tokens included.
        pad_to_max: pad every batch to ``max_length`` instead of to its longest text.

    Raises:
        VlkitError: the file is missing or not a readable tokenizer, or max_length is
            shorter than the special tokens the tokenizer adds.
    """

    def __init__(self, path: str | Path, max_length: int = 77, pad_to_max: bool = False) -> None:
        file = _resolve_path(path)
        if not file.is_file():
            raise VlkitError(f"tokenizer file not found: {file}")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises plain Exception on bad JSON
            raise VlkitError(f"cannot read tokenizer {file}: {exc}") from exc
        self._setup(tok, max_length, pad_to_max)

    @classmethod
    def from_tokenizer(
        cls, tok: Tokenizer, max_length: int = 77, pad_to_max: bool = False
    ) -> "TextTokenizer":
        """Wrap an in-memory tokenizer; a copy is taken, ``tok`` itself is left unchanged.

        Args:
            tok: the tokenizer.
            max_length: most tokens per text, special tokens included.
            pad_to_max: pad every batch to ``max_length``.

        Returns:
            The wrapper.
        """
        self = cls.__new__(cls)
        self._setup(tok, max_length, pad_to_max)
        return self

    def _setup(self, tok: Tokenizer, max_length: int, pad_to_max: bool) -> None:
        """Copy the tokenizer, replacing its padding and truncation with ours."""
        if max_length < 1:
            raise VlkitError(f"max_length must be at least 1, got {max_length}")
        specials = tok.post_processor.num_special_tokens_to_add(False) if tok.post_processor else 0
        if max_length < specials:
            raise VlkitError(
                f"max_length={max_length} is shorter than the {specials} special tokens "
                "the tokenizer adds to every text"
            )
        self._pad_id = _find_pad_id(tok)
        self._tok = Tokenizer.from_str(tok.to_str())
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)
        self._pair_tok: Tokenizer | None = None  # made on first use by encode_with_words
        self.max_length = max_length
        self.pad_to_max = pad_to_max

    @property
    def tokenizer(self) -> Tokenizer:
        """The underlying tokenizer (with truncation to ``max_length`` set, no padding)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        """Id that fills padded positions."""
        return self._pad_id

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise a batch of texts.

        Args:
            texts: the texts; a single string is treated as a batch of one.

        Returns:
            ``input_ids`` and ``attention_mask``, both int64 ``[batch, length]``, where
            length is the longest text in the batch (or ``max_length`` with
            ``pad_to_max``); the mask is 1 on tokens and 0 on padding.

        Raises:
            VlkitError: a text cannot be tokenised within ``max_length``.
        """
        if isinstance(texts, str):
            texts = [texts]
        try:
            encodings = self._tok.encode_batch(list(texts))
        except Exception as exc:  # e.g. max_length shorter than the template's tokens
            raise VlkitError(f"cannot tokenise with max_length={self.max_length}: {exc}") from exc
        rows = [enc.ids[: self.max_length] for enc in encodings]
        return self._pad(rows)

    def encode_with_words(self, texts: Sequence[str], words: Sequence[Sequence[str]]) -> dict[str, torch.Tensor]:
        """Tokenise each text paired with a list of words (e.g. the OCR tokens read in an image) as the second
        sequence of a pair (``[CLS] text [SEP] words [SEP]`` for the word tokenizer), and find where each word
        starts.

        The words are joined with spaces; truncation to ``max_length`` cuts the words first (the text only
        when it does not fit alone).

        Args:
            texts: the texts (e.g. questions).
            words: for each text, its words (possibly none).

        Returns:
            ``input_ids`` and ``attention_mask`` as :meth:`__call__` gives them, and ``word_positions``
            ``[batch, most words]`` int64: the position of each word's first token, -1 for a word cut off by
            truncation (or a word that gives no token) and for padding.

        Raises:
            VlkitError: the lists differ in length, or a text cannot be tokenised within ``max_length``.
        """
        if isinstance(texts, str) or len(texts) != len(words):
            raise VlkitError(f"encode_with_words: {len(words)} word lists for {len(texts)} texts")
        rows, positions = [], []
        for text, row_words in zip(texts, words):
            row_words = [w for w in row_words if w and w.strip()]
            starts, offset = [], 0
            for w in row_words:
                starts.append(offset)
                offset += len(w) + 1
            try:
                enc = self._encode_pair(text, " ".join(row_words)) if row_words else self._tok.encode(text)
            except Exception as exc:
                raise VlkitError(f"cannot tokenise with max_length={self.max_length}: {exc}") from exc
            ids = enc.ids[: self.max_length]
            found = [enc.char_to_token(start, 1) for start in starts]
            rows.append(ids)
            positions.append([p if p is not None and p < len(ids) else -1 for p in found])
        out = self._pad(rows)
        most = max((len(p) for p in positions), default=0)
        word_positions = torch.full((len(rows), most), -1, dtype=torch.int64)  # [B, K]
        for i, p in enumerate(positions):
            word_positions[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
        out["word_positions"] = word_positions
        return out

    def _encode_pair(self, text: str, second: str):
        """A pair's encoding, truncated in the second sequence (both, longest first, when the text alone is
        too long)."""
        if self._pair_tok is None:
            self._pair_tok = Tokenizer.from_str(self._tok.to_str())
            self._pair_tok.enable_truncation(max_length=self.max_length, strategy="only_second")
        try:
            return self._pair_tok.encode(text, second)
        except Exception:  # the text leaves no room for the second sequence
            return self._tok.encode(text, second)

    def _pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad id lists into ids and mask tensors."""
        longest = max((len(r) for r in rows), default=0)
        length = self.max_length if self.pad_to_max else longest
        input_ids = torch.full((len(rows), length), self._pad_id, dtype=torch.int64)  # [B, L]
        attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)  # [B, L]
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def encode_plain(self, text: str) -> list[int]:
        """The ids of ``text`` without the special tokens the post-processor adds (a prompt prefix, for
        example), not truncated."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def token_id(self, token: str) -> int | None:
        """The id of a token of the vocabulary (e.g. ``[SEP]``), or None."""
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (special tokens dropped by default), as the tokenizer's decoder joins it
        (WordPiece ``##`` pieces merged, byte-level BPE bytes restored)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return self._tok.decode_batch([list(s) for s in sequences], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as ``tokenizer.json``.

        Args:
            path: a ``.json`` file path, or a directory (created if needed) to write
                ``tokenizer.json`` into.

        Returns:
            The file written.
        """
        path = Path(path)
        file = path if path.suffix == ".json" and not path.is_dir() else path / TOKENIZER_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(file))
        return file

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, "
            f"pad_to_max={self.pad_to_max}, pad_id={self.pad_id})"
        )


def build_word_tokenizer(texts: Iterable[str], max_length: int = 32) -> TextTokenizer:
    """Train a word-level tokenizer on some texts, for tiny models on synthetic captions.

    Words are lowercased and split at whitespace and punctuation, and every CJK ideograph is a
    word of its own (Chinese is written without spaces), as BERT's basic tokenizer splits text:
    the ideographs of the Unicode CJK Unified Ideographs blocks (and their extensions and
    compatibility blocks); Hangul and kana stay whole words. Every word seen becomes a token
    (accents are kept). Ids 0-4 are ``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``; words never seen map
    to ``[UNK]`` and each text is wrapped as ``[CLS] ... [SEP]``.

    Args:
        texts: training texts.
        max_length: most tokens per text, ``[CLS]`` and ``[SEP]`` included.

    Returns:
        The trained tokenizer, wrapped.
    """
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    # lowercase, and a space either side of every CJK ideograph, so the split below makes each one a word
    tok.normalizer = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=True, strip_accents=False,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=list(WORD_SPECIAL_TOKENS), min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return TextTokenizer.from_tokenizer(tok, max_length=max_length)
