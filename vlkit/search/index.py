"""A searchable index of a dataset: image and caption embeddings in LanceDB, with ids, captions and thumbnails.

Layout of an index directory (written to a temporary directory, then renamed into place)::

    index.json      what made it: model fingerprint, embedding size, dataset, split, counts, search method
    model/          the model that embedded the images (it embeds queries the same way)
    db/             LanceDB: table ``images`` (id, caption, captions, thumbnail JPEG, vector) and table
                    ``captions`` (image id, text, vector), for text->image, image->image and image->text

A video dataset (one with a ``video`` column) is indexed as videos: each row's vector is the mean of ``frames``
uniformly sampled frames' embeddings (:mod:`vlkit.inference.video_embed`), its thumbnail is made from the
middle frame ingest stored in ``image``, the ``images`` table also holds each video's ``duration`` (seconds),
and ``index.json`` records ``frames`` (0 for images).

Below ``ann_threshold`` rows a table is searched exactly (a flat scan, recall 1.0). Above it an IVF_SQ index
is built: on 100k real-structured 256-d embeddings (``bench/search.py``) it kept recall@10 above 0.95 at a
fraction of the flat-scan latency, where LanceDB's default IVF_PQ without refinement fell far below that.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
from vlkit import __version__
from vlkit.data.decode import ImageDecodeError, decode_rgb
from vlkit.data.store import open_dataset, split_indices
from vlkit.data.transforms import thumbnail_jpeg
from vlkit.errors import VlkitError
from vlkit.models.io import save_model
from vlkit.inference.embed import IMAGE_COLUMN, TEXT_COLUMN, Embeddings, compute_embeddings, read_embeddings
from vlkit.inference.loading import LoadedModel
from vlkit.utils.fs import atomic_directory, check_output_dir

INDEX_META = "index.json"
IMAGES_TABLE = "images"
CAPTIONS_TABLE = "captions"
DEFAULT_ANN_THRESHOLD = 50_000
THUMB_SIZE = 192


@dataclass
class IndexInfo:
    """What ``index.json`` records about an index."""

    model_tag: str
    model_source: str
    dim: int
    dataset: str
    split: str | None
    images: int
    captions: int
    search: dict[str, str]  # table -> "exact" or the approximate index type
    built_at: float
    vlkit_version: str = __version__
    precision: str = "fp32"  # what the embeddings were computed in; queries are embedded in the same
    frames: int = 0  # 0: the rows are images; N: videos, each the mean of N frames' embeddings

    @property
    def media(self) -> str:
        """``image`` or ``video``: what the rows of the ``images`` table are."""
        return "video" if self.frames else "image"


def thumbnail(data: bytes, size: int = THUMB_SIZE) -> bytes:
    """A JPEG thumbnail whose longer side is ``size`` pixels.

    Raises:
        VlkitError: the image is unreadable or over the pixel limit (:mod:`vlkit.data.decode`).
    """
    try:
        img = decode_rgb(data, draft=size)
    except ImageDecodeError as exc:
        raise VlkitError(f"cannot make a thumbnail: {exc}") from None
    return thumbnail_jpeg(img, size)


def _thumbnails(dataset: str | Path, split: str | None, ids: list[str], chunk: int = 256) -> Iterator[bytes]:
    ds = open_dataset(dataset)
    offsets = split_indices(ds, split)[: len(ids)]
    for start in range(0, len(offsets), chunk):
        part = offsets[start:start + chunk]
        got = ds.take(part, columns=["id"]).column("id").to_pylist()
        if got != ids[start:start + len(part)]:
            raise VlkitError(f"{dataset}: rows changed while the index was being built; run 'vlkit index' again")
        for _, data in ds.read_blobs("image", indices=part, preserve_order=True):
            yield thumbnail(data)


def _stored_embeddings(loaded: LoadedModel, dataset: str | Path, split: str | None) -> Embeddings | None:
    """Embeddings already written into ``dataset`` by ``vlkit embed`` with this same model, if any."""
    meta = read_embeddings(dataset)
    if meta.get("vlkit.model") != loaded.tag:
        return None
    import torch

    ds = open_dataset(dataset)
    offsets = split_indices(ds, split)
    rows = ds.take(offsets, columns=["id", "captions", IMAGE_COLUMN, TEXT_COLUMN]).to_pydict()
    if any(v is None for v in rows[IMAGE_COLUMN]):
        return None  # rows added after the last 'vlkit embed'
    texts, owner, captions = [], [], []
    for i, (caps, vecs) in enumerate(zip(rows["captions"], rows[TEXT_COLUMN])):
        if len(caps or []) != len(vecs or []):
            return None
        texts += vecs or []
        captions += caps or []
        owner += [i] * len(vecs or [])
    dim = len(rows[IMAGE_COLUMN][0])
    return Embeddings(ids=rows["id"], image=torch.tensor(rows[IMAGE_COLUMN], dtype=torch.float32),
                      text=torch.tensor(texts, dtype=torch.float32).reshape(-1, dim),
                      caption_image=torch.tensor(owner, dtype=torch.long), captions=captions,
                      precision=meta.get("vlkit.precision", "fp32"))


def _partitions(rows: int) -> int:
    return max(2, min(4096, int(round(math.sqrt(rows)))))


def create_vector_index(table, rows: int, threshold: int) -> str:
    """Build an approximate index on ``table`` when it has at least ``threshold`` rows; returns the method."""
    if rows < threshold:
        return "exact"
    from lancedb.index import IvfSq

    table.create_index("vector", config=IvfSq(distance_type="cosine", num_partitions=_partitions(rows)))
    return "IVF_SQ"


def build_index(loaded: LoadedModel, dataset: str | Path, out: str | Path, split: str | None = None, *,
                batch_size: int = 64, ann_threshold: int = DEFAULT_ANN_THRESHOLD, num_workers: int = 0,
                progress: bool = False, frames: int | None = None) -> IndexInfo:
    """Embed ``split`` of ``dataset`` with ``loaded`` (or reuse the image embeddings ``vlkit embed`` stored
    with the same model) and write a LanceDB index to ``out``, replacing an earlier index there only once
    complete.

    ``frames``: for a video dataset, the frames sampled per video (default 8; 0 indexes the middle frames as
    images); see :func:`vlkit.inference.video_embed.resolve_frames`.

    Returns:
        What was recorded in ``index.json``.

    Raises:
        VlkitError: ``out`` holds anything but an earlier index (files vlkit did not write, the dataset, the
            current directory...), or cannot be written, or a bad ``frames``.
        DataError: ``frames`` for a dataset without videos, or a row without a video.
    """
    import lancedb
    from lancedb.index import BTree

    from vlkit.inference.video_embed import require_videos, resolve_frames

    check_output_dir(out, "index", inputs=[dataset])  # before the embeddings are computed
    frames = resolve_frames(dataset, frames)
    durations = bool(frames) and "duration" in open_dataset(dataset).schema.names
    if frames:
        require_videos(dataset, split)

    emb = None if frames else _stored_embeddings(loaded, dataset, split)  # stored ones are of images
    if emb is None:
        emb = compute_embeddings(loaded, dataset, split, batch_size=batch_size, num_workers=num_workers,
                                 progress=progress, thumbnails=THUMB_SIZE, frames=frames,
                                 columns=["duration"] if durations else [])  # one decode for both
    dim = emb.image.shape[1]
    first_caption = [""] * len(emb.ids)
    all_captions: list[list[str]] = [[] for _ in emb.ids]
    for text, image in zip(emb.captions, emb.caption_image.tolist()):
        all_captions[image].append(text)
        first_caption[image] = first_caption[image] or text
    vec = pa.list_(pa.float32(), dim)
    images = pa.table({
        "id": pa.array(emb.ids, pa.string()),
        "caption": pa.array(first_caption, pa.string()),
        "captions": pa.array(all_captions, pa.list_(pa.string())),
        "thumbnail": pa.array(emb.thumbnails if emb.thumbnails is not None
                              else list(_thumbnails(dataset, split, emb.ids)), pa.binary()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(emb.image.numpy().astype(np.float32).ravel()), dim),
    })
    if frames:  # videos: their length, shown with the results
        seconds = emb.columns["duration"] if durations else [None] * len(emb.ids)
        images = images.append_column("duration", pa.array(seconds, pa.float64()))
    captions = pa.table({
        "id": pa.array([emb.ids[i] for i in emb.caption_image.tolist()], pa.string()),
        "text": pa.array(emb.captions, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(
            pa.array(emb.text.numpy().astype(np.float32).ravel(), pa.float32()), dim),
    }, schema=pa.schema([("id", pa.string()), ("text", pa.string()), ("vector", vec)]))
    with atomic_directory(out, "index", inputs=[dataset]) as tmp:
        save_model(loaded.model, tmp / "model", loaded.tokenizer)
        db = lancedb.connect(str(tmp / "db"))
        image_table = db.create_table(IMAGES_TABLE, images)
        image_table.create_index("id", config=BTree())  # thumbnails and results are looked up by id
        search = {IMAGES_TABLE: create_vector_index(image_table, len(emb.ids), ann_threshold),
                  CAPTIONS_TABLE: create_vector_index(db.create_table(CAPTIONS_TABLE, captions),
                                                      len(emb.captions), ann_threshold)}
        info = IndexInfo(model_tag=loaded.tag, model_source=str(loaded.source), dim=dim, dataset=str(dataset),
                         split=split, images=len(emb.ids), captions=len(emb.captions), search=search,
                         built_at=time.time(), precision=emb.precision, frames=frames)
        (tmp / INDEX_META).write_text(json.dumps(asdict(info), indent=2))
    return info


def read_index_info(index_dir: str | Path) -> IndexInfo:
    """``index.json`` of an index, or a clear error when ``index_dir`` is not one."""
    path = Path(index_dir) / INDEX_META
    if not Path(index_dir).exists():
        raise VlkitError(f"{index_dir}: no such index (build one with 'vlkit index RUN --data DATA --out {index_dir}')")
    if not path.exists():
        raise VlkitError(f"{index_dir}: not a vlkit index (no {INDEX_META})")
    try:
        return IndexInfo(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise VlkitError(f"{path}: unreadable index description ({exc})") from None
