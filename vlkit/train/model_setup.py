"""Building the model and its tokenizer from a training config."""

from __future__ import annotations

from vlkit.config.schema import TrainConfig
from vlkit.data.store import open_dataset, split_indices
from vlkit.data.text import TextTokenizer, build_word_tokenizer
from vlkit.errors import VlkitError
from vlkit.models.io import load_tokenizer
from vlkit.models.lit import lock_tower
from vlkit.models.registry import create_model
from vlkit.train.distributed import DistInfo

SPECIAL_SEP = "[SEP]"


def training_captions(cfg: TrainConfig) -> list[str]:
    """Every caption of every task's training split, sorted (the same on every rank)."""
    texts: set[str] = set()
    for task in cfg.tasks:
        data = cfg.datasets[task.dataset]
        ds = open_dataset(data.path)
        offsets = split_indices(ds, data.train_split)
        for caps in ds.take(offsets, columns=["captions"]).column("captions").to_pylist():
            texts.update(caps or [])
    if not texts:
        raise VlkitError("no captions in the training splits to build a tokenizer from; set model.tokenizer")
    return sorted(texts)


def build_model_and_tokenizer(cfg: TrainConfig, dist: DistInfo):
    """The model named by ``cfg.model`` and the tokenizer its texts go through.

    A CLIP trained from scratch without a tokenizer gets a word-level tokenizer built from the training
    captions; its vocabulary size and end-of-text token are passed to the model.
    """
    args = dict(cfg.model.args)
    tokenizer = None
    if cfg.model.tokenizer:
        tokenizer = TextTokenizer(cfg.model.tokenizer, max_length=args.get("context_length", 77))
    elif cfg.model.name.startswith("clip") and cfg.model.pretrained is None:
        context = args.get("context_length", 32 if cfg.model.name == "clip-tiny" else 77)
        tokenizer = build_word_tokenizer(training_captions(cfg), max_length=context)
        args.setdefault("vocab_size", tokenizer.vocab_size)
        args.setdefault("eos_token_id", tokenizer.tokenizer.token_to_id(SPECIAL_SEP))
    model = create_model(cfg.model.name, cfg.model.pretrained, **args)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.pretrained or "", model)
    if tokenizer is None:
        raise VlkitError(f"model {cfg.model.name} has no tokenizer; set model.tokenizer to a tokenizer.json")
    if cfg.model.lock is not None:
        lock_tower(model, cfg.model.lock.tower, cfg.model.lock.unlocked_blocks, cfg.model.lock.unlock_projection)
    return model, tokenizer
