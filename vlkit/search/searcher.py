"""Queries against an index: text->image, image->image and image->text (and, for an index of videos,
text->video, image->video and video captions: a video is searched by its mean-pooled embedding).

Scores are cosine similarities of L2-normalised embeddings (1 = identical direction).

A :class:`Searcher` follows its index directory: when the index is rebuilt in place (``vlkit index`` replaces
the directory by a rename), the next query re-opens it, so a long-running server answers from the new index
instead of failing on the files of the old one. While the directory is missing (between the removal of the old
index and the rename of the new one) or cannot be opened, queries raise :class:`IndexUnavailable`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch

from vlkit.data.decode import ImageDecodeError, ImageTooLarge, open_image
from vlkit.errors import VlkitError
from vlkit.search.index import CAPTIONS_TABLE, IMAGES_TABLE, INDEX_META, IndexInfo, read_index_info
from vlkit.inference.loading import LoadedModel, load_for_inference

MAX_K = 100
MAX_QUERY_CHARS = 1000
MAX_IMAGE_BYTES = 20 * 1024 * 1024
NPROBES = 32  # partitions visited by an approximate search
REFINE = 10  # candidates re-scored exactly per result wanted
REOPEN_RETRY_S = 2.0  # a rebuilt index that failed to open is tried again after this long

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueryError(VlkitError):
    """A bad query (empty text, k out of bounds, not an image, too large): the caller's mistake."""


class QueryImageTooLarge(QueryError):
    """The query image holds more pixels than the limit (:func:`vlkit.data.decode.max_pixels`)."""


class IndexUnavailable(VlkitError):
    """The index is being rebuilt or replaced and cannot answer now; the same query may work a moment later."""


@dataclass
class ImageHit:
    """One image found by a search.

    Attributes:
        score: the cosine similarity, or after re-ranking (:meth:`Searcher.rerank_text`) the ITM probability.
        cosine: after re-ranking, the cosine similarity the hit was found with (else None).
        itm: after re-ranking, the ITM probability (else None).
        media: ``image``, or ``video`` in an index of videos (its ``id`` is a video's, its thumbnail the video's
            middle frame).
        duration: a video's length in seconds (None for an image).
    """

    id: str
    score: float
    caption: str
    captions: list[str] = field(default_factory=list)
    cosine: float | None = None
    itm: float | None = None
    media: str = "image"
    duration: float | None = None


@dataclass
class RerankedHits:
    """The hits of a re-ranked text query.

    Attributes:
        hits: the best ``k`` of the ``rerank`` nearest images, by ITM probability.
        images_from: ``dataset`` (the images the index was built from, read by id) or ``thumbnails`` (the
            index's stored thumbnails, when the dataset is gone).
        note: why the thumbnails were used ('' otherwise).
    """

    hits: list[ImageHit]
    images_from: str
    note: str = ""


@dataclass
class TextHit:
    """One caption found by an image->text search."""

    id: str  # the image the caption belongs to
    text: str
    score: float


def check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise QueryError(f"k must be an integer from 1 to {MAX_K}, not {k!r}")
    return k


def check_image(data: bytes) -> tuple[int, int]:
    """Check a query image from its size in bytes and its header alone (no pixel is decoded).

    Returns:
        The image's (width, height).

    Raises:
        QueryImageTooLarge: more pixels than the pixel limit.
        QueryError: empty, too many bytes, or not an image.
    """
    if not data:
        raise QueryError("the image is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise QueryError(f"the image is too large ({len(data) / 2**20:.1f} MiB; at most "
                         f"{MAX_IMAGE_BYTES // 2**20} MiB)")
    try:
        img = open_image(data)
    except ImageTooLarge as exc:
        raise QueryImageTooLarge(f"the image is too large: {exc}") from None
    except ImageDecodeError as exc:
        raise QueryError(f"not a readable image: {exc}") from None
    return img.size


@dataclass(frozen=True)
class _Opened:
    """One version of the index, opened: what a query reads from start to end."""

    stamp: tuple[int, ...]
    info: IndexInfo
    loaded: LoadedModel
    images: Any  # lancedb tables
    captions: Any
    transform: Any


@contextlib.contextmanager
def _query_mode(opened: _Opened) -> Iterator[None]:
    """Inference mode, in the precision the index's embeddings were computed in."""
    from vlkit.inference.speed import autocast

    with torch.inference_mode(), autocast(opened.info.precision, opened.loaded.device):
        yield


class Searcher:
    """Search an index built by :func:`vlkit.search.index.build_index`.

    Args:
        index_dir: the index directory.
        model: another model (run, model directory or checkpoint) to embed queries with, instead of the
            index's own copy; its embedding size must match the index.
        runtime: ``torch``, or ``onnx``: queries embedded by onnxruntime (``model`` may then be a
            ``vlkit export --format onnx`` folder; a PyTorch model is exported at load time). Re-ranking and
            captions need the PyTorch model.

    Raises:
        VlkitError: the index is missing or unreadable, or ``model`` does not fit it.
    """

    def __init__(self, index_dir: str | Path, model: str | Path | None = None, runtime: str = "torch"):
        self.index_dir = Path(index_dir)
        self.model = model
        self.runtime = runtime
        self._reopen_lock = threading.Lock()
        self._failed: tuple[tuple[int, ...], str, float] | None = None
        info = read_index_info(self.index_dir)
        self._opened = self._open(info, self._stamp() or (), None)

    # ----------------------------------------------------------------- the current version of the index
    @property
    def info(self) -> IndexInfo:
        return self._opened.info

    @property
    def loaded(self) -> LoadedModel:
        return self._opened.loaded

    @property
    def model_matches(self) -> bool:
        """Whether queries are embedded by the model that built the index."""
        return self._opened.loaded.tag == self._opened.info.model_tag

    def _stamp(self) -> tuple[int, ...] | None:
        """What identifies the version on disk: a rebuild makes a new directory and a new ``index.json``."""
        try:
            folder = os.stat(self.index_dir)
            meta = os.stat(self.index_dir / INDEX_META)
        except OSError:
            return None
        return folder.st_dev, folder.st_ino, meta.st_ino, meta.st_mtime_ns, meta.st_size

    def _open(self, info: IndexInfo, stamp: tuple[int, ...], previous: _Opened | None) -> _Opened:
        import lancedb

        source = self.model or self.index_dir / "model"
        if previous is not None and (self.model is not None or previous.loaded.tag == info.model_tag):
            loaded = previous.loaded  # the same weights: no need to load them again
        else:
            loaded = load_for_inference(source, runtime=self.runtime)
        if not callable(getattr(loaded.model, "encode_image", None)):
            raise VlkitError(f"{source}: a {type(loaded.model).__name__} does not embed images and texts, so it "
                             "cannot search an index; serve a model that does (CLIP, BriVL, CoCa)")
        if loaded.embed_dim != info.dim:
            raise VlkitError(f"{source} embeds into {loaded.embed_dim} dimensions but the index at "
                             f"{self.index_dir} holds {info.dim}-dimensional embeddings; rebuild it with "
                             "'vlkit index' for this model")
        db = lancedb.connect(str(self.index_dir / "db"))
        try:
            images, captions = db.open_table(IMAGES_TABLE), db.open_table(CAPTIONS_TABLE)
        except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
            raise VlkitError(f"{self.index_dir}: damaged index ({exc})") from None
        transform = loaded.model.preprocess.image_transform(train=False)
        return _Opened(stamp, info, loaded, images, captions, transform)

    def refresh(self) -> bool:
        """Re-open the index if it was rebuilt since it was opened.

        Returns:
            True when a new version was opened, False when the one in use is current.

        Raises:
            IndexUnavailable: the index directory is missing (mid-rebuild) or its new version cannot be opened.
        """
        stamp = self._stamp()
        if stamp == self._opened.stamp:
            return False
        with self._reopen_lock:
            if stamp is None:
                raise IndexUnavailable(f"the index at {self.index_dir} is missing or being rebuilt; "
                                       "try again in a moment")
            if stamp == self._opened.stamp:
                return False  # another thread re-opened it meanwhile
            failed = self._failed
            if failed is not None and failed[0] == stamp and time.monotonic() - failed[2] < REOPEN_RETRY_S:
                raise IndexUnavailable(failed[1])
            try:
                self._opened = self._open(read_index_info(self.index_dir), stamp, self._opened)
            except VlkitError as exc:
                message = f"the index at {self.index_dir} changed and cannot be opened now: {exc}"
                self._failed = (stamp, message, time.monotonic())
                raise IndexUnavailable(message) from None
            self._failed = None
        log.info("re-opened the rebuilt index at %s (%d images)", self.index_dir, self._opened.info.images)
        return True

    def _current(self) -> _Opened:
        self.refresh()
        return self._opened

    def _read(self, opened: _Opened, fn: Callable[[], T]) -> T:
        """Run a read of ``opened``'s tables; a failure because the index was replaced meanwhile is
        :class:`IndexUnavailable`, not an internal error."""
        try:
            return fn()
        except (OSError, RuntimeError, ValueError):
            if self._stamp() != opened.stamp:
                raise IndexUnavailable(f"the index at {self.index_dir} was replaced during the query; "
                                       "try again") from None
            raise

    # ----------------------------------------------------------------- embedding queries
    def embed_text(self, query: str) -> torch.Tensor:
        """The embedding of a text query, by the model of the current index."""
        return self._embed_text(self._current(), query)

    def embed_image(self, data: bytes) -> torch.Tensor:
        """The embedding of an image (encoded bytes), by the model of the current index."""
        check_image(data)
        return self._embed_image(self._current(), data)

    @staticmethod
    def _embed_text(opened: _Opened, query: str) -> torch.Tensor:
        if not isinstance(query, str) or not query.strip():
            raise QueryError("the query is empty")
        if len(query) > MAX_QUERY_CHARS:
            raise QueryError(f"the query is too long ({len(query)} characters; at most {MAX_QUERY_CHARS})")
        tokens = opened.loaded.tokenizer([query.strip()])
        with _query_mode(opened):
            vector = opened.loaded.model.encode_text(tokens["input_ids"], tokens["attention_mask"])[0].float()
        return vector.clone()

    @staticmethod
    def _embed_image(opened: _Opened, data: bytes) -> torch.Tensor:
        try:
            pixels = opened.transform.normalize(opened.transform(data)[None])  # [1, 3, S, S]
        except (VlkitError, ImageDecodeError) as exc:
            raise QueryError(f"not a readable image: {exc}") from None
        with _query_mode(opened):
            vector = opened.loaded.model.encode_image(pixels)[0].float()
        return vector.clone()

    # ----------------------------------------------------------------- searching
    def _query(self, opened: _Opened, table: str, vector: torch.Tensor, k: int, columns: list[str]) -> list[dict]:
        def run() -> list[dict]:
            q = getattr(opened, table).search(vector.numpy(), vector_column_name="vector")
            q = q.distance_type("cosine").limit(k)
            if opened.info.search[table] != "exact":
                q = q.nprobes(NPROBES).refine_factor(REFINE)
            return q.select([*columns, "_distance"]).to_list()

        return self._read(opened, run)

    def _images(self, opened: _Opened, vector: torch.Tensor, k: int) -> list[ImageHit]:
        video = bool(opened.info.frames)  # an index of videos: its table also holds their durations
        rows = self._query(opened, IMAGES_TABLE, vector, check_k(k),
                           ["id", "caption", "captions", *(["duration"] if video else [])])
        return [ImageHit(r["id"], 1.0 - float(r["_distance"]), r["caption"], list(r["captions"] or []),
                         media="video" if video else "image", duration=r.get("duration")) for r in rows]

    def search_vector(self, vector: torch.Tensor, k: int = 5) -> list[ImageHit]:
        """Images nearest to an embedding."""
        return self._images(self._current(), vector, k)

    def search_text(self, query: str, k: int = 5) -> list[ImageHit]:
        """Images for a text query."""
        check_k(k)
        opened = self._current()  # one version of the index embeds the query and answers it
        return self._images(opened, self._embed_text(opened, query), k)

    def rerank_text(self, query: str, k: int = 5, rerank: int = 20) -> RerankedHits:
        """Images for a text query: the ``rerank`` nearest by cosine, re-scored by the model's image-text
        matching head, the best ``k`` of them by ITM probability (each hit's ``score``; ``cosine`` kept).

        The images are read by id from the dataset the index was built from (``index.json``), at the model's
        input size; when that dataset is gone or lacks an id, the index's stored thumbnails are used.

        Raises:
            QueryError: a bad query, ``k`` or ``rerank`` (from ``k`` to the most results).
            VlkitError: the model has no matching head.
        """
        from vlkit.inference.matching import require_matching

        check_k(k)
        if isinstance(rerank, bool) or not isinstance(rerank, int) or not k <= rerank <= MAX_K:
            raise QueryError(f"--rerank must be an integer from k ({k}) to {MAX_K}, not {rerank!r}")
        opened = self._current()
        if opened.info.frames:
            raise VlkitError("re-ranking scores images with a matching head, and this index holds videos; "
                             "search without --rerank")
        model = require_matching(opened.loaded.model, "--rerank")
        hits = self._images(opened, self._embed_text(opened, query), rerank)
        if not hits:
            return RerankedHits([], "dataset")
        pixels, note = self._dataset_pixels(opened, [h.id for h in hits])
        if pixels is None:
            pixels = self._thumbnail_pixels(opened, [h.id for h in hits])
        tokens = opened.loaded.tokenizer([query.strip()])
        with torch.no_grad():
            itm = model.match_scores(model.match_features(pixels), tokens["input_ids"].expand(len(hits), -1),
                                     tokens["attention_mask"].expand(len(hits), -1)).float()  # [hits]
        order = torch.sort(itm, descending=True, stable=True).indices[:k].tolist()
        best = [ImageHit(hits[i].id, float(itm[i]), hits[i].caption, hits[i].captions, cosine=hits[i].score,
                         itm=float(itm[i])) for i in order]
        return RerankedHits(best, "thumbnails" if note else "dataset", note)

    @staticmethod
    def _dataset_pixels(opened: _Opened, ids: list[str]) -> tuple[torch.Tensor | None, str]:
        """The images ``ids`` read from the index's dataset ``[n, 3, S, S]``, or None and why not."""
        from vlkit.data.dataset import LanceImageTextDataset
        from vlkit.data.store import open_dataset

        path = Path(opened.info.dataset)
        if not path.exists():
            return None, f"the dataset the index was built from ({path}) is gone"
        try:
            position = {v: i for i, v in enumerate(open_dataset(path).to_table(columns=["id"])
                                                   .column("id").to_pylist())}
            missing = [i for i in ids if i not in position]
            if missing:
                return None, f"{path} no longer holds image '{missing[0]}'"
            ds = LanceImageTextDataset(path, None, opened.transform, None, captions="none")
            ds.offsets = [position[i] for i in ids]
            return ds.__getitems__(list(range(len(ids))))["image"], ""
        except (VlkitError, OSError, ValueError) as exc:
            return None, f"cannot read {path}: {exc}"

    def _thumbnail_pixels(self, opened: _Opened, ids: list[str]) -> torch.Tensor:
        images = []
        for image_id in ids:
            data = self._read(opened, lambda: opened.images.search().where(
                "id = '" + image_id.replace("'", "''") + "'").select(["thumbnail"]).limit(1).to_list())
            images.append(opened.transform(data[0]["thumbnail"]))
        return opened.transform.normalize(torch.stack(images))  # [n, 3, S, S]

    def search_image(self, data: bytes, k: int = 5) -> list[ImageHit]:
        """Images similar to an image (encoded bytes)."""
        check_k(k)
        check_image(data)  # the pixel limit, from the header, before any decoding
        opened = self._current()
        return self._images(opened, self._embed_image(opened, data), k)

    def image_to_text(self, data: bytes, k: int = 5) -> list[TextHit]:
        """Captions that describe an image (encoded bytes)."""
        check_k(k)
        check_image(data)
        opened = self._current()
        rows = self._query(opened, CAPTIONS_TABLE, self._embed_image(opened, data), k, ["id", "text"])
        return [TextHit(r["id"], r["text"], 1.0 - float(r["_distance"])) for r in rows]

    def thumbnail(self, image_id: str) -> bytes | None:
        """The stored JPEG thumbnail of an image, or None for an unknown id."""
        opened = self._current()
        safe = image_id.replace("'", "''")
        rows = self._read(opened, lambda: opened.images.search().where(f"id = '{safe}'")
                          .select(["thumbnail"]).limit(1).to_list())
        return rows[0]["thumbnail"] if rows else None
