"""``vlkit quickstart``: the main job. Ingest the bundled sample (or your data), train the quickstart recipe,
evaluate retrieval, draw the curves and run an example query, in minutes on a laptop CPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "coco-cc-by"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="ingest, train, evaluate and query on the bundled sample (or --data)")
    p.add_argument("--data", nargs="+", help="your own sources, in any format 'vlkit ingest' reads")
    p.add_argument("--images-root", help="folder the image paths in --data are relative to")
    p.add_argument("--out", default="runs/quickstart", help="working folder (default runs/quickstart)")
    p.add_argument("--query", default="a train at a station", help="the example text query")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the quickstart recipe, e.g. epochs=5")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlkit.config.load import load_config
    from vlkit.config.recipes import recipe_path
    from vlkit.data.ingest import ingest
    from vlkit.data.sheet import contact_sheet
    from vlkit.data.store import dataset_info
    from vlkit.train.plots import plot_run
    from vlkit.train.trainer import Trainer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = args.data or [SAMPLE / "captions.json", SAMPLE / "vqa_questions.json"]
    dataset = out / "data.lance"
    print(f"[1/5] ingest {', '.join(map(str, sources))}")
    report = ingest(sources, dataset, images_root=args.images_root, val_fraction=0.2, test_fraction=0.0,
                    progress=False)
    print("      " + report.summary().replace("\n", "\n      "))
    info = dataset_info(dataset)
    print(f"      {info['images']} images, {info['captions']} captions, {info['questions']} questions, "
          f"splits {info['splits']}")
    sheet = contact_sheet(dataset, out / "sheet.png", n=16)

    run_dir = out / "run"
    overrides = [f"datasets.data.path={dataset}", f"output_dir={run_dir}", *args.overrides]
    if (run_dir / "checkpoints" / "latest").exists() and not any(o.startswith("resume=") for o in overrides):
        import shutil

        shutil.rmtree(run_dir)  # a fresh run each time (pass resume=latest to continue one instead)
    cfg = load_config(recipe_path("quickstart"), overrides)
    print(f"[2/5] train {cfg.model.name} for {cfg.epochs} epochs (batch {cfg.batch_size}) -> {run_dir}")
    trainer = Trainer(cfg)
    metrics = trainer.run()
    print("[3/5] retrieval on the validation split:")
    for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"):
        value = metrics.get(f"val/data/{key}")
        if value is not None:
            print(f"      {key:8s} {value:6.1f}")
    curves = plot_run(run_dir, run_dir / "curves.png")
    print(f"[4/5] training curves: {curves}")
    print(f"[5/5] example query {args.query!r}:")
    for score, image_id, caption in example_query(run_dir / "model", dataset, args.query):
        print(f"      {score:.3f}  {image_id}  ({caption})")
    print("\nwhere things are:")
    print(f"  dataset      {dataset}   (vlkit data info {dataset})")
    print(f"  contact sheet {sheet}")
    print(f"  run          {run_dir}   (config.yaml, metrics.jsonl, tensorboard/, checkpoints/)")
    print(f"  model        {run_dir / 'model'}")
    print(f"  metrics      {run_dir / 'metrics.jsonl'}")
    print(f"  curves       {curves}")
    (out / "summary.json").write_text(json.dumps({"run": str(run_dir), "metrics": metrics}, indent=2))
    return 0


def example_query(model_dir: Path, dataset: Path, query: str, k: int = 3):
    """Top-``k`` images of ``dataset`` for a text query, by the trained model."""
    import torch

    from vlkit.data.dataset import LanceImageTextDataset, make_loader
    from vlkit.models.io import load_model, load_tokenizer

    model = load_model(model_dir).eval()
    tokenizer = load_tokenizer(model_dir, model)
    ds = LanceImageTextDataset(dataset, None, model.preprocess.image_transform(), captions="first")
    images, ids, captions = [], [], []
    with torch.no_grad():
        for batch in make_loader(ds, 32):
            images.append(model.encode_image(batch["image"]))
            ids += batch["id"]
            captions += batch["text"]
        text = tokenizer([query])
        q = model.encode_text(text["input_ids"], text["attention_mask"])
    scores = (torch.cat(images) @ q.T).squeeze(1)
    top = scores.topk(min(k, len(ids)))
    return [(float(s), ids[i], captions[i]) for s, i in zip(top.values, top.indices.tolist())]
