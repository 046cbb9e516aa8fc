"""The Hugging Face text encoder wrapper against sentence-transformers (an independent reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlkit.data.text import TextTokenizer
from vlkit.errors import VlkitError
from vlkit.modules.encoders.hf_text import HFTextEncoder


def test_minilm_mean_pooling_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    enc = HFTextEncoder("minilm").eval()
    texts = ["a dog running on grass", "a cat", "two people riding horses on a beach at sunset"]
    tok = TextTokenizer(enc.path, max_length=64)
    batch = tok(texts)
    with torch.no_grad():
        ours = enc(batch["input_ids"], batch["attention_mask"])
    reference = SentenceTransformer(enc.path, device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(F.normalize(ours, dim=-1), F.normalize(reference, dim=-1), atol=1e-5)
    assert enc.width == 384 and len(enc.blocks) == 6
    cls = HFTextEncoder("minilm", pooling="cls").eval()
    with torch.no_grad():
        tokens = cls.forward_features(batch["input_ids"], batch["attention_mask"])
        assert torch.equal(cls(batch["input_ids"], batch["attention_mask"]), tokens[:, 0])


def test_bad_paths_and_pooling(tmp_path):
    with pytest.raises(VlkitError, match="not a Hugging Face model directory"):
        HFTextEncoder(str(tmp_path))
    with pytest.raises(VlkitError, match="pooling"):
        HFTextEncoder("minilm", pooling="max")
