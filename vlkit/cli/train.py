"""``vlkit train CONFIG [key=value ...]``: train a recipe (also under torchrun)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand to ``sub``."""
    p = sub.add_parser(
        "train", help="train a model from a YAML recipe",
        description="Train from a YAML recipe (a file, or the name of a shipped recipe: see 'vlkit configs "
        "list'). Any key can be overridden: vlkit train quickstart epochs=3 optim.lr_head=5e-4. Under "
        "'torchrun --nproc_per_node N -m vlkit train ...' every process trains one shard (DDP, or "
        "distributed=fsdp).",
    )
    p.add_argument("config", help="a YAML file or a shipped recipe name")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. batch_size=64 resume=latest")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlkit.config.load import load_config
    from vlkit.config.recipes import recipe_path
    from vlkit.train.trainer import Trainer

    path = Path(args.config)
    if not path.exists() and not args.config.endswith((".yaml", ".yml")):
        path = recipe_path(args.config)
    cfg = load_config(path, args.overrides)
    trainer = Trainer(cfg)
    metrics = trainer.run()
    if trainer.dist.is_main:
        print(json.dumps({"run": str(trainer.run_dir), "step": trainer.global_step, **metrics}, indent=2))
    return 0
