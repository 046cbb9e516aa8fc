"""Building the model and its tokenizer from a training config."""

from __future__ import annotations

from vlkit.config.schema import TrainConfig
from vlkit.data.store import open_dataset, split_indices
from vlkit.data.text import TextTokenizer, build_word_tokenizer
from vlkit.errors import VlkitError
from vlkit.inference.captions import VQA_PROMPT
from vlkit.models.io import load_tokenizer
from vlkit.models.lit import lock_tower
from vlkit.models.registry import create_model
from vlkit.train.distributed import DistInfo

SPECIAL_SEP = "[SEP]"


def training_captions(cfg: TrainConfig, generative: bool = False) -> list[str]:
    """Every caption (and question, OCR token, and for visdial tasks every dialog text) of every task's
    training split, sorted (the same on every rank).

    Args:
        generative: the model writes text: the answers of VQA tasks (it writes them) and the default VQA prompt
            are included too.
    """
    texts: set[str] = set()
    for task in cfg.tasks:
        if task.prompt:
            texts.add(task.prompt)
        if generative and task.name == "vqa" and not task.prompt:
            texts.add(VQA_PROMPT)
        data = cfg.datasets[task.dataset]
        ds = open_dataset(data.path)
        offsets = split_indices(ds, data.train_split)
        # the OCR tokens too (TextVQA): they follow the question as text, so they need to be words of the vocabulary
        columns = ["captions"] + [c for c in ("questions", "ocr_tokens") if c in ds.schema.names]
        table = ds.take(offsets, columns=columns)
        for column in columns:
            for values in table.column(column).to_pylist():
                texts.update(values or [])
        if generative and task.name == "vqa" and "answers" in ds.schema.names:
            for per_image in ds.take(offsets, columns=["answers"]).column("answers").to_pylist():
                for answers in per_image or []:
                    texts.update(a for a in (answers or []) if a)
        if task.name == "visdial":  # the dialogs' questions, answers and answer options
            from vlkit.tasks.dialog_inputs import dialog_texts

            texts.update(dialog_texts(ds, offsets))
    if not texts:
        raise VlkitError("no captions in the training splits to build a tokenizer from; set model.tokenizer")
    return sorted(texts)


def training_answers(cfg: TrainConfig) -> list[str]:
    """The answer vocabulary of the VQA tasks' training splits (empty without a VQA task)."""
    from vlkit.data.answers import AnswerVocab

    answer_lists: list[list[str]] = []
    for task in cfg.tasks:
        if task.name != "vqa":
            continue
        data = cfg.datasets[task.dataset]
        ds = open_dataset(data.path)
        if "answers" not in ds.schema.names:
            raise VlkitError(f"task vqa: dataset {task.dataset} ({data.path}) has no questions and answers")
        for per_image in ds.take(split_indices(ds, data.train_split), columns=["answers"]).column("answers").to_pylist():
            answer_lists.extend(a for a in (per_image or []) if a)
    if any(t.name == "vqa" for t in cfg.tasks) and not answer_lists:
        raise VlkitError("task vqa: no answered questions in the training split")
    return AnswerVocab.build(answer_lists).answers if answer_lists else []


FUSION_PREFIXES = ("albef", "vilt", "vlmo", "blip")
GENERATIVE_PREFIXES = ("coca", "captioner", "blip")
IMAGE_ONLY_PREFIXES = ("mae", "vqvae", "beit", "timesformer")  # models that read no text: no tokenizer
#: small models trained from scratch on a word-level vocabulary built from the training captions: the config
#: key of their text length, and the token ids their configs take from the vocabulary
WORD_VOCAB_MODELS = {
    "albef": ("context_length", "mask_token_id", "pad_token_id"),
    "vilt": ("context_length", "mask_token_id", "pad_token_id"),
    "vlmo": ("context_length", "mask_token_id", "pad_token_id"),
    "blip2-tiny": ("context_length", "pad_token_id", "bos_token_id", "eos_token_id"),
    "blip-": ("context_length", "pad_token_id", "bos_token_id", "eos_token_id"),
    "coca-tiny": ("context_length", "pad_token_id", "bos_token_id", "eos_token_id"),
    "captioner-tiny": ("max_positions", "pad_token_id", "bos_token_id", "eos_token_id"),
}
TOKEN_OF_ARG = {"mask_token_id": "[MASK]", "pad_token_id": "[PAD]", "bos_token_id": "[CLS]", "eos_token_id": "[SEP]"}


def _word_vocab_ids(name: str) -> tuple[str, ...] | None:
    for prefix, ids in WORD_VOCAB_MODELS.items():
        if name.startswith(prefix):
            return ids
    return None


def _vocab_args_from(pretrained: str, name: str, args: dict) -> None:
    """A word-vocabulary model started from a saved vlkit model (``model.pretrained``, e.g. an earlier stage)
    keeps that model's vocabulary size, text length and token ids unless the config sets them."""
    import json
    from pathlib import Path

    from vlkit.models.io import CONFIG_NAME

    path = Path(pretrained)
    path = path / "model" if (path / "model" / CONFIG_NAME).exists() else path
    try:
        saved = json.loads((path / CONFIG_NAME).read_text()).get("config", {})
    except (OSError, ValueError):
        return  # not a vlkit model directory: the family's loader reports it
    length_arg, *ids = _word_vocab_ids(name)
    for arg in (length_arg, "vocab_size", *ids):
        if arg in saved and saved[arg] is not None:
            args.setdefault(arg, saved[arg])


def _beit_tokenizers(cfg: TrainConfig) -> list:
    """``(task index, VQ-VAE)`` of every beit task (its ``tokenizer_run``), loaded before the model is built."""
    from vlkit.models.vqvae import load_vqvae

    return [(i, load_vqvae(t.tokenizer_run)) for i, t in enumerate(cfg.tasks) if t.name == "beit" and t.tokenizer_run]


def _check_image_only_tasks(cfg: TrainConfig, model, beit_tokenizers: list) -> None:
    """The vqvae and beit tasks train their own model families; a beit task's tokenizer fits the model."""
    from vlkit.tasks.beit import require_beit, tokenizer_problem
    from vlkit.tasks.vqvae import require_vqvae

    for i, task in enumerate(cfg.tasks):
        if task.name in ("vqvae", "beit"):
            try:
                (require_vqvae if task.name == "vqvae" else require_beit)(model)
            except VlkitError as exc:
                raise VlkitError(f"tasks.{i}.name: {exc} (model.name is {cfg.model.name})") from None
    for i, tokenizer in beit_tokenizers:
        why = tokenizer_problem(model, tokenizer)
        if why:
            raise VlkitError(f"tasks.{i}.tokenizer_run: {cfg.tasks[i].tokenizer_run}: {why}")


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
    elif _word_vocab_ids(cfg.model.name) is not None and cfg.model.pretrained is None:
        length_arg, *ids = _word_vocab_ids(cfg.model.name)
        texts = training_captions(cfg, generative=cfg.model.name.startswith(GENERATIVE_PREFIXES))
        tokenizer = build_word_tokenizer(texts, max_length=args.get(length_arg, 32))
        args.setdefault(length_arg, tokenizer.max_length)
        args.setdefault("vocab_size", tokenizer.vocab_size)
        for arg in ids:
            args.setdefault(arg, tokenizer.tokenizer.token_to_id(TOKEN_OF_ARG[arg]))
    elif _word_vocab_ids(cfg.model.name) is not None:
        _vocab_args_from(cfg.model.pretrained, cfg.model.name, args)
    generative = cfg.model.name.startswith(GENERATIVE_PREFIXES)
    if any(t.name == "vqa" for t in cfg.tasks) and "answers" not in args and not generative:
        if not cfg.model.name.startswith(FUSION_PREFIXES):
            raise VlkitError(f"task vqa needs a fusion model (albef-*, vlmo-*, vilt-*) or a generative one (coca-*, "
                             f"captioner-*), not {cfg.model.name}")
        args["answers"] = training_answers(cfg)
    if any(t.name == "captioning" for t in cfg.tasks) and not generative:
        raise VlkitError(f"task captioning needs a model with a text decoder (coca-*, captioner-*, blip-*, "
                         f"blip2-* at stage 2), "
                         f"not {cfg.model.name}")
    beit_tokenizers = _beit_tokenizers(cfg)
    if beit_tokenizers and cfg.model.pretrained is None and cfg.model.name.startswith("beit"):
        args.setdefault("vocab_size", beit_tokenizers[0][1].num_codes)  # the tokenizer's codes are the classes
    model = create_model(cfg.model.name, cfg.model.pretrained, **args)
    _check_image_only_tasks(cfg, model, beit_tokenizers)
    if cfg.model.pretrained_image:
        from vlkit.models.mae.transfer import load_pretrained_image

        load_pretrained_image(model, cfg.model.pretrained_image)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.pretrained or "", model)
    if tokenizer is None and cfg.model.name.startswith(IMAGE_ONLY_PREFIXES):
        return model, None  # an image-only model (MAE) reads no text
    if tokenizer is None:
        raise VlkitError(f"model {cfg.model.name} has no tokenizer; set model.tokenizer to a tokenizer.json")
    if cfg.model.lock is not None:
        lock_tower(model, cfg.model.lock.tower, cfg.model.lock.unlocked_blocks, cfg.model.lock.unlock_projection)
    return model, tokenizer
