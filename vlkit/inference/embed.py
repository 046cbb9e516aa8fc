"""Image and caption embeddings of a Lance dataset, and writing them back into it as new columns.

:func:`compute_embeddings` runs a model over one split (or every row), reading images or, for a video
dataset, videos whose embedding is the mean of their frames' (:mod:`vlkit.inference.video_embed`).
:func:`write_embeddings` adds them to the dataset as columns without rewriting the images: each fragment joins
the new columns on ``id`` into new data files, and one ``Merge`` commit brings them in and drops any earlier
embedding columns at once, so every version of the dataset has either the old embeddings or the new ones, never
none. The columns carry the model's fingerprint in their field metadata, so embeddings can be traced to the run
that made them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from vlkit.data.columns import replace_columns
from vlkit.data.dataset import make_loader
from vlkit.data.store import open_dataset, retry_on_conflict, write_lock
from vlkit.errors import DataError
from vlkit.inference.loading import LoadedModel
from vlkit.inference.speed import autocast, prefetch, prepared, resolve_precision
from vlkit.inference.video_embed import encode_pixels, image_side_dataset, require_videos, resolve_frames

IMAGE_COLUMN = "image_embedding"
TEXT_COLUMN = "caption_embeddings"


@dataclass
class Embeddings:
    """Embeddings of the images and captions of a dataset (rows in dataset order).

    Attributes:
        ids: image ids.
        image: ``[images, dim]`` L2-normalised image embeddings (float32).
        text: ``[captions, dim]`` L2-normalised caption embeddings, the captions of each image in order.
        caption_image: ``[captions]`` position in ``ids`` of each caption's image.
        captions: the caption strings.
        labels: ``[images]`` class labels, when every row has one.
        columns: further columns that were asked for, as lists.
        thumbnails: JPEG thumbnails of the images, when they were asked for.
        precision: what they were computed in (``fp32`` or ``bf16``).
        frames: 0 when the rows were embedded as images; else the frames sampled per video, whose mean-pooled
            embeddings ``image`` holds (:mod:`vlkit.inference.video_embed`).
    """

    ids: list[str]
    image: Tensor
    text: Tensor
    caption_image: Tensor
    captions: list[str]
    labels: Tensor | None = None
    columns: dict[str, list] = field(default_factory=dict)
    thumbnails: list[bytes] | None = None
    precision: str = "fp32"
    frames: int = 0


def can_embed(model) -> bool:
    """Whether ``model`` embeds images and texts (``encode_image`` and ``encode_text``); a fusion-only model
    such as ViLT only scores pairs."""
    from vlkit.inference.interface import _unwrap

    inner = _unwrap(model)
    return all(callable(getattr(inner, name, None)) for name in ("encode_image", "encode_text"))


def can_embed_images(model) -> bool:
    """Whether ``model`` embeds images (``encode_image``), as an image-only model (MAE) does."""
    from vlkit.inference.interface import _unwrap

    return callable(getattr(_unwrap(model), "encode_image", None))


def require_embeddings(model, what: str, text: bool = True) -> None:
    """Raise a one-line :class:`~vlkit.errors.VlkitError` when ``model`` cannot embed images and texts.

    Args:
        what: what needs the embeddings (``vlkit index``, ``--task zeroshot`` ...), for the message.
        text: texts are embedded too; False: image embeddings are enough (a linear probe), so an image-only
            model passes.
    """
    if not text and can_embed_images(model):
        return
    if not can_embed(model):
        from vlkit.errors import VlkitError

        raise VlkitError(f"{what} needs image and text embeddings, but a {type(model).__name__} is a fusion-only "
                         "model (it scores image-text pairs, it embeds nothing); use a model with separate towers "
                         "(clip-*, brivl-*, coca-*, albef-*); 'vlkit eval --task retrieval' scores a fusion-only "
                         "model by image-text matching")


def compute_embeddings(loaded: LoadedModel, dataset: str | Path, split: str | None = None, *,
                       batch_size: int = 64, captions: bool = True, columns: Sequence[str] = (),
                       num_workers: int = 0, progress: bool = False, limit: int | None = None,
                       rows: Sequence[int] | None = None, precision: str | None = None, channels_last: bool = True,
                       prefetch_batches: int = 2, fold_batch_norms: bool = True,
                       thumbnails: int | None = None, frames: int | None = 0) -> Embeddings:
    """Embed every image or video (and caption) of ``split`` of ``dataset`` (``None``: every row).

    The model runs in inference mode, with bf16 autocast where the hardware has native bf16 (``precision``),
    channels-last convolutions with batch norms folded into them, and the next batches decoded in a background
    thread while it runs (see :mod:`vlkit.inference.speed`); ``precision="fp32", channels_last=False,
    prefetch_batches=0, fold_batch_norms=False`` is the plain path.

    Args:
        loaded: the model (see :func:`vlkit.inference.loading.load_for_inference`).
        dataset: a vlkit Lance dataset.
        split: the split to embed.
        batch_size: images per forward pass.
        captions: also embed every caption.
        columns: further columns to return (e.g. ``["class_name"]``).
        num_workers: DataLoader worker processes for decoding (0: decode in this process).
        progress: show a progress bar.
        limit: embed only the first ``limit`` rows of the split.
        rows: embed only these positions of the split, in this order (a worker's share; ``limit`` then
            applies to them).
        precision: ``auto`` (bf16 where native, else fp32), ``fp32`` or ``bf16``; ``None``: the loaded model's
            :attr:`~vlkit.inference.loading.LoadedModel.precision`.
        channels_last: run convolutions in channels-last layout.
        prefetch_batches: batches decoded ahead in a background thread (0: none).
        fold_batch_norms: fold batch norms into the convolutions they follow for the call (checked to 1e-4).
        thumbnails: also make a JPEG thumbnail of each image with this longer side, from the same decode
            (:attr:`Embeddings.thumbnails`; a video's is of its middle frame).
        frames: 0: embed the ``image`` column; ``N``: embed the ``video`` column, the mean of ``N`` uniformly
            sampled frames per video; ``None``: videos (8 frames) when the dataset has a ``video`` column, else
            images (:func:`vlkit.inference.video_embed.resolve_frames`).

    Raises:
        DataError: the split has no rows, or (videos) a row has no video.
        VlkitError: the model embeds nothing (a fusion-only model), an unknown precision, or a bad ``frames``.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    require_embeddings(model, "computing embeddings", text=captions)
    device = loaded.device
    precision = resolve_precision(loaded.precision if precision is None else precision, device)
    frames = resolve_frames(dataset, frames)
    if frames:
        require_videos(dataset, split)
    ds = image_side_dataset(dataset, split, model.preprocess.image_transform(train=False),
                            tokenizer if captions else None, captions, columns, thumbnails, frames)
    if len(ds) == 0:
        raise DataError(f"{dataset}: split {split!r} has no rows" if split else f"{dataset}: no rows")
    indices = list(range(len(ds))) if rows is None else [int(i) for i in rows]
    if any(i < 0 or i >= len(ds) for i in indices):
        raise DataError(f"{dataset}: row positions outside the {len(ds)} rows of split {split!r}")
    if limit is not None:
        indices = indices[:limit]
    if not indices:
        raise DataError(f"{dataset}: no rows to embed")
    loader = make_loader(ds, batch_size, indices, num_workers=num_workers)
    batches = prefetch(loader, prefetch_batches)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="embed", unit="batch", total=len(loader), dynamic_ncols=True)
    ids, images, texts, owner, caption_text, labels, thumbs = [], [], [], [], [], [], []
    extra: dict[str, list] = {name: [] for name in columns}
    size = ds.transform.image_size
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    ready = prepared(model, channels_last=channels_last, fold=fold_batch_norms,
                     example=lambda: model.encode_image(probe))
    with torch.inference_mode(), ready as nhwc, autocast(precision, device):
        for batch in batches:
            start = len(ids)
            ids += batch["id"]
            images.append(encode_pixels(model, batch["image"].to(device), nhwc))  # images or videos
            if captions and batch["text"]:
                texts.append(model.encode_text(batch["input_ids"].to(device),
                                               batch["attention_mask"].to(device)).float())
                owner.append(batch["caption_image"] + start)
                caption_text += batch["text"]
            labels.append(batch.get("label"))
            thumbs += batch.get("thumbnail", [])
            for name in columns:
                extra[name] += batch[name]
    dim = images[0].shape[1]
    return Embeddings(
        ids=ids, image=_plain(torch.cat(images)),
        text=_plain(torch.cat(texts)) if texts else torch.zeros(0, dim),
        caption_image=_plain(torch.cat(owner)) if owner else torch.zeros(0, dtype=torch.long),
        captions=caption_text,
        labels=torch.cat(labels) if all(x is not None for x in labels) else None,
        columns=extra,
        thumbnails=thumbs if thumbnails is not None else None,
        precision=precision,
        frames=frames,
    )


def _plain(t: Tensor) -> Tensor:
    """A copy of an inference-mode tensor on the CPU that autograd code may use like any other."""
    return t.detach().cpu().clone()


def write_embeddings(dataset: str | Path, emb: Embeddings, tag: str, source: str = "") -> int:
    """Add (or replace) the ``image_embedding`` and ``caption_embeddings`` columns of ``dataset``.

    Rows not in ``emb`` get nulls. The images are not rewritten: the new columns go into new data files, and
    the dataset gains exactly one version (earlier embedding columns are replaced in the same commit). The
    commit is made under the dataset's write lock, so it takes its turn with ingests; a commit by a writer
    that does not take the lock makes it join the columns again on the new version.

    Returns:
        The new version of the dataset.

    Raises:
        DataError: no such dataset, or other processes kept committing to it.
    """
    dim = emb.image.shape[1]
    meta = {b"vlkit.model": tag.encode(), b"vlkit.source": str(source).encode(), b"vlkit.dim": str(dim).encode(),
            b"vlkit.precision": emb.precision.encode()}
    per_image: list[list] = [[] for _ in emb.ids]
    text = emb.text.numpy().astype(np.float32)
    for row, image in enumerate(emb.caption_image.tolist()):
        per_image[image].append(text[row])
    vec = pa.list_(pa.float32(), dim)
    image_type = pa.field(IMAGE_COLUMN, vec, metadata=meta)
    text_type = pa.field(TEXT_COLUMN, pa.list_(vec), metadata=meta)
    table = pa.Table.from_arrays(
        [pa.array(emb.ids, pa.string()),
         pa.FixedSizeListArray.from_arrays(pa.array(emb.image.numpy().astype(np.float32).ravel()), dim),
         pa.array([[v.tolist() for v in vs] for vs in per_image], pa.list_(vec))],
        schema=pa.schema([pa.field("id", pa.string()), image_type, text_type]))
    def waiting() -> None:
        print(f"waiting for another process writing to {dataset} ...", file=sys.stderr, flush=True)

    with write_lock(dataset, on_wait=waiting):
        ds = open_dataset(dataset)
        return retry_on_conflict(lambda current: replace_columns(current, table, on="id"), dataset,
                                 "the embeddings were written", dataset=ds).version


def read_embeddings(dataset: str | Path) -> dict[str, str]:
    """The field metadata of the embedding columns of ``dataset`` (``{}`` if it has none)."""
    ds = open_dataset(dataset)
    if IMAGE_COLUMN not in ds.schema.names:
        return {}
    meta = ds.schema.field(IMAGE_COLUMN).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}
