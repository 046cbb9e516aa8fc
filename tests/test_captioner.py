"""The BLIP-style captioner and its BERT-shaped decoder, checked against transformers' BERT on the same weights."""

from __future__ import annotations

import pytest
import torch

import vlkit
from vlkit.models.io import load_model, save_model
from vlkit.modules.decoders.bert_decoder import BertTextDecoder, hf_bert_config, to_hf_bert_state_dict
from vlkit.modules.encoders.hf_text import resolve_text_encoder_path
from vlkit.modules.losses.captioning import caption_labels, caption_loss


def _randomise(module: torch.nn.Module, std: float = 0.3) -> None:
    """Non-trivial values everywhere (LayerNorm scales and biases, the output bias) so no mapping hides."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


@pytest.fixture(scope="module")
def minilm_path():
    return resolve_text_encoder_path("minilm")


def test_logits_equal_bert_lm_head_model_on_copied_weights():
    from transformers import BertLMHeadModel

    torch.manual_seed(0)
    dec = BertTextDecoder(vocab_size=120, dim=48, num_layers=3, num_heads=4, mlp_dim=96, max_positions=24).eval()
    _randomise(dec)
    ref = BertLMHeadModel(hf_bert_config(dec, _attn_implementation="eager")).eval()
    missing, unexpected = ref.load_state_dict(to_hf_bert_state_dict(dec), strict=False)
    assert not missing and not unexpected
    ids = torch.randint(5, 120, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    context = torch.randn(3, 9, 48)
    context_mask = torch.ones(3, 9, dtype=torch.bool)
    context_mask[2, 5:] = False
    ours = dec(ids, context, context_mask, mask)
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask, encoder_hidden_states=context,
                     encoder_attention_mask=context_mask.long()).logits
    real = mask.bool()
    assert ours.shape == (3, 11, 120)
    assert torch.allclose(ours[real], theirs[real], atol=1e-4)
    assert (ours - theirs)[real].abs().max() < 1e-4 < (ours[0] - ours[1]).abs().max()  # a real difference exists


def test_minilm_decoder_equals_minilm_as_a_causal_bert(minilm_path):
    """Without cross-attention the decoder is MiniLM run causally: its last hidden states equal transformers'
    BertModel(is_decoder=True) loaded from the same directory; with cross-attention it holds the same copies."""
    from transformers import BertModel

    plain = BertTextDecoder.from_hf_bert(minilm_path, cross_attention=False).eval()
    ref = BertModel.from_pretrained(minilm_path, is_decoder=True, add_pooling_layer=False,
                                    attn_implementation="eager").eval()
    ids = torch.tensor([[101, 1037, 3899, 2770, 2006, 1996, 5509, 102], [101, 2048, 2111, 102, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = plain.forward_features(ids, attention_mask=mask)
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(ours[mask.bool()], theirs[mask.bool()], atol=1e-4)

    crossed = BertTextDecoder.from_hf_bert(minilm_path, cross_attention=True)
    own, other = plain.state_dict(), crossed.state_dict()
    shared = [k for k in own if not k.startswith(("head.", "lm_bias"))]
    assert len(shared) == 5 + 6 * 12 and all(torch.equal(own[k], other[k]) for k in shared)
    new = sorted({k.split(".")[2] for k in other if k not in own})
    assert new == ["cross_attn", "ln_cross"]
    assert torch.equal(crossed.word_embed.weight, ref.embeddings.word_embeddings.weight)  # tied output layer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = vlkit.create_model("captioner-tiny").eval()
    _randomise(model, 0.05)
    return model


@pytest.fixture(scope="module")
def tiny_transformer():
    torch.manual_seed(0)
    model = vlkit.create_model("captioner-tiny", decoder="transformer").eval()
    _randomise(model, 0.05)
    return model


@pytest.mark.parametrize("name", ["tiny", "tiny_transformer"])
def test_cached_decoding_equals_teacher_forcing(name, request):
    tiny = request.getfixturevalue(name)
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(5, 1000, (2, 10))
    ids[:, 0] = tiny.generation.bos_token_id
    with torch.no_grad():
        full = tiny.caption_logits(images, ids)
        cache = tiny.start_decoding(images, max_length=12)
        steps = [tiny.decode_step(ids[:, :3], cache)]  # a prompt of three tokens, then one token at a time
        steps += [tiny.decode_step(ids[:, t : t + 1], cache) for t in range(3, 10)]
    assert cache.length == 10
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    # the beam layout: each sequence repeated, decoded on, equals its own teacher-forced logits
    with torch.no_grad():
        cache = tiny.start_decoding(images, max_length=12).repeat_interleave(3)
        tiny.decode_step(ids.repeat_interleave(3, 0)[:, :9], cache)
        last = tiny.decode_step(ids.repeat_interleave(3, 0)[:, 9:], cache)
    assert torch.allclose(last[:, 0], full[:, 9].repeat_interleave(3, 0), atol=1e-5)


def test_lite0_minilm_image_tokens_freezing_and_lr_groups():
    from vlkit.train.optim import lr_group

    model = vlkit.create_model("captioner-lite0-minilm", trainable_text_layers=2).eval()
    spec = model.generation
    assert (spec.bos_token_id, spec.eos_token_id, spec.pad_token_id, spec.vocab_size) == (101, 102, 0, 30522)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model.image_context(images).shape == (1, 49, 384)  # the 7x7 cells of the last feature map
    grad = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("visual.") for n in grad)  # the CNN is frozen
    assert "decoder.layers.5.self_attn.in_proj.weight" in grad and "decoder.layers.3.mlp.fc1.weight" not in grad
    assert "decoder.layers.0.cross_attn.q_proj.weight" in grad and "decoder.word_embed.weight" not in grad
    groups = {n: lr_group(model, n) for n, _ in model.named_parameters()}
    assert groups["visual._conv_stem.weight"] == "image"
    assert groups["decoder.layers.0.self_attn.in_proj.weight"] == groups["decoder.word_embed.weight"] == "text"
    assert groups["decoder.layers.0.cross_attn.kv_proj.weight"] == groups["image_proj.weight"] == "head"
    assert groups["decoder.head.dense.weight"] == groups["decoder.lm_bias"] == "head"
    mspp = vlkit.create_model("captioner-lite0-minilm", image_tokens="mspp").eval()
    with torch.no_grad():
        assert mspp.image_context(images).shape == (1, 37, 384)  # BriVL's 1 + 6x6 regions
    assert all(p.requires_grad for n, p in mspp.named_parameters() if n.startswith("decoder."))
    # the saved weights replace the pretrained ones: without them the shapes are the same
    bare = type(model)(model.config, load_pretrained_encoders=False)
    assert {k: v.shape for k, v in bare.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_save_load_round_trip(tiny, tmp_path):
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(5, 1000, (2, 7))
    save_model(tiny, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert type(loaded).__name__ == "Captioner" and loaded.config == tiny.config
    with torch.no_grad():
        assert torch.equal(loaded(images, ids), tiny(images, ids))
    with pytest.raises(vlkit.errors.VlkitError, match="one head"):
        tiny(images, ids, head="itm")


def _greedy(model, images: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by hand (the reference loop): the start token, then each argmax."""
    spec = model.generation
    cache = model.start_decoding(images, max_length=steps + 1)
    tokens = torch.full((images.shape[0], 1), spec.bos_token_id)
    for _ in range(steps):
        nxt = model.decode_step(tokens[:, -1:], cache)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


def test_tiny_captioner_overfits_eight_pairs():
    from vlkit.data.text import build_word_tokenizer

    captions = ["a red circle on the left", "a blue square at the top", "two green triangles", "one small dog",
                "a cat sleeping on a mat", "three yellow stars at night", "the big red bus", "a boat on the lake"]
    tok = build_word_tokenizer(captions)
    torch.manual_seed(0)
    model = vlkit.create_model("captioner-tiny", vocab_size=tok.vocab_size)
    images = torch.randn(8, 3, 32, 32)
    text = tok(captions)
    labels = caption_labels(text["input_ids"], text["attention_mask"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = caption_loss(model(images, text["input_ids"], text["attention_mask"]), labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = _greedy(model, images, text["input_ids"].shape[1])
    decoded = [tok.decode(row[: (row == 3).nonzero()[0, 0] + 1 if (row == 3).any() else None].tolist())
               for row in out]
    assert decoded == captions
    try:
        from vlkit.inference.generate import generate
    except ImportError:
        return
    out = generate(model, images, max_new_tokens=text["input_ids"].shape[1])  # greedy, cached
    assert [tok.decode(seqs[0]) for seqs in out.sequences] == captions


def test_transformer_decoder_lr_groups(tiny_transformer):
    from vlkit.train.optim import lr_group

    groups = {n: lr_group(tiny_transformer, n) for n, _ in tiny_transformer.named_parameters()}
    assert groups["decoder.layers.0.cross_attn.q_proj.weight"] == groups["image_proj.weight"] == "head"
    assert groups["decoder.layers.0.self_attn.in_proj.weight"] == groups["decoder.token_embedding.weight"] == "text"
    assert groups["visual.patch_embed.proj.weight"] == "image"
    with pytest.raises(vlkit.errors.VlkitError, match="starts random"):
        vlkit.create_model("captioner-tiny", decoder="transformer", text_decoder="minilm")


def test_output_table_follows_the_weights():
    """Without gradients the logits use a transposed copy of the word embeddings; it must follow every change."""
    torch.manual_seed(0)
    dec = BertTextDecoder(vocab_size=50, dim=16, num_layers=1, num_heads=2, mlp_dim=32, max_positions=8).eval()
    hidden = torch.randn(2, 3, 16)

    def reference() -> torch.Tensor:
        return torch.nn.functional.linear(dec.head(hidden), dec.word_embed.weight, dec.lm_bias)

    with torch.no_grad():
        assert torch.allclose(dec.logits(hidden), reference(), atol=1e-5)
        dec.word_embed.weight.mul_(-2.0)  # an in-place change (as an optimizer step makes)
        assert torch.allclose(dec.logits(hidden), reference(), atol=1e-5)
    other = BertTextDecoder(vocab_size=50, dim=16, num_layers=1, num_heads=2, mlp_dim=32, max_positions=8)
    dec.load_state_dict(other.state_dict())
    with torch.inference_mode():
        assert torch.allclose(dec.logits(hidden), reference(), atol=1e-5)
    assert dec.logits(hidden).requires_grad  # with gradients: the embedding table itself
