"""Caption generation speed: new tokens/s of vlkit's cached ``generate``, the same model without the cache, and
``transformers.BertLMHeadModel.generate`` on the same weights.

The model is the decoder of ``captioner-lite0-minilm``: BERT-shaped, all-MiniLM-L6-v2's 6 layers of width 384
with 12 heads, cross-attending to 49 image tokens of width 384 (EfficientNet-Lite0's 7x7 cells after the
projection), vocabulary 30522. The decoder is timed alone on one fixed random context, so the CNN is not
counted, and every contender gets the same context and weights:

- ``vlkit cached``: :func:`vlkit.inference.generate.generate` (cross-attention keys/values computed once,
  self-attention key/value cache, one token per step);
- ``vlkit uncached``: the same call with ``use_cache=False`` (each step runs the whole prefix again);
- ``transformers``: ``BertLMHeadModel(is_decoder=True, add_cross_attention=True).generate(...,
  encoder_hidden_states=context)`` with the weights copied (:func:`to_hf_bert_state_dict`); its greedy output is
  checked to equal vlkit's before timing (beam output too, reported).

Each writes exactly ``--tokens`` new tokens (the end token is suppressed with ``min_new_tokens`` for all three),
greedy and beam search with 3 beams, at each batch size. Warm-up first, then the median of ``--repeats`` runs;
the contenders take turns in each round (a shared machine's changing load falls on all alike). ``torch`` threads
are left at their default (``--threads`` sets them, to compare).

Run: ``python bench/generate_speed.py [--batches 1 16] [--tokens 30] [--repeats 3]`` (prints a table and one
JSON line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_description  # noqa: E402

CONTEXT_TOKENS = 49  # EfficientNet-Lite0's 7x7 last feature map at 224 px


class DecoderOnly(nn.Module):
    """The captioner's decoder behind the decoding interface, with the image context given directly in place
    of images (so the timing leaves the CNN out)."""

    def __init__(self, decoder: nn.Module, bos: int, eos: int, pad: int):
        super().__init__()
        from vlkit.inference.interface import GenerationSpec

        self.decoder = decoder
        self.spec = GenerationSpec(bos, eos, pad, decoder.max_positions, decoder.vocab_size)

    @property
    def generation(self):
        return self.spec

    def start_decoding(self, context: Tensor, max_length: int):
        return self.decoder.start(context, None, max_length)

    def decode_step(self, input_ids: Tensor, cache) -> Tensor:
        return self.decoder.step(input_ids, cache)

    def caption_logits(self, context: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.decoder(input_ids, context, None, attention_mask)


def build(seed: int = 0):
    """The MiniLM-initialised decoder (cross-attention and head transform random, as a fresh captioner) and
    transformers' BertLMHeadModel with the same weights."""
    from transformers import BertLMHeadModel

    from vlkit.models.captioner.model import Captioner, CaptionerConfig
    from vlkit.modules.decoders.bert_decoder import hf_bert_config, to_hf_bert_state_dict

    torch.manual_seed(seed)
    captioner = Captioner(CaptionerConfig(backbone_pretrained=False))
    decoder = captioner.decoder.eval()
    spec = captioner.generation
    model = DecoderOnly(decoder, spec.bos_token_id, spec.eos_token_id, spec.pad_token_id).eval()
    hf = BertLMHeadModel(hf_bert_config(decoder, bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id,
                                        pad_token_id=spec.pad_token_id)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_bert_state_dict(decoder), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit BertLMHeadModel: missing {missing}, unexpected {unexpected}")
    return model, hf


def run_vlkit(model: DecoderOnly, context: Tensor, beams: int, tokens: int, use_cache: bool) -> list[list[int]]:
    from vlkit.inference.generate import generate

    out = generate(model, context, max_new_tokens=tokens, min_new_tokens=tokens, num_beams=beams,
                   length_penalty=1.0, use_cache=use_cache)
    return [seqs[0] for seqs in out.sequences]


def run_hf(hf: nn.Module, context: Tensor, beams: int, tokens: int, bos: int) -> list[list[int]]:
    from transformers import DynamicCache, EncoderDecoderCache

    start = torch.full((context.shape[0], 1), bos, dtype=torch.long)
    # an encoder-decoder cache, so the cross-attention keys/values are computed once (generate would make a
    # self-attention-only cache for a decoder-only model)
    cache = EncoderDecoderCache(DynamicCache(config=hf.config), DynamicCache(config=hf.config))
    with torch.inference_mode():
        out = hf.generate(input_ids=start, attention_mask=torch.ones_like(start), encoder_hidden_states=context,
                          max_new_tokens=tokens, min_new_tokens=tokens, num_beams=beams, do_sample=False,
                          length_penalty=1.0, early_stopping=True, use_cache=True, past_key_values=cache)
    return out[:, 1:].tolist()


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of ``repeats`` calls of each function, after one warm-up call of each. The functions take
    turns (one call each per round), so a change in the machine's load falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, hf = build()
    bos = model.generation.bos_token_id
    machine = machine_description(torch.device("cpu")) + f", {torch.get_num_threads()} torch threads"
    rows = []
    for batch in args.batches:
        context = torch.randn(batch, CONTEXT_TOKENS, model.decoder.dim, generator=torch.Generator().manual_seed(batch))
        for beams in args.beams:
            ours, theirs = run_vlkit(model, context, beams, args.tokens, True), run_hf(hf, context, beams, args.tokens,
                                                                                       bos)
            same = ours == theirs
            if beams == 1 and not same:
                raise RuntimeError(f"greedy outputs differ at batch {batch}: {ours[0][:10]} vs {theirs[0][:10]}")
            assert all(len(s) == args.tokens for s in ours + theirs), "every contender writes the same tokens"
            new_tokens = batch * args.tokens
            secs = timed({
                "vlkit_cached": lambda: run_vlkit(model, context, beams, args.tokens, True),
                "vlkit_uncached": lambda: run_vlkit(model, context, beams, args.tokens, False),
                "transformers": lambda: run_hf(hf, context, beams, args.tokens, bos),
            }, args.repeats)
            result = {"batch": batch, "beams": beams, "same_output": same,
                      **{f"{k}_tok_s": round(new_tokens / v, 1) for k, v in secs.items()}}
            result["cached_vs_uncached"] = round(secs["vlkit_uncached"] / secs["vlkit_cached"], 2)
            result["cached_vs_transformers"] = round(secs["transformers"] / secs["vlkit_cached"], 2)
            rows.append(result)
            print(result, flush=True)

    print(f"\nnew tokens/s, {args.tokens} new tokens per sequence, MiniLM-shaped decoder over {CONTEXT_TOKENS} "
          f"image tokens; {machine}\n")
    print("| batch | decoding | vlkit cached | vlkit uncached | transformers | cached / uncached | "
          "cached / transformers | same output |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mode = "greedy" if r["beams"] == 1 else f"beam {r['beams']}"
        print(f"| {r['batch']} | {mode} | {r['vlkit_cached_tok_s']:.1f} | {r['vlkit_uncached_tok_s']:.1f} | "
              f"{r['transformers_tok_s']:.1f} | {r['cached_vs_uncached']:.2f}x | {r['cached_vs_transformers']:.2f}x | "
              f"{'yes' if r['same_output'] else 'no'} |")
    headline = {f"b{r['batch']}_{'greedy' if r['beams'] == 1 else 'beam' + str(r['beams'])}_{k}": r[k]
                for r in rows for k in ("vlkit_cached_tok_s", "cached_vs_uncached", "cached_vs_transformers")}
    print(json.dumps({"bench": "generate_speed", "machine": machine, "tokens": args.tokens, **headline,
                      "rows": rows}))


if __name__ == "__main__":
    main()
