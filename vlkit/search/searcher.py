"""Queries against an index: text->image, image->image and image->text.

Scores are cosine similarities of L2-normalised embeddings (1 = identical direction).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from vlkit.errors import VlkitError
from vlkit.search.index import CAPTIONS_TABLE, IMAGES_TABLE, read_index_info
from vlkit.search.loading import LoadedModel, load_for_inference

MAX_K = 100
MAX_QUERY_CHARS = 1000
MAX_IMAGE_BYTES = 20 * 1024 * 1024
NPROBES = 32  # partitions visited by an approximate search
REFINE = 10  # candidates re-scored exactly per result wanted


class QueryError(VlkitError):
    """A bad query (empty text, k out of bounds, not an image, too large): the caller's mistake."""


@dataclass
class ImageHit:
    """One image found by a search."""

    id: str
    score: float
    caption: str
    captions: list[str] = field(default_factory=list)


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


def decode_image(data: bytes) -> Image.Image:
    """The uploaded bytes as an RGB image, or a :class:`QueryError` saying why not."""
    if not data:
        raise QueryError("the image is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise QueryError(f"the image is too large ({len(data) / 2**20:.1f} MiB; at most "
                         f"{MAX_IMAGE_BYTES // 2**20} MiB)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise QueryError(f"not a readable image ({type(exc).__name__})") from None
    return img.convert("RGB")


class Searcher:
    """Search an index built by :func:`vlkit.search.index.build_index`.

    Args:
        index_dir: the index directory.
        model: another model (run, model directory or checkpoint) to embed queries with, instead of the
            index's own copy; its embedding size must match the index.

    Raises:
        VlkitError: the index is missing or unreadable, or ``model`` does not fit it.
    """

    def __init__(self, index_dir: str | Path, model: str | Path | None = None):
        import lancedb

        self.index_dir = Path(index_dir)
        self.info = read_index_info(self.index_dir)
        self.loaded: LoadedModel = load_for_inference(model or self.index_dir / "model")
        if self.loaded.embed_dim != self.info.dim:
            raise VlkitError(f"{model or self.index_dir / 'model'} embeds into {self.loaded.embed_dim} dimensions "
                             f"but the index at {self.index_dir} holds {self.info.dim}-dimensional embeddings; "
                             "rebuild it with 'vlkit index' for this model")
        self.model_matches = self.loaded.tag == self.info.model_tag
        db = lancedb.connect(str(self.index_dir / "db"))
        try:
            self.images = db.open_table(IMAGES_TABLE)
            self.captions = db.open_table(CAPTIONS_TABLE)
        except (ValueError, FileNotFoundError, OSError) as exc:
            raise VlkitError(f"{self.index_dir}: damaged index ({exc})") from None
        self.transform = self.loaded.model.preprocess.image_transform(train=False)

    # ----------------------------------------------------------------- embedding queries
    @torch.no_grad()
    def embed_text(self, query: str) -> torch.Tensor:
        if not isinstance(query, str) or not query.strip():
            raise QueryError("the query is empty")
        if len(query) > MAX_QUERY_CHARS:
            raise QueryError(f"the query is too long ({len(query)} characters; at most {MAX_QUERY_CHARS})")
        tokens = self.loaded.tokenizer([query.strip()])
        return self.loaded.model.encode_text(tokens["input_ids"], tokens["attention_mask"])[0].float()

    @torch.no_grad()
    def embed_image(self, data: bytes) -> torch.Tensor:
        decode_image(data)  # a clear error for anything that is not an image
        pixels = self.transform.normalize(self.transform(data)[None])  # [1, 3, S, S]
        return self.loaded.model.encode_image(pixels)[0].float()

    # ----------------------------------------------------------------- searching
    def _query(self, table, vector: torch.Tensor, k: int, columns: list[str], method: str) -> list[dict]:
        q = table.search(vector.numpy(), vector_column_name="vector").distance_type("cosine").limit(k)
        if method != "exact":
            q = q.nprobes(NPROBES).refine_factor(REFINE)
        return q.select([*columns, "_distance"]).to_list()

    def search_vector(self, vector: torch.Tensor, k: int = 5) -> list[ImageHit]:
        rows = self._query(self.images, vector, check_k(k), ["id", "caption", "captions"],
                           self.info.search[IMAGES_TABLE])
        return [ImageHit(r["id"], 1.0 - float(r["_distance"]), r["caption"], list(r["captions"] or []))
                for r in rows]

    def search_text(self, query: str, k: int = 5) -> list[ImageHit]:
        """Images for a text query."""
        return self.search_vector(self.embed_text(query), k)

    def search_image(self, data: bytes, k: int = 5) -> list[ImageHit]:
        """Images similar to an image (encoded bytes)."""
        return self.search_vector(self.embed_image(data), k)

    def image_to_text(self, data: bytes, k: int = 5) -> list[TextHit]:
        """Captions that describe an image (encoded bytes)."""
        rows = self._query(self.captions, self.embed_image(data), check_k(k), ["id", "text"],
                           self.info.search[CAPTIONS_TABLE])
        return [TextHit(r["id"], r["text"], 1.0 - float(r["_distance"])) for r in rows]

    def thumbnail(self, image_id: str) -> bytes | None:
        """The stored JPEG thumbnail of an image, or None for an unknown id."""
        safe = image_id.replace("'", "''")
        rows = self.images.search().where(f"id = '{safe}'").select(["thumbnail"]).limit(1).to_list()
        return rows[0]["thumbnail"] if rows else None
