"""``vlkit quickstart``: the main job. Ingest the bundled sample (or your data), train the quickstart recipe,
evaluate retrieval, draw the curves, build the search index and run an example query, in minutes on a laptop
CPU."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from vlkit.errors import VlkitError

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "coco-cc-by"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``quickstart`` subcommand to ``sub``."""
    p = sub.add_parser(
        "quickstart", help="ingest, train, evaluate and query on the bundled sample (or --data)",
        description="The whole path in minutes on a laptop CPU: ingest the bundled CC-BY COCO sample (or your "
        "--data) into OUT/data.lance, train the 'quickstart' recipe (a BriVL-style two-tower model on offline "
        "pretrained encoders), print retrieval on the validation split, draw the training curves, build a "
        "search index and run an example query. Pass key=value overrides to change the recipe. Each run "
        "trains into a new folder: OUT/run, then OUT/run-2, OUT/run-3, ... (an earlier run is never deleted); "
        "resume=latest continues the newest one instead. Sources, overrides and OUT are all checked before "
        "anything is written.",
    )
    p.add_argument("--data", nargs="+", help="your own sources, in any format 'vlkit ingest' reads")
    p.add_argument("--images-root", help="folder the image paths in --data are relative to")
    p.add_argument("--out", default="runs/quickstart",
                   help="working folder (default runs/quickstart): new, empty or an earlier quickstart folder")
    p.add_argument("--query", default="a laptop on a desk", help="the example text query")
    p.add_argument("--caption-epochs", type=int, default=20, metavar="N",
                   help="also train the caption_quickstart recipe (a captioner on the same offline encoders) for N "
                   "epochs into OUT/caption-run (then caption-run-2, ...) and caption the example query's top image "
                   "(default 20; 0 skips it)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the quickstart recipe, e.g. epochs=5")
    p.set_defaults(func=run)


def _run_folder(out: Path, resume: bool, name: str = "run") -> Path:
    """The run folder: ``OUT/run``, then ``OUT/run-2``, ``OUT/run-3``, ... (one past the newest); with
    ``resume`` the newest that exists. ``name`` replaces ``run`` (``caption-run``)."""
    numbers = [1] if os.path.lexists(out / name) else []
    if out.is_dir():
        numbers += [int(p.name[len(name) + 1:]) for p in out.iterdir() if re.fullmatch(rf"{name}-\d+", p.name)]
    if resume:
        if not numbers:
            raise VlkitError(f"resume: no earlier quickstart run in {out}")
        newest = max(numbers)
    else:
        newest = max(numbers, default=0) + 1
    return out / (name if newest == 1 else f"{name}-{newest}")


def _holding_run(out: Path, checkpoint: str) -> Path:
    """The quickstart run in ``out`` that holds ``checkpoint`` (``OUT/run-N/checkpoints/step-...``)."""
    run_dir = Path(checkpoint).parent.parent
    if Path(checkpoint).parent.name != "checkpoints" or run_dir.resolve().parent != out.resolve():
        raise VlkitError(f"resume={checkpoint}: not a checkpoint of a quickstart run in {out} (OUT/run*/checkpoints/"
                         "...); resume=latest continues the newest run")
    return run_dir


def run(args: argparse.Namespace) -> int:
    from vlkit.config.load import load_config
    from vlkit.config.recipes import recipe_path
    from vlkit.data.ingest import ingest
    from vlkit.data.sheet import contact_sheet
    from vlkit.data.store import dataset_info
    from vlkit.search.index import build_index
    from vlkit.inference.loading import load_for_inference
    from vlkit.search.searcher import Searcher
    from vlkit.train.plots import plot_run
    from vlkit.train.runlog import check_new_run_dir
    from vlkit.train.trainer import Trainer
    from vlkit.utils.fs import atomic_write, check_output_dir, check_output_file, write_marker

    out = Path(args.out)
    sources = args.data or [SAMPLE / "captions.json", SAMPLE / "vqa_questions.json"]
    dataset = out / "data.lance"
    # everything is checked before anything is written
    for source in [*sources, *([args.images_root] if args.images_root else [])]:
        if not Path(source).exists():
            raise VlkitError(f"{source}: no such file or folder")
    check_output_dir(out, "quickstart", inputs=sources, what="--out")
    index_dir, sheet_path, summary_path = out / "index", out / "sheet.png", out / "summary.json"
    check_output_dir(index_dir, "index", inputs=sources)
    for path in (sheet_path, summary_path):
        check_output_file(path, inputs=sources)
    # the overrides decide whether this run resumes (read from the loaded config, as training reads them)
    placeholder = str(out / "run")
    cfg = load_config(recipe_path("quickstart"),
                      [f"datasets.data.path={dataset}", f"output_dir={placeholder}", *args.overrides])
    if cfg.output_dir != placeholder:
        raise VlkitError(f"output_dir={cfg.output_dir}: quickstart trains into {out}/run, run-2, ... (each run "
                         "a new folder); choose the working folder with --out instead")
    resume = bool(cfg.resume)
    run_dir = _run_folder(out, resume) if not resume or cfg.resume == "latest" else _holding_run(out, cfg.resume)
    overrides = [f"datasets.data.path={dataset}", f"output_dir={run_dir}", *args.overrides]
    cfg = load_config(recipe_path("quickstart"), overrides)
    if not resume:
        check_new_run_dir(run_dir)
    if args.caption_epochs < 0:
        raise VlkitError(f"--caption-epochs must be 0 or more, got {args.caption_epochs}")
    caption_cfg = None
    if args.caption_epochs:
        caption_dir = _run_folder(out, False, "caption-run")
        caption_cfg = load_config(recipe_path("caption_quickstart"), [
            f"datasets.data.path={dataset}", f"output_dir={caption_dir}", f"epochs={args.caption_epochs}",
            "datasets.data.val_split=null", "best_metric=null", f"progress={str(cfg.progress).lower()}",
            "batch_size=16", "optim.warmup_steps=10"])  # a small dataset: smaller batches, a short warmup
        check_new_run_dir(caption_dir)
    steps = 7 if caption_cfg is not None else 6
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "quickstart")
    print(f"[1/{steps}] ingest {', '.join(map(str, sources))}")
    report = ingest(sources, dataset, images_root=args.images_root, val_fraction=0.2, test_fraction=0.0,
                    progress=False)
    print("      " + report.summary().replace("\n", "\n      "))
    info = dataset_info(dataset)
    print(f"      {info['images']} images, {info['captions']} captions, {info['questions']} questions, "
          f"splits {info['splits']}")
    sheet = contact_sheet(dataset, sheet_path, n=16)

    kept = "" if resume or run_dir.name == "run" else f" (the earlier runs in {out} are kept)"
    print(f"[2/{steps}] train {cfg.model.name} for {cfg.epochs} epochs (batch {cfg.batch_size}) -> {run_dir}{kept}")
    trainer = Trainer(cfg)
    metrics = trainer.run()
    print(f"[3/{steps}] retrieval on the validation split:")
    for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"):
        value = metrics.get(f"val/data/{key}")
        if value is not None:
            print(f"      {key:8s} {value:6.1f}")
    curves = plot_run(run_dir, run_dir / "curves.png")
    print(f"[4/{steps}] training curves: {curves}")
    info = build_index(load_for_inference(run_dir), dataset, index_dir)
    print(f"[5/{steps}] search index of {info.images} images and {info.captions} captions -> {index_dir}")
    print(f"[6/{steps}] example query {args.query!r}:")
    hits = Searcher(index_dir).search_text(args.query, k=3)
    for hit in hits:
        print(f"      {hit.score:.3f}  {hit.id}  ({hit.caption})")
    caption = None
    if caption_cfg is not None and hits:
        print(f"[7/7] train {caption_cfg.model.name} for {caption_cfg.epochs} epochs -> {caption_cfg.output_dir}")
        Trainer(caption_cfg).run()
        caption = _caption_image(Path(caption_cfg.output_dir), dataset, hits[0].id)
        print(f"      {hits[0].id}: {caption!r}")
    print("\nwhere things are:")
    print(f"  dataset      {dataset}   (vlkit data info {dataset})")
    print(f"  contact sheet {sheet}")
    print(f"  run          {run_dir}   (config.yaml, metrics.jsonl, tensorboard/, checkpoints/)")
    print(f"  model        {run_dir / 'model'}")
    print(f"  metrics      {run_dir / 'metrics.jsonl'}")
    print(f"  curves       {curves}")
    print(f"  index        {index_dir}   (vlkit search {index_dir} \"a dog on the grass\"; vlkit serve {index_dir})")
    summary = {"run": str(run_dir), "metrics": metrics}
    if caption is not None:
        print(f"  captioner    {caption_cfg.output_dir}   (vlkit caption {caption_cfg.output_dir} IMAGE.jpg)")
        summary.update(caption_run=str(caption_cfg.output_dir), caption={"image": hits[0].id, "caption": caption})
    atomic_write(summary_path, json.dumps(summary, indent=2))
    return 0


def _caption_image(run_dir: Path, dataset: Path, image_id: str) -> str:
    """The caption the run's model writes for the dataset image ``image_id`` (its own beams and prompt)."""
    import pyarrow.compute as pc
    import torch

    from vlkit.data.store import open_dataset
    from vlkit.inference.captions import write_captions
    from vlkit.inference.loading import load_for_inference

    loaded = load_for_inference(run_dir)
    ds = open_dataset(dataset)
    offset = pc.index(ds.to_table(columns=["id"]).column("id"), image_id).as_py()
    (_, data), = ds.read_blobs("image", indices=[offset])
    transform = loaded.model.preprocess.image_transform(train=False)
    with torch.no_grad():
        pixels = transform.normalize(transform(bytes(data))[None])  # [1, 3, S, S]
        return write_captions(loaded.model, loaded.tokenizer, pixels, loaded.generation.prompt,
                              **loaded.generation.settings())[0][0][0]
