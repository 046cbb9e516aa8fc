"""Training step time of each pre-training model family, beside a CLIP of the same widths.

For every model (tiny and base sizes) one training step is timed: its pre-training losses (``head="pretrain"``:
ALBEF's ITC + ITM + MLM, BLIP's ITC + ITM + LM, BLIP-2 stage 1's ITC + ITM + ITG, VLMo stage 3's ITC + ITM + MLM,
ViLT's ITM + MLM), backward and an AdamW step, on a random batch in the model's own input shapes. The CLIP
beside it has the same image size, patch size, vision width and depth, text width and depth and context length,
and trains with the contrastive loss; ``ratio`` is the model's step time over that CLIP's, measured in the same
process one after the other.

Run: ``python bench/model_step_time.py [--sizes tiny base] [--batch-tiny 32] [--batch-base 4] [--steps 3]
[--threads 2] [--models blip albef ...]``. Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description  # noqa: E402

#: family -> (tiny name, base name, overrides that make the model train all of its losses)
FAMILIES = {
    "albef": ("albef-tiny", "albef-base", {}),
    "vilt": ("vilt-tiny", "vilt-base", {}),
    "blip": ("blip-tiny", "blip-base", {}),
    "blip2": ("blip2-tiny", "blip2-base", {"stage": 1}),
    "vlmo": ("vlmo-tiny", "vlmo-base", {"stage": "image_text"}),
}


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def clip_like(model: torch.nn.Module) -> torch.nn.Module:
    """A CLIP with the image size, patch size, widths, depths and context length of ``model``."""
    from vlkit.models.clip.builders import clip

    c, pre = model.config, model.preprocess
    vision = getattr(model, "visual", None)
    vcfg = getattr(vision, "config", None)
    v_width = _first(vcfg, "width") or _first(c, "vision_width", "width")
    v_layers = _first(vcfg, "layers") or _first(c, "vision_layers", "layers")
    v_heads = _first(vcfg, "heads") or _first(c, "vision_heads", "heads")
    patch = _first(vcfg, "patch_size") or _first(c, "patch_size", default=16)
    t_width = _first(c, "text_width", "qformer_width", "width")
    t_layers = _first(c, "text_layers", "qformer_layers", "layers")
    t_heads = _first(c, "text_heads", "qformer_heads", "heads")
    vocab = _first(c, "vocab_size", default=30522)
    return clip(embed_dim=_first(c, "embed_dim", default=256), image_size=pre.image_size, patch_size=patch,
                vision_width=v_width, vision_layers=v_layers, vision_heads=v_heads, text_width=t_width,
                text_layers=t_layers, text_heads=t_heads, vocab_size=vocab, context_length=pre.context_length,
                act="gelu")


def step_seconds(model: torch.nn.Module, batch: dict, steps: int, contrastive: bool) -> float:
    """Median seconds of ``steps`` training steps (after one warm-up step)."""
    from vlkit.modules.losses.contrastive import contrastive_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        if contrastive:
            out = model(batch["image"], batch["input_ids"], batch["attention_mask"])
            loss = contrastive_loss(out.image_embeds, out.text_embeds, out.logit_scale).loss
        else:
            loss = model(batch["image"], batch["input_ids"], batch["attention_mask"], head="pretrain").loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(model, "momentum_step"):
            model.momentum_step()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(name: str, overrides: dict, batch_size: int, steps: int) -> dict:
    import vlkit
    from vlkit.utils.flops import synthetic_batch

    torch.manual_seed(0)
    model = vlkit.create_model(name, **overrides)
    batch = synthetic_batch(model, batch_size=batch_size, device="cpu")
    params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    seconds = step_seconds(model, batch, steps, contrastive=False)
    reference = clip_like(model)
    ref_batch = synthetic_batch(reference, batch_size=batch_size, device="cpu")
    ref_seconds = step_seconds(reference, ref_batch, steps, contrastive=True)
    return {"model": name, "batch": batch_size, "step_s": round(seconds, 4), "clip_step_s": round(ref_seconds, 4),
            "ratio": round(seconds / ref_seconds, 2), "trainable_params_m": round(params, 1),
            "image_size": model.preprocess.image_size, "context_length": model.preprocess.context_length}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--batch-tiny", type=int, default=32)
    parser.add_argument("--batch-base", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for size in args.sizes:
        for family in args.models:
            tiny, base, overrides = FAMILIES[family]
            name = tiny if size == "tiny" else base
            batch = args.batch_tiny if size == "tiny" else args.batch_base
            try:
                results.append(measure(name, overrides, batch, args.steps))
            except Exception as exc:  # noqa: BLE001 - one model that cannot be built does not stop the table
                results.append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    machine = machine_description(torch.device("cpu")) + f", {args.threads} threads"
    print(f"Training step (forward + backward + AdamW), {machine}\n")
    print("| model | batch | step (s) | CLIP, same widths (s) | ratio | trainable params (M) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | | {r['error']} | | | |")
        else:
            print(f"| {r['model']} | {r['batch']} | {r['step_s']:.3f} | {r['clip_step_s']:.3f} | {r['ratio']:.2f} | "
                  f"{r['trainable_params_m']} |")
    print(json.dumps({"bench": "model_step_time", "machine": machine, "results": results}))


if __name__ == "__main__":
    main()
