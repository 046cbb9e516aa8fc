"""generate: cached decoding against the recomputed reference, beam search against an exhaustive search,
sampling under a seed, batching and ragged prompts against one image at a time, the constraints, the scores
against log-probabilities recomputed by teacher forcing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from vlkit.data.text import build_word_tokenizer
from vlkit.errors import VlkitError
from vlkit.inference.beam import beam_search
from vlkit.inference.generate import GenerationOutput, _CachedSteps, generate
from vlkit.inference.interface import GenerationSpec, is_generative
from vlkit.modules.decoders import TextDecoderConfig, TransformerTextDecoder

PAD, BOS, EOS = 0, 2, 3  # the word tokenizer's [PAD], [CLS], [SEP]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


class TinyCaptioner(nn.Module):
    """A linear "image encoder" (4 context tokens) and a TransformerTextDecoder, with the decoding interface.

    ``eos_ramp * (position - eos_from)`` is added to the end token's logit, so that sequences end at varied lengths."""

    def __init__(self, vocab: int = 12, max_length: int = 16, width: int = 16, eos_ramp: float = 1.0,
                 eos_from: float = 5.0, seed: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Linear(3 * 4 * 4, 4 * width)
        self.decoder = TransformerTextDecoder(TextDecoderConfig(
            vocab_size=vocab, width=width, layers=2, heads=2, max_length=max_length, cross_attention_layers=[1],
            tie_word_embeddings=False))
        self.dropout = nn.Dropout(0.5)  # shows whether generate switched to eval mode
        with torch.no_grad():  # peaky, varied distributions
            self.decoder.token_embedding.weight.normal_(std=1.0)
            self.decoder.positional_embedding.normal_(std=0.3)
            self.decoder.lm_head.weight.normal_(std=0.7)
            self.encoder.weight.mul_(3.0)
        self.eos_ramp, self.eos_from = eos_ramp, eos_from
        self.spec = GenerationSpec(BOS, EOS, PAD, max_length, vocab)
        self.starts = self.steps = 0
        self.eval()

    @property
    def generation(self) -> GenerationSpec:
        return self.spec

    def context(self, images):
        return self.dropout(self.encoder(images.flatten(1))).view(images.shape[0], 4, -1)  # [batch, 4, width]

    def start_decoding(self, images, max_length):
        self.starts += 1
        return self.decoder.start(self.context(images), None, max_length)

    def end_bias(self, start: int, new: int) -> torch.Tensor:
        """Added to the logits ``[new, vocab]`` at positions ``start..``: the end token grows likelier along."""
        bias = torch.zeros(new, self.spec.vocab_size)
        bias[:, EOS] = self.eos_ramp * (torch.arange(start, start + new) - self.eos_from)
        return bias

    def decode_step(self, input_ids, cache):
        self.steps += 1
        start = cache.length
        return self.decoder.step(input_ids, cache) + self.end_bias(start, input_ids.shape[1])

    def caption_logits(self, images, input_ids, attention_mask=None):
        logits = self.decoder(input_ids, self.context(images), attention_mask=attention_mask)
        return logits + self.end_bias(0, input_ids.shape[1])


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def sequence_logprob(model, image, prompt, tokens, ended: bool) -> float:
    """log p(tokens [, eos] | image, start, prompt) by one teacher-forced pass (the independent reference)."""
    ids = torch.tensor([[BOS, *prompt, *tokens, *([EOS] if ended else [])]])
    with torch.no_grad():
        logprobs = model.caption_logits(image[None], ids).log_softmax(-1)[0]
    start = 1 + len(prompt)
    return sum(float(logprobs[p - 1, ids[0, p]]) for p in range(start, ids.shape[1]))


def flat(nested) -> list[float]:
    return [v for row in nested for v in row]


def test_the_tiny_model_is_generative():
    assert is_generative(TinyCaptioner()) and not is_generative(nn.Linear(2, 2))


@pytest.mark.parametrize("beams", [1, 3])
def test_cached_decoding_equals_recomputing_the_prefix(beams):
    model, x = TinyCaptioner(), images(3)
    kw = dict(max_new_tokens=10, num_beams=beams, num_return_sequences=beams)
    cached = generate(model, x, **kw)
    assert model.starts == 1  # the images encoded once for the batch, beams included
    slow = generate(model, x, use_cache=False, **kw)
    assert model.starts == 1  # the reference never starts a cache
    assert cached.sequences == slow.sequences
    assert flat(cached.scores) == pytest.approx(flat(slow.scores), abs=1e-5)
    assert any(len(s) < 10 for per in cached.sequences for s in per)  # some stopped at the end token


def test_beam_size_one_equals_greedy():
    model, x = TinyCaptioner(), images(4)
    greedy = generate(model, x, max_new_tokens=10)
    start_ids = torch.full((4, 1), BOS)
    with torch.no_grad():
        beams = beam_search(_CachedSteps(model, x, start_ids, 1, 11), start_ids, num_beams=1, max_new_tokens=10,
                            min_new_tokens=0, eos_token_id=EOS, pad_token_id=PAD, length_penalty=0.0,
                            early_stopping=True, no_repeat_ngram_size=0, num_return_sequences=1)
    assert [[tokens] for (tokens, _), in beams] == greedy.sequences
    assert [score for (_, score), in beams] == pytest.approx(flat(greedy.scores), abs=1e-5)


@pytest.mark.parametrize("length_penalty,early_stopping", [(0.0, False), (1.0, False), (1.0, True), (-0.5, True)])
def test_beam_search_finds_the_best_sequences_of_an_exhaustive_search(length_penalty, early_stopping):
    """Vocabulary 5, 4 new tokens: every sequence is scored by teacher forcing; with beams enough never to prune,
    beam search must return the exhaustive top 3 (early stopping must not change them)."""
    vocab, new = 5, 4
    model, x = TinyCaptioner(vocab=vocab, max_length=8, width=8, eos_ramp=0.0, seed=3), images(1, seed=5)
    others = [t for t in range(vocab) if t != EOS]
    candidates = [(list(body), True) for n in range(new) for body in itertools.product(others, repeat=n)]
    candidates += [(list(body), False) for body in itertools.product(others, repeat=new)]
    ids = torch.tensor([[BOS, *body, *([EOS] if ended else []), *[PAD] * (new - len(body) - ended)]
                        for body, ended in candidates])
    with torch.no_grad():
        logprobs = model.caption_logits(x.expand(len(ids), -1, -1, -1), ids).log_softmax(-1)
    token_lp = logprobs[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)  # [sequences, new]
    scored = []
    for row, (body, ended) in enumerate(candidates):
        length = len(body) + ended
        scored.append((float(token_lp[row, :length].sum()) / length ** length_penalty, body))
    scored.sort(key=lambda item: -item[0])
    assert scored[0][0] - scored[3][0] > 1e-4  # no near ties in the top 3
    out = generate(model, x, max_new_tokens=new, num_beams=4 ** (new - 1) * vocab, num_return_sequences=3,
                   length_penalty=length_penalty, early_stopping=early_stopping)
    assert out.sequences[0] == [body for _, body in scored[:3]]
    assert out.scores[0] == pytest.approx([score for score, _ in scored[:3]], abs=1e-5)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, -1.0])
def test_early_stopping_saves_steps_without_changing_the_result(length_penalty):
    model, x = TinyCaptioner(), images(4)
    kw = dict(max_new_tokens=14, num_beams=3, num_return_sequences=3, length_penalty=length_penalty)
    stopped = generate(model, x, early_stopping=True, **kw)
    early_steps, model.steps = model.steps, 0
    full = generate(model, x, early_stopping=False, **kw)
    assert stopped.sequences == full.sequences
    assert flat(stopped.scores) == pytest.approx(flat(full.scores), rel=1e-5)
    assert early_steps < model.steps == 14  # the prompt step and 13 more; stopping left some out


def test_sampling_is_reproducible_under_a_seed():
    model, x = TinyCaptioner(), images(3)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, num_return_sequences=4)
    a = generate(model, x, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(model, x, generator=torch.Generator().manual_seed(0), **kw)
    c = generate(model, x, generator=torch.Generator().manual_seed(1), **kw)
    assert a.sequences == b.sequences and a.scores == b.scores
    assert a.sequences != c.sequences
    assert all(len(per) == 4 for per in a.sequences)
    assert len({tuple(s) for per in a.sequences for s in per}) > 3  # the samples differ


def test_top_k_one_sampling_equals_greedy():
    model, x = TinyCaptioner(), images(3)
    greedy = generate(model, x, max_new_tokens=8)
    sampled = generate(model, x, max_new_tokens=8, do_sample=True, top_k=1, temperature=0.7,
                       generator=torch.Generator().manual_seed(0))
    tiny_p = generate(model, x, max_new_tokens=8, do_sample=True, top_p=1e-6,
                      generator=torch.Generator().manual_seed(0))
    assert sampled.sequences == greedy.sequences == tiny_p.sequences


def test_top_p_keeps_the_nucleus_only():
    from vlkit.inference.sampling import filter_top_k, filter_top_p

    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    kept = torch.isfinite(filter_top_p(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.75, 0.5 + 0.3 reaches it
    assert torch.isfinite(filter_top_p(logits, 0.81)).sum() == 3
    assert torch.isfinite(filter_top_k(logits[:, [2, 0, 3, 1]], 2)).tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("beams", [1, 3])
def test_a_batch_equals_one_image_at_a_time(beams):
    model, x = TinyCaptioner(), images(3)
    kw = dict(max_new_tokens=9, num_beams=beams, num_return_sequences=beams)
    batch = generate(model, x, **kw)
    chunked = generate(model, x, batch_size=2, **kw)
    alone = [generate(model, x[i:i + 1], **kw) for i in range(3)]
    assert batch.sequences == chunked.sequences == [o.sequences[0] for o in alone]
    for i, o in enumerate(alone):
        assert batch.scores[i] == pytest.approx(o.scores[0], abs=1e-5)


@pytest.mark.parametrize("beams", [1, 2])
def test_ragged_prompts_equal_each_prompt_alone(beams):
    model, x = TinyCaptioner(), images(4)
    prompts = [[5, 6], [7], [8, 9], []]
    out = generate(model, x, prompt_ids=prompts, max_new_tokens=7, num_beams=beams)
    assert model.starts == 3  # one batch per prompt length
    assert out.prompt_lengths == [2, 1, 2, 0]
    for i, prompt in enumerate(prompts):
        alone = generate(model, x[i:i + 1], prompt_ids=prompt, max_new_tokens=7, num_beams=beams)
        assert out.sequences[i] == alone.sequences[0]
        assert out.scores[i] == pytest.approx(alone.scores[0], abs=1e-5)
    shared = generate(model, x, prompt_ids=[5, 6], max_new_tokens=7, num_beams=beams)
    assert shared.sequences[0] == out.sequences[0] and shared.prompt_lengths == [2] * 4


@pytest.mark.parametrize("beams", [1, 3])
def test_min_new_tokens_blocks_the_end_token(beams):
    model, x = TinyCaptioner(eos_ramp=3.0, eos_from=1.0), images(3)
    free = generate(model, x, max_new_tokens=10, num_beams=beams)
    assert min(len(s[0]) for s in free.sequences) < 5  # the model stops early when allowed
    held = generate(model, x, max_new_tokens=10, min_new_tokens=5, num_beams=beams)
    assert all(len(s[0]) >= 5 for s in held.sequences)


@pytest.mark.parametrize("beams", [1, 3])
def test_no_repeat_ngram_never_repeats_an_ngram(beams):
    model, x = TinyCaptioner(seed=2), images(4)
    prompt = [5]

    def repeats(tokens, n):
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        return len(grams) != len(set(grams))

    free = generate(model, x, max_new_tokens=14, num_beams=beams, prompt_ids=prompt)
    assert any(repeats([BOS, *prompt, *s[0]], 2) for s in free.sequences)  # the constraint has work to do
    for n in (1, 2, 3):
        out = generate(model, x, max_new_tokens=14, num_beams=beams, prompt_ids=prompt, no_repeat_ngram_size=n)
        assert not any(repeats([BOS, *prompt, *s], n) for per in out.sequences for s in per)


def test_scores_are_the_log_probabilities_of_the_returned_sequences():
    model, x = TinyCaptioner(), images(3)
    prompt = [6]
    greedy = generate(model, x, max_new_tokens=9, prompt_ids=prompt)
    sampled = generate(model, x, max_new_tokens=9, prompt_ids=prompt, do_sample=True, top_k=4, temperature=2.0,
                       num_return_sequences=2, generator=torch.Generator().manual_seed(3))
    for out in (greedy, sampled):
        for i, per in enumerate(out.sequences):
            for tokens, score in zip(per, out.scores[i]):
                expected = sequence_logprob(model, x[i], prompt, tokens, ended=len(tokens) < 9)
                assert score == pytest.approx(expected, abs=1e-4)
    beams = generate(model, x, max_new_tokens=9, prompt_ids=prompt, num_beams=3, num_return_sequences=3,
                     length_penalty=0.7)
    for i, per in enumerate(beams.sequences):
        assert beams.scores[i] == sorted(beams.scores[i], reverse=True)
        for tokens, score in zip(per, beams.scores[i]):
            ended = len(tokens) < 9
            expected = sequence_logprob(model, x[i], prompt, tokens, ended) / (len(tokens) + ended) ** 0.7
            assert score == pytest.approx(expected, abs=1e-4)


def test_length_limits_and_model_state():
    model, x = TinyCaptioner(max_length=8), images(2)
    model.train()
    model.encoder.eval()  # a mixed state comes back as it was
    out = generate(model, x, max_new_tokens=50, prompt_ids=[5, 6, 7])
    assert all(len(s[0]) <= 8 - 1 - 3 for s in out.sequences)  # capped by the decoder's positions
    assert model.training and model.decoder.training and model.dropout.training and not model.encoder.training
    again = generate(model, x, max_new_tokens=50, prompt_ids=[5, 6, 7])
    assert again.sequences == out.sequences  # dropout was off while generating


def test_texts_decode_with_the_tokenizer():
    tok = build_word_tokenizer(["a red blue green square circle big"])
    assert tok.vocab_size == 12 and tok.token_id("[CLS]") == BOS and tok.token_id("[SEP]") == EOS
    out = GenerationOutput(sequences=[[tok.encode_plain("a red square")], [[]]], scores=[[0.0], [0.0]],
                           prompt_lengths=[0, 0])
    assert out.texts(tok) == [["a red square"], [""]]
    model = TinyCaptioner()
    texts = generate(model, images(2), max_new_tokens=6).texts(tok)
    assert len(texts) == 2 and all(isinstance(t[0], str) for t in texts)


def test_impossible_settings_are_clear_errors():
    model, x = TinyCaptioner(max_length=8), images(2)
    cases = [
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 > num_beams=2"),
        (dict(num_return_sequences=2), "greedy decoding writes one sequence"),
        (dict(do_sample=True, num_beams=3), "sampling with beams is not supported"),
        (dict(prompt_ids=[5] * 7), "leaves no room"),
        (dict(prompt_ids=[[5], [6], [7]]), "3 prompts for 2 images"),
        (dict(prompt_ids=[99]), "outside the vocabulary"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ]
    for kwargs, message in cases:
        with pytest.raises(VlkitError, match=message):
            generate(model, x, **kwargs)
    with pytest.raises(VlkitError, match="no text decoder"):
        generate(nn.Linear(2, 2), x)
