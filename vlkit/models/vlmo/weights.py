"""Which VLMo parameters a stage freezes, and loading the weights of a VLMo saved at another stage."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from vlkit.errors import VlkitError
from vlkit.models.io import WEIGHTS_NAME, check_keys, config_from_dict, read_config

#: parameters of the vision side (never used by a text-only pass) and the final norm that both passes share
VISION_PREFIXES = ("patch_embed.", "cls_token", "image_pos_embed", "mask_embed", "image_type_embed", "mim_head.",
                   "norm.")
#: per layer: the shared self-attention (with its norm) and the vision expert
LAYER_FROZEN = ("ln_1.", "attn.", "ffn.mlps.vision.", "ffn.norms.vision.")
#: config fields that belong to the training run, not to the weights: kept from the model being loaded into
RUN_FIELDS = ("stage", "mlm_prob", "mim_ratio", "dropout")


def frozen_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters stage ``text`` freezes: every layer's shared self-attention and vision expert,
    the final norm, and the vision embeddings and head (VLMo trains only the language side in its text stage:
    the image-only pass is left exactly as it was)."""
    names = []
    for name, _ in model.named_parameters():
        if name.startswith(VISION_PREFIXES):
            names.append(name)
        elif name.startswith("layers."):
            rest = name.split(".", 2)[2]  # layers.<i>.<rest>
            if rest.startswith(LAYER_FROZEN):
                names.append(name)
    return names


def load_vlmo_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights into ``model`` (a VLMo) from a saved VLMo directory of any stage, or a ``.safetensors`` file.

    From a model directory, the sizes, token ids and preprocessing of the saved model replace the model's own
    (the model is rebuilt when they differ: e.g. a tiny model's word vocabulary is the saved one), while
    ``stage``, ``mlm_prob``, ``mim_ratio`` and ``dropout`` stay as the model was built. An answer head whose
    answers differ from the saved ones (or that the saved model lacks) keeps its fresh initialisation, and so
    does an OCR pointer the saved model lacks.

    Raises:
        VlkitError: not a VLMo, missing weights, or weights that do not fit.
    """
    path = Path(path)
    config = model.config
    if path.is_dir():
        meta = read_config(path)
        if meta.get("architecture") != model.architecture:
            raise VlkitError(f"{path}: a {meta.get('architecture')!r} model, not a VLMo")
        saved = config_from_dict(type(config), meta["config"], f"{path}/config.json")
        merged = dataclasses.replace(saved, **{name: getattr(config, name) for name in RUN_FIELDS},
                                     answers=list(config.answers or saved.answers),
                                     ocr_pointer=config.ocr_pointer or saved.ocr_pointer)
        if merged != config:
            model._build(merged)
        file = path / WEIGHTS_NAME
        same_answers = list(merged.answers) == list(saved.answers)
    else:
        file, same_answers = path, True
    if not file.exists():
        raise VlkitError(f"{path}: no weights found ({file.name} missing)")
    state = load_file(str(file))
    if not same_answers:
        state = {k: v for k, v in state.items() if not k.startswith(("answer_head.", "ocr_pointer."))}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith(("answer_head.", "ocr_pointer."))})
    elif not any(k.startswith("ocr_pointer.") for k in state):  # a pointer added to a saved answer head
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("ocr_pointer.")})
    check_keys(model, state, str(file))
    model.load_state_dict(state, strict=True)
    model.apply_stage()
