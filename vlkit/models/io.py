"""Saving and loading models with their configuration and preprocessing (safetensors + JSON)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file, save_model as save_safetensors
from torch import nn

from vlkit import __version__
from vlkit.errors import VlkitError
from vlkit.utils.fs import atomic_directory

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
CLASSIFIER_NAME = "classifier.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"


@dataclasses.dataclass
class SavedClassifier:
    """A classification head trained on a fusion model's ``[CLS]`` feature (task ``classification``), saved
    beside the model as ``classifier.safetensors`` (``weight``, ``bias``) and ``classifier.json``.

    Attributes:
        head: the linear head, ``[classes, width]``.
        class_names: the class names by label.
        prompt: the text paired with every image in training (None: each image's first caption).
    """

    head: nn.Linear
    class_names: list[str]
    prompt: str | None = None


def architectures() -> dict[str, type[nn.Module]]:
    """Model classes by the architecture name stored in ``config.json``."""
    from vlkit.models.albef.model import ALBEF
    from vlkit.models.blip.model import BLIP
    from vlkit.models.blip2.model import BLIP2
    from vlkit.models.brivl.model import BriVL
    from vlkit.models.captioner.model import Captioner
    from vlkit.models.clip.model import CLIP
    from vlkit.models.coca.model import CoCa
    from vlkit.models.mae.model import MAE
    from vlkit.models.vilt.model import ViLT
    from vlkit.models.vlmo.model import VLMo
    from vlkit.models.beit.model import BEiT
    from vlkit.models.vqvae.model import VQVAE
    from vlkit.models.timesformer.model import TimeSformer

    return {"clip": CLIP, "brivl": BriVL, "albef": ALBEF, "blip": BLIP, "vilt": ViLT, "captioner": Captioner,
            "coca": CoCa, "vlmo": VLMo, "blip2": BLIP2, "mae": MAE, "vqvae": VQVAE, "beit": BEiT,
            "timesformer": TimeSformer}


def config_from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build a (nested) config dataclass from a dict; unknown keys are an error naming them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise VlkitError(f"{where}: unknown key(s) {unknown} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):  # an optional nested config: ``X | None``
            hint = inner[0]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value, f"{where}.{name}")
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def save_model(model: nn.Module, directory: str | Path, tokenizer=None, extra_files: dict[str, str] | None = None,
               classifier: SavedClassifier | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` (and ``tokenizer.json``) into ``directory``.

    ``extra_files`` (name -> text) are written beside them, and a ``classifier`` head as
    ``classifier.safetensors`` + ``classifier.json`` (read back by :func:`load_classifier`). The files are
    written to a temporary directory beside it, then moved into place, so an interrupted save never leaves a
    half-written model. An existing ``directory`` is replaced only when it is empty or a
    vlkit model folder (its ``config.json`` carries ``vlkit_version``), never another tool's model folder.

    Raises:
        VlkitError: ``directory`` holds files vlkit did not write, or cannot be written.
    """
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        meta = {"architecture": model.architecture, "vlkit_version": __version__,
                "config": dataclasses.asdict(model.config)}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        save_safetensors(model, str(tmp / WEIGHTS_NAME))
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_NAME)
        for name, text in (extra_files or {}).items():  # e.g. generation.json: how the model writes by default
            (tmp / name).write_text(text)
        if classifier is not None:
            head = classifier.head
            save_file({"weight": head.weight.detach().float().cpu().contiguous(),
                       "bias": head.bias.detach().float().cpu().contiguous()}, str(tmp / CLASSIFIER_WEIGHTS))
            (tmp / CLASSIFIER_NAME).write_text(json.dumps({"classes": list(classifier.class_names),
                                                           "prompt": classifier.prompt}, indent=2))
    return directory


def load_classifier(directory: str | Path) -> SavedClassifier | None:
    """The classification head saved beside a model by :func:`save_model`, or None when there is none.

    Raises:
        VlkitError: one of its two files is missing, not valid, or they disagree (naming the file).
    """
    directory = Path(directory)
    meta_path, weights_path = directory / CLASSIFIER_NAME, directory / CLASSIFIER_WEIGHTS
    if not meta_path.exists() and not weights_path.exists():
        return None
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise VlkitError(f"{path}: missing beside the other file of the model's classification head")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VlkitError(f"{meta_path}: not valid JSON ({exc})") from None
    meta = meta if isinstance(meta, dict) else {}
    classes, prompt = meta.get("classes"), meta.get("prompt")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes) \
            or not (prompt is None or isinstance(prompt, str)):
        raise VlkitError(f"{meta_path}: expected {{\"classes\": [names...], \"prompt\": text or null}}")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise VlkitError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None or bias is None or weight.dim() != 2 or tuple(bias.shape) != (weight.shape[0],) \
            or weight.shape[0] != len(classes):
        raise VlkitError(f"{weights_path}: expected weight [{len(classes)}, width] and bias [{len(classes)}] "
                         f"for the {len(classes)} classes of {meta_path.name}")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return SavedClassifier(head.eval(), classes, prompt)


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise VlkitError(f"{directory}: not a vlkit model directory (no {CONFIG_NAME})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VlkitError(f"{path}: invalid JSON ({exc.msg})") from None


def load_model(directory: str | Path) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` and load its weights."""
    meta = read_config(directory)
    arch = meta.get("architecture")
    table = architectures()
    if arch not in table:
        raise VlkitError(f"{directory}: unknown architecture {arch!r}; known: {sorted(table)}")
    cls = table[arch]
    config = config_from_dict(cls.config_class, meta["config"], f"{directory}/{CONFIG_NAME}")
    if "load_pretrained_encoders" in inspect.signature(cls).parameters:
        model = cls(config, load_pretrained_encoders=False)  # the saved weights replace them anyway
    else:
        model = cls(config)
    load_state_into(model, directory)
    return model


def load_tokenizer(directory: str | Path, model: nn.Module | None = None):
    """The tokenizer saved beside a model, else the one its preprocessing names (or None)."""
    from vlkit.data.text import TextTokenizer

    path = Path(directory) / TOKENIZER_NAME
    context = model.preprocess.context_length if model is not None else 77
    if path.exists():
        return TextTokenizer(path, max_length=context)
    if model is not None and model.preprocess.tokenizer:
        from vlkit.modules.encoders.hf_text import MINILM, resolve_text_encoder_path

        name = model.preprocess.tokenizer
        return TextTokenizer(resolve_text_encoder_path(name) if name == MINILM else name, max_length=context)
    return None


def check_keys(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one error naming missing and unexpected keys (and shape mismatches)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:10]}" + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:10]}"
                        + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    if shapes:
        problems.append(f"shape mismatches {shapes[:10]}")
    if problems:
        raise VlkitError(f"{source}: weights do not fit {type(model).__name__}: " + "; ".join(problems))


def load_state_into(model: nn.Module, path: str | Path) -> None:
    """Load weights from a vlkit model directory or a ``.safetensors`` file, strictly."""
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.exists():
        raise VlkitError(f"{path}: no weights found ({file.name} missing)")
    state = load_file(str(file))
    check_keys(model, state, str(file))
    model.load_state_dict(state, strict=True)
