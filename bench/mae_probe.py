"""CIFAR-10 linear probe: a tiny ViT pre-trained as a masked autoencoder against the same ViT at random init.

    python bench/mae_probe.py [--minutes 9] [--threads 1]

The 10,000 CIFAR-10 test images (``../shared/data/cifar10-test``, class folders) are ingested into a Lance dataset
and split 8000/2000 by a seeded permutation (the same split every run). ``mae-vit-tiny`` (32 px, 4 px patches,
width 128, 4 layers) is pre-trained on the 8000 images (labels unused) with 75% masking for a fixed CPU budget:
the number of steps is set from the speed of the first steps so the cosine schedule ends at the budget. Then a
logistic-regression probe (:mod:`vlkit.tasks.linear_probe`: ``C`` chosen on a held-out part of the 8000) is fitted
on the frozen, mean-pooled encoder features of the 8000 and scored on the 2000, for the pre-trained encoder and
for a freshly initialised one of the same size. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_description, run_vlkit  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10-test"


def load_cifar(folder: Path, work: Path, threads: int) -> tuple[torch.Tensor, np.ndarray]:
    """Ingest the class folders with ``vlkit ingest`` and decode every image: ``uint8 [n, 3, 32, 32]`` and labels,
    in the dataset's id order."""
    import lance
    from PIL import Image

    out = work / "cifar.lance"
    run_vlkit("ingest", folder, "--out", out, threads=threads)
    ds = lance.dataset(str(out))
    table = ds.to_table(columns=["id", "label"])
    order = np.argsort(np.array(table.column("id").to_pylist()))
    images = []
    for _, data in ds.read_blobs("image", indices=order.tolist(), preserve_order=True):
        images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32))))
    labels = np.array(table.column("label").to_pylist())[order]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels


def normalise(images: torch.Tensor, model) -> torch.Tensor:
    pre = model.preprocess
    mean = torch.tensor(pre.mean)[None, :, None, None]
    std = torch.tensor(pre.std)[None, :, None, None]
    return (images.float() / 255.0 - mean) / std


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crops of the 4-px reflection-padded images and horizontal flips (uint8 in, uint8 out)."""
    n = images.shape[0]
    padded = torch.nn.functional.pad(images.float(), (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(32))[:, None, :, None].expand(n, 3, 32, 40)
    crops = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(32))[:, None, None, :].expand(n, 3, 32, 32)
    crops = crops.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


def pretrain(model, images: torch.Tensor, minutes: float, batch: int, lr: float, seed: int) -> dict:
    """MAE pre-training for ``minutes`` of wall time; the schedule length is set after 5 timed steps."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    model.train()
    start, total, step, losses = time.perf_counter(), None, 0, []
    order = torch.randperm(len(images), generator=gen)
    pos = 0
    while total is None or step < total:
        if pos + batch > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        x = normalise(augment(images[order[pos:pos + batch]], gen), model)
        pos += batch
        if total is not None:
            warm = max(1, total // 20)
            scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
        else:
            for group in opt.param_groups:
                group["lr"] = lr * 0.01
        loss = model(x, generator=gen).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if total is None and step == 5:
            per_step = (time.perf_counter() - start) / 5
            total = max(10, int(minutes * 60 / per_step))
            print(f"  {per_step * 1000:.0f} ms/step -> {total} steps "
                  f"({total * batch / len(images):.1f} epochs of {len(images)} images)", flush=True)
        if step % 200 == 0:
            print(f"  step {step}/{total}  loss {np.mean(losses[-50:]):.4f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    return {"steps": step, "seconds": time.perf_counter() - start, "epochs": step * batch / len(images),
            "loss_first": float(np.mean(losses[:20])), "loss_last": float(np.mean(losses[-50:]))}


@torch.no_grad()
def features(model, images: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Mean-pooled, L2-normalised encoder features of the whole images (``model.encode_image``)."""
    model.eval()
    return torch.cat([model.encode_image(normalise(images[i:i + batch], model))
                      for i in range(0, len(images), batch)]).numpy()


C_GRID = (0.1, 1.0, 10.0, 100.0)


def probe(model, images, labels, train_idx, test_idx, seed: int) -> dict:
    from vlkit.tasks.linear_probe import class_scores, fit_probe

    start = time.perf_counter()
    x = features(model, images)
    fit = fit_probe(x[train_idx], labels[train_idx], C_GRID, seed=seed)
    scores = class_scores(fit.classifier, x[test_idx], 10)
    top1 = 100.0 * float((scores.argmax(1).numpy() == labels[test_idx]).mean())
    return {"top1": round(top1, 2), "C": fit.c, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=CIFAR, help="CIFAR-10 class folders")
    parser.add_argument("--minutes", type=float, default=9.0, help="wall-time budget of the MAE pre-training")
    parser.add_argument("--model", default="mae-vit-tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vlkit.models.registry import create_model

    with tempfile.TemporaryDirectory() as tmp:
        images, labels = load_cifar(args.data, Path(tmp), args.threads)
    perm = np.random.default_rng(args.seed).permutation(len(images))
    train_idx, test_idx = np.sort(perm[:8000]), np.sort(perm[8000:10000])
    print(f"{len(images)} images: {len(train_idx)} probe-train (also MAE pre-training), {len(test_idx)} test")
    torch.manual_seed(args.seed)
    random_model = create_model(args.model)
    torch.manual_seed(args.seed)
    mae_model = create_model(args.model)  # the same initial weights as random_model
    random_result = probe(random_model, images, labels, train_idx, test_idx, args.seed)
    print(f"random init: top-1 {random_result['top1']:.2f} %")
    train = pretrain(mae_model, images[torch.from_numpy(train_idx)], args.minutes, args.batch, args.lr, args.seed)
    mae_result = probe(mae_model, images, labels, train_idx, test_idx, args.seed)
    machine = machine_description(torch.device("cpu")) + f", {args.threads} torch threads"
    print(f"\nCIFAR-10 linear probe, {args.model}, 8000 fit / 2000 test ({machine})")
    print(f"{'encoder':<34}{'top-1 %':>9}{'C':>10}")
    print(f"{'random init':<34}{random_result['top1']:>9.2f}{random_result['C']:>10g}")
    label = f"MAE, {train['steps']} steps, {train['seconds'] / 60:.1f} min"
    print(f"{label:<34}{mae_result['top1']:>9.2f}{mae_result['C']:>10g}")
    print(f"MAE loss {train['loss_first']:.3f} -> {train['loss_last']:.3f} over {train['epochs']:.1f} epochs; "
          f"margin {mae_result['top1'] - random_result['top1']:+.2f} points")
    result = {"bench": "mae_probe", "machine": machine, "model": args.model, "budget_minutes": args.minutes,
              "pretrain_seconds": round(train["seconds"], 1), "steps": train["steps"], "batch": args.batch,
              "epochs": round(train["epochs"], 2), "mae_loss_first": round(train["loss_first"], 4),
              "mae_loss_last": round(train["loss_last"], 4), "random_top1": random_result["top1"],
              "mae_top1": mae_result["top1"], "margin": round(mae_result["top1"] - random_result["top1"], 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
