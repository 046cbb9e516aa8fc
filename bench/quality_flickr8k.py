"""Retrieval quality on Flickr8k-1k: the quickstart recipe against a frozen-feature baseline, side by side.

Split: the first 800 images by sorted file name (4000 captions) train, the last 200 (1000 captions) are the
test set; text->image and image->text R@1/5/10 with the standard multi-caption protocol.

- baseline: mean-pooled EfficientNet-Lite0 features and mean-pooled all-MiniLM-L6-v2 features (both frozen,
  computed once on centre crops), linear projections to 256-d trained with the contrastive loss.
- vlkit quickstart: the ``quickstart`` recipe (BriVL-style two-tower on the same frozen encoders: MSPP regions
  + self-attention + MLP on each side) trained with ``vlkit``'s trainer for ``--epochs``.

Run: ``python bench/quality_flickr8k.py [--data ../shared/data/flickr8k-1k] [--epochs 20]``
Prints a markdown table and one JSON line, with the training time of each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlkit.config.load import load_config
from vlkit.config.recipes import recipe_path
from vlkit.data.dataset import LanceImageTextDataset, make_loader
from vlkit.data.ingest import ingest
from vlkit.metrics.retrieval import retrieval_metrics
from vlkit.models.io import load_tokenizer
from vlkit.modules.encoders.efficientnet import efficientnet_lite0
from vlkit.modules.encoders.hf_text import HFTextEncoder
from vlkit.modules.losses.contrastive import contrastive_loss
from vlkit.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")


def make_split(data: Path, out: Path) -> Path:
    """Ingest the first 800 images (by file name) as ``train`` and the last 200 as ``val`` (the test set)."""
    rows = list(csv.DictReader(open(data / "captions.txt", newline="")))
    names = sorted({r["image"] for r in rows})
    parts = {"train": set(names[:800]), "val": set(names[800:])}
    dataset = out / "flickr.lance"
    for split, keep in parts.items():
        path = out / f"{split}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["image", "caption"])
            writer.writeheader()
            writer.writerows({"image": r["image"], "caption": r["caption"]} for r in rows if r["image"] in keep)
        ingest([path], dataset, images_root=data / "images", split=split, progress=False)
    return dataset


@torch.no_grad()
def frozen_features(dataset: Path, split: str):
    """Mean-pooled EfficientNet-Lite0 and MiniLM features of every image and caption of ``split``."""
    from vlkit.models.preprocess import Preprocess

    cnn = efficientnet_lite0(pretrained=True, num_classes=0).eval()
    text = HFTextEncoder("minilm").eval()
    pre = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3)
    tok = load_tokenizer("", type("M", (), {"preprocess": Preprocess(tokenizer="minilm", context_length=64)})())
    ds = LanceImageTextDataset(dataset, split, pre.image_transform(), tok, captions="all")
    images, texts, owner = [], [], []
    for batch in make_loader(ds, 64):
        images.append(cnn.forward_features(batch["image"]).mean(dim=(2, 3)))
        texts.append(text(batch["input_ids"], batch["attention_mask"]))
        owner.append(batch["caption_image"] + sum(len(x) for x in images[:-1]))
    return torch.cat(images), torch.cat(texts), torch.cat(owner)


def baseline(dataset: Path, epochs: int = 60, seed: int = 0) -> tuple[dict, float]:
    start = time.perf_counter()
    img_tr, txt_tr, own_tr = frozen_features(dataset, "train")
    img_te, txt_te, own_te = frozen_features(dataset, "val")
    torch.manual_seed(seed)
    proj_i, proj_t = torch.nn.Linear(img_tr.shape[1], 256), torch.nn.Linear(txt_tr.shape[1], 256)
    log_scale = torch.nn.Parameter(torch.tensor(2.659))
    opt = torch.optim.AdamW([*proj_i.parameters(), *proj_t.parameters(), log_scale], lr=1e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for caption_batch in torch.randperm(len(txt_tr), generator=gen).split(128):
            images = own_tr[caption_batch]
            out = contrastive_loss(F.normalize(proj_i(img_tr[images]), dim=-1),
                                   F.normalize(proj_t(txt_tr[caption_batch]), dim=-1),
                                   log_scale.exp().clamp(max=100), group_ids=images)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    with torch.no_grad():
        m = retrieval_metrics(F.normalize(proj_i(img_te), dim=-1), F.normalize(proj_t(txt_te), dim=-1), own_te)
    return {k: round(getattr(m, k), 1) for k in KEYS}, time.perf_counter() - start


class TimedTrainer(Trainer):
    """The trainer, recording (minutes since start, epoch, metrics) at every evaluation."""

    def __init__(self, cfg, start: float):
        self.start, self.curve = start, []
        super().__init__(cfg)

    def evaluate(self) -> dict[str, float]:
        metrics = super().evaluate()
        self.curve.append({"minutes": round((time.perf_counter() - self.start) / 60, 2),
                           "epoch": round(self.global_step / self.steps_per_epoch, 2),
                           **{k: round(metrics[f"val/data/{k}"], 1) for k in KEYS}})
        return metrics


def quickstart(dataset: Path, out: Path, epochs: int, overrides: list[str] = ()) -> tuple[dict, float, list]:
    cfg = load_config(recipe_path("quickstart"), [f"datasets.data.path={dataset}", f"output_dir={out}",
                                                  f"epochs={epochs}", "batch_size=32", "log_every=10",
                                                  "progress=false", "tensorboard=false", *overrides])
    start = time.perf_counter()
    trainer = TimedTrainer(cfg, start)
    metrics = trainer.run()
    return {k: round(metrics[f"val/data/{k}"], 1) for k in KEYS}, time.perf_counter() - start, trainer.curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k-1k"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", help="keep the run here (default: a temporary directory)")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides of the quickstart recipe")
    parser.add_argument("--skip-baseline", action="store_true", help="only train the recipe")
    parser.add_argument("--budget-minutes", type=float, default=15.0,
                        help="report the last evaluation reached within this many minutes of training")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        dataset = make_split(Path(args.data), work)
        base, base_s = ({k: float("nan") for k in KEYS}, 0.0) if args.skip_baseline else baseline(dataset)
        ours, ours_s, curve = quickstart(dataset, work / "run", args.epochs, args.set)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"Flickr8k-1k: train 800 images / 4000 captions, test 200 / 1000; {machine}\n")
    print("| model | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | training time |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m, secs in (("frozen-feature baseline", base, base_s),
                          (f"vlkit quickstart ({args.epochs} epochs)", ours, ours_s)):
        print(f"| {name} | " + " | ".join(f"{m[k]:.1f}" for k in KEYS) + f" | {secs / 60:.1f} min |")
    within = [point for point in curve if point["minutes"] <= args.budget_minutes]
    print(f"\nevery evaluation of the recipe (minutes since the trainer started, evaluation included):\n")
    print("| epoch | minutes | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 |")
    print("|---|---|---|---|---|---|---|---|")
    for point in curve:
        print(f"| {point['epoch']:g} | {point['minutes']:.1f} | " + " | ".join(f"{point[k]:.1f}" for k in KEYS) + " |")
    if within:
        print(f"\nwithin {args.budget_minutes:g} minutes: t2i R@1 {within[-1]['t2i_r1']:.1f} at epoch "
              f"{within[-1]['epoch']:g} (best {max(p['t2i_r1'] for p in within):.1f})")
    print(json.dumps({"bench": "quality_flickr8k", "machine": machine, "baseline": base, "quickstart": ours,
                      "baseline_seconds": round(base_s), "quickstart_seconds": round(ours_s),
                      "epochs": args.epochs, "overrides": args.set, "curve": curve,
                      "budget_minutes": args.budget_minutes,
                      "within_budget": within[-1] if within else None}))


if __name__ == "__main__":
    main()
