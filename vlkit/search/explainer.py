"""Heat maps for the search page: why an indexed image matches a query, drawn over its thumbnail, computed on
demand and kept in a small least-recently-used cache keyed by the model's fingerprint, the version of the index
(a rebuilt index may hold other images under the same ids), the image id and the query."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

from vlkit.errors import VlkitError
from vlkit.search.searcher import MAX_QUERY_CHARS, QueryError, Searcher

#: Heat maps kept (each a PNG of a few tens of kilobytes at most).
CACHE_SIZE = 256
#: The side of the picture sent to the page.
PICTURE_SIDE = 224


class ExplanationCache:
    """PNG heat maps of (image id, query) pairs for one :class:`~vlkit.search.searcher.Searcher`.

    Args:
        searcher: the index and its model.
        size: heat maps kept, least recently used dropped first.
    """

    def __init__(self, searcher: Searcher, size: int = CACHE_SIZE):
        self.searcher = searcher
        self.size = size
        self._cache: OrderedDict[tuple[str, float, str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.computed = 0  # heat maps computed so far
        self.hits = 0  # heat maps answered from the cache

    @property
    def available(self) -> bool:
        """Whether the served model can be explained: it takes gradients through PyTorch weights (a model run by
        onnxruntime cannot)."""
        import torch

        model = self.searcher.loaded.model
        return isinstance(model, torch.nn.Module) and next(iter(model.parameters()), None) is not None

    def require(self) -> None:
        """Raise a :class:`QueryError` (400) when the served model cannot be explained."""
        if not self.available:
            raise QueryError(f"the served model ({type(self.searcher.loaded.model).__name__}) cannot explain its "
                             "matches: explanations take gradients through PyTorch weights; serve the index "
                             "with --runtime torch")

    @staticmethod
    def check(image_id: str | None, query: str | None) -> tuple[str, str]:
        """The id and the query, checked before any work.

        Raises:
            QueryError: either is missing or empty, or the query is too long.
        """
        if not image_id:
            raise QueryError("missing image: pass its id as ?id=...")
        if query is None or not query.strip():
            raise QueryError("missing query: pass the text as ?q=...")
        if len(query) > MAX_QUERY_CHARS:
            raise QueryError(f"the query is too long ({len(query)} characters; at most {MAX_QUERY_CHARS})")
        return image_id, query.strip()

    def cached(self, image_id: str, query: str) -> bool:
        """Whether the heat map of ``image_id`` for ``query`` by the current model and index is in the cache."""
        with self._lock:
            return (self.searcher.loaded.tag, self.searcher.info.built_at, image_id, query) in self._cache

    def get(self, image_id: str, query: str, run: Callable = lambda fn, *a: fn(*a)) -> bytes | None:
        """The heat map of ``image_id`` for ``query`` as PNG bytes, or None for an id the index does not hold.

        Args:
            image_id: an id of the index.
            query: the text.
            run: how to call the model (the server passes its model lock).
        """
        key = (self.searcher.loaded.tag, self.searcher.info.built_at, image_id, query)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.hits += 1
                return self._cache[key]
        thumbnail = self.searcher.thumbnail(image_id)
        if thumbnail is None:
            return None
        picture = run(self._draw, thumbnail, query)
        with self._lock:
            self._cache[key] = picture
            self._cache.move_to_end(key)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
            self.computed += 1
        return picture

    def _draw(self, thumbnail: bytes, query: str) -> bytes:
        from vlkit.data.decode import ImageDecodeError, decode_rgb
        from vlkit.explain.figures import overlay, png_bytes
        from vlkit.explain.gradcam import explain

        loaded = self.searcher.loaded
        transform = loaded.model.preprocess.image_transform(train=False)
        try:
            pixels = transform(thumbnail)  # uint8 [3, S, S]: the centre the model sees
            image = decode_rgb(thumbnail)
        except (VlkitError, ImageDecodeError) as exc:
            raise QueryError(f"the stored thumbnail does not decode: {exc}") from None
        result = explain(loaded.model, loaded.tokenizer, transform.normalize(pixels[None]), query)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side)).resize((PICTURE_SIDE, PICTURE_SIDE))
        return png_bytes(overlay(square, result.heat.numpy()))
