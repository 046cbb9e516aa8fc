"""Zero-shot classification with a two-tower model: classes become sentences, images pick the closest one.

Each class name is put into every prompt template ("a photo of a {}."), the sentences are embedded by the
text tower, and the class's classifier vector is the mean of its L2-normalised sentence embeddings,
normalised again. An image's class scores are the dot products of its normalised embedding with these
vectors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlkit.errors import DataError, VlkitError
from vlkit.metrics.classification import ClassificationMetrics, classification_metrics
from vlkit.inference.embed import Embeddings, compute_embeddings
from vlkit.inference.loading import LoadedModel
from vlkit.tasks.labels import dataset_classes, require_labels

#: Built-in prompt templates; ``{}`` is replaced by the class name.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture showing a {}.",
    "an image containing a {}.",
    "a snapshot of the {}.",
    "a close-up of a {}.",
    "a small {} in the picture.",
    "a large {} in the picture.",
    "a sketch of a {}.",
    "a simple drawing of a {}.",
    "a {} on a plain background.",
    "a {} seen from the front.",
    "a blurry picture of a {}.",
    "a clear photo of the {}.",
    "this is a {}.",
    "there is a {} here.",
    "the {}.",
)

_ARTICLE = re.compile(r"\b([Aa]) \{\}")


def fill_template(template: str, name: str) -> str:
    """Put ``name`` into ``template`` in place of ``{}``; "a {}" becomes "an ..." before a vowel.

    Example:
        >>> fill_template("a photo of a {}.", "orange circle")
        'a photo of an orange circle.'
    """
    if name and name[0].lower() in "aeiou":
        template = _ARTICLE.sub(lambda m: f"{m.group(1)}n {{}}", template)
    return template.replace("{}", name)


def load_templates(path: str | Path) -> list[str]:
    """Read prompt templates from a text file: one per line, each containing ``{}``.

    Blank lines and lines starting with ``#`` are skipped.

    Raises:
        VlkitError: the file is missing or unreadable, holds no template, or a line has no ``{}``.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise VlkitError(f"{path}: no such templates file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VlkitError(f"{path}: cannot read templates ({exc})") from None
    templates = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{}" not in line:
            raise VlkitError(f"{path} line {number}: template {line!r} has no '{{}}' for the class name")
        templates.append(line)
    if not templates:
        raise VlkitError(f"{path}: no templates (write one per line, each with '{{}}' for the class name)")
    return templates


@torch.no_grad()
def encode_texts(loaded: LoadedModel, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    """``[len(texts), dim]`` L2-normalised text embeddings (float32)."""
    out = []
    with loaded.inference():  # the precision the image embeddings are computed in
        for start in range(0, len(texts), batch_size):
            tokens = loaded.tokenizer(list(texts[start:start + batch_size]))
            out.append(loaded.model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float())
    return F.normalize(torch.cat(out), dim=-1).clone()


def build_classifier(loaded: LoadedModel, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                     batch_size: int = 256) -> Tensor:
    """``[classes, dim]`` zero-shot classifier: per class, the renormalised mean of its prompt embeddings.

    Args:
        loaded: the model and its tokenizer.
        class_names: one name per class, in label order.
        templates: prompt templates, each with ``{}``.
        batch_size: sentences per text-tower forward pass.
    """
    if not class_names:
        raise VlkitError("zero-shot classifier: no class names")
    if not templates:
        raise VlkitError("zero-shot classifier: no templates")
    sentences = [fill_template(t, name) for name in class_names for t in templates]
    embeds = encode_texts(loaded, sentences, batch_size)  # [classes * templates, dim]
    embeds = embeds.reshape(len(class_names), len(templates), -1)  # [classes, templates, dim]
    return F.normalize(embeds.mean(dim=1), dim=-1)  # [classes, dim]


@dataclass
class ZeroShotResult:
    """Zero-shot classification of one split.

    Attributes:
        metrics: top-1/top-5 accuracy, mean per-class recall, confusion matrix.
        class_names: the classes, in label order.
        templates: the prompt templates used.
        scores: ``[images, classes]`` cosine similarity of each image with each class.
        labels: ``[images]`` true labels.
        embeddings: the image embeddings (and ids) of the split.
    """

    metrics: ClassificationMetrics
    class_names: list[str]
    templates: list[str]
    scores: Tensor
    labels: Tensor
    embeddings: Embeddings


def evaluate_zeroshot(loaded: LoadedModel, dataset: str | Path, split: str = "test", *,
                      templates: Sequence[str] | None = None, batch_size: int = 64, limit: int | None = None,
                      num_workers: int = 0, progress: bool = False) -> ZeroShotResult:
    """Zero-shot classification accuracy of ``loaded`` on the labelled ``split`` of ``dataset``.

    Args:
        loaded: the model (see :func:`vlkit.inference.loading.load_for_inference`).
        dataset: a vlkit Lance dataset with ``label`` and class names.
        split: the split to classify.
        templates: prompt templates (default :data:`DEFAULT_TEMPLATES`).
        batch_size: images per forward pass.
        limit: classify only the first ``limit`` images of the split.
        num_workers: image decoding worker processes.
        progress: show a progress bar.

    Raises:
        DataError: no such split, images without labels, or classes without names.
    """
    require_labels(dataset, split, "zero-shot classification")
    names = dataset_classes(dataset)
    unnamed = [n for n in names if re.fullmatch(r"class_\d+", n)]
    if unnamed:
        raise DataError(f"{dataset}: {len(unnamed)} classes have no name (e.g. {unnamed[0]}); zero-shot "
                        "classification needs class names (column 'class_name' or metadata 'vlkit.classes')")
    templates = list(templates or DEFAULT_TEMPLATES)
    emb = compute_embeddings(loaded, dataset, split, batch_size=batch_size, captions=False, limit=limit,
                             num_workers=num_workers, progress=progress)
    labels = emb.labels
    if labels is None or int(labels.max()) >= len(names):
        raise DataError(f"{dataset}: split '{split}' has labels beyond its {len(names)} classes")
    classifier = build_classifier(loaded, names, templates)  # [classes, dim]
    scores = emb.image @ classifier.T  # [images, classes]
    return ZeroShotResult(classification_metrics(scores, labels), names, templates, scores, labels, emb)
