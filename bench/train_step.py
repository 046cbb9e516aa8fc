"""Training-step throughput and peak memory: vlkit CLIP against transformers.CLIPModel of identical sizes.

ViT-B/32 image tower, 12-layer 512-wide text tower (context 77), batch 32, 224 px; forward + backward +
AdamW step with the same contrastive loss; fp32 and bf16 autocast on CPU. Each configuration runs in its own
subprocess (so peak memory is its own), all in one invocation. Also image-embedding throughput at inference.

Text inputs: ``captions`` uses the token counts of 32 real captions (the bundled COCO sample) padded to 77, as
CLIP tokenizers pad; ``full`` fills all 77 positions (the worst case for vlkit, which does not compute
positions after the last end-of-text token).

FLOPs: each implementation's training step (forward + backward, no optimizer) is counted once with
``torch.utils.flop_counter`` (:func:`vlkit.utils.flops.train_flops_per_sample`): ``train GFLOP/sample`` is what
that implementation executes, ``train TFLOP/s`` that count x its samples/s. MFU divides the model's FLOPs (vlkit's
count, the same for both columns: work on padding the reference computes is not model work) x samples/s by the
peak FLOP/s, which is known for listed GPUs only; on a CPU give it with ``--peak-flops``.

Run: ``python bench/train_step.py [--batch 32] [--steps 3] [--threads N] [--peak-flops F]``
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch


def vlkit_model():
    import vlkit

    return vlkit.create_model("clip-vit-b-32")


def hf_model():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         eos_token_id=49407),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=512,
    )
    return CLIPModel(config)


def embed(impl: str, model, images, ids, mask):
    if impl == "vlkit":
        out = model(images, ids)
        return out.image_embeds, out.text_embeds, out.logit_scale
    out = model(pixel_values=images, input_ids=ids, attention_mask=mask, return_dict=True)
    return out.image_embeds, out.text_embeds, model.logit_scale.exp()


def loss_fn(img, txt, scale):
    logits = scale * img @ txt.t()
    labels = torch.arange(img.shape[0])
    return (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2


def peak_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def caption_lengths(batch: int) -> torch.Tensor:
    """Token counts (with start and end tokens) of real captions: the bundled COCO sample's first ``batch``
    captions through the all-MiniLM-L6-v2 WordPiece tokenizer (close to CLIP's BPE counts)."""
    from vlkit.cli.quickstart import SAMPLE
    from vlkit.data.text import TextTokenizer
    from vlkit.modules.encoders.hf_text import resolve_text_encoder_path

    captions = [a["caption"] for a in json.loads((SAMPLE / "captions.json").read_text())["annotations"]][:batch]
    mask = TextTokenizer(resolve_text_encoder_path("minilm"), max_length=77)(captions)["attention_mask"]
    return mask.sum(dim=1)


def step_flops(impl: str, model, images, ids, mask) -> float:
    """Forward + backward FLOPs per sample of one training step of ``impl`` (optimizer excluded)."""
    from vlkit.utils.flops import train_flops_per_sample

    def step_loss(model, batch):
        return loss_fn(*embed(impl, model, *batch))

    return train_flops_per_sample(model, (images, ids, mask), loss_fn=step_loss)


def child(impl: str, precision: str, text: str, batch: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = vlkit_model() if impl == "vlkit" else hf_model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images = torch.randn(batch, 3, 224, 224)
    ids = torch.randint(1, 49000, (batch, 77))
    lengths = caption_lengths(batch) if text == "captions" else torch.full((batch,), 77)
    mask = (torch.arange(77)[None] < lengths[:, None]).long()
    ids[torch.arange(batch), lengths - 1] = 49407
    ids = ids * mask
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    flops = step_flops(impl, model, images, ids, mask)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(*embed(impl, model, images, ids, mask))
        loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    train_sps = batch * steps / (time.perf_counter() - start)

    model.eval()
    with torch.no_grad(), autocast:
        encode = model.encode_image if impl == "vlkit" else model.get_image_features
        encode(images)
        start = time.perf_counter()
        for _ in range(steps):
            encode(images)
        infer_ips = batch * steps / (time.perf_counter() - start)
    return {"impl": impl, "precision": precision, "text": text, "max_tokens": int(lengths.max()),
            "train_samples_per_s": round(train_sps, 2), "flops_per_sample": flops,
            "achieved_flops_per_s": flops * train_sps,
            "embed_images_per_s": round(infer_ips, 2), "peak_rss_mib": round(peak_rss_mib(), 0),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--texts", nargs="+", default=["captions", "full"],
                        help="captions: real caption lengths padded to 77; full: all 77 tokens used")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s of this CPU for MFU (a CPU has no published peak: without it, no MFU)")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "PRECISION", "TEXT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, batch=args.batch, steps=args.steps, threads=args.threads)))
        return
    results = []
    configs = [(p, t) for p in args.precisions for t in args.texts]
    for precision, text in configs:
        for impl in ("vlkit", "transformers"):
            cmd = [sys.executable, __file__, "--child", impl, precision, text, "--batch", str(args.batch),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import transformers

    machine = (f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}, "
               f"transformers {transformers.__version__}")
    from vlkit.utils.flops import peak_flops

    peak = peak_flops("cpu", args.peak_flops)  # the steps run on the CPU
    print(f"CLIP ViT-B/32 + 12x512 text, batch {args.batch}, 224 px, {args.steps} timed steps; {machine}")
    print(f"peak: {peak / 1e12:.1f} TFLOP/s (given)\n" if peak else "peak: unknown (give --peak-flops for MFU)\n")
    print("| precision | text | figure | vlkit | transformers | vlkit / transformers |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for precision, text in configs:
        v, h = (next(r for r in results if r["impl"] == impl and r["precision"] == precision and r["text"] == text)
                for impl in ("vlkit", "transformers"))
        for r in (v, h):  # model FLOPs: vlkit's count of this configuration, for both implementations
            r["mfu"] = None if peak is None else round(v["flops_per_sample"] * r["train_samples_per_s"] / peak, 5)
        rows = [("train_samples_per_s", "train samples/s", 1, ".1f"),
                ("flops_per_sample", "train GFLOP/sample (fwd+bwd)", 1e9, ".2f"),
                ("achieved_flops_per_s", "train TFLOP/s (executed)", 1e12, ".3f"),
                ("embed_images_per_s", "embed images/s", 1, ".1f"), ("peak_rss_mib", "peak RSS MiB", 1, ".1f")]
        if peak is not None:
            rows.insert(3, ("mfu", "MFU (model FLOPs)", 0.01, ".2f"))
        for key, label, unit, fmt in rows:
            ratio = v[key] / h[key]
            summary[f"{precision}_{text}_{key}_ratio"] = round(ratio, 3)
            cell = "%" if key == "mfu" else ""
            print(f"| {precision} | {text} (<= {v['max_tokens']} tokens) | {label} | {v[key] / unit:{fmt}}{cell} "
                  f"| {h[key] / unit:{fmt}}{cell} | {ratio:.2f}x |")
    print(json.dumps({"bench": "train_step", "machine": machine, "peak_flops": peak, "results": results,
                      "ratios": summary}))


if __name__ == "__main__":
    main()
