"""Heat maps for the search page: why an indexed image matches a query, drawn over its thumbnail, computed on
demand and kept in a small least-recently-used cache keyed by the model's fingerprint, the image id and the
query."""

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
        self._cache: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.computed = 0  # heat maps computed so far (the rest came from the cache)

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

    def get(self, image_id: str, query: str, run: Callable = lambda fn, *a: fn(*a)) -> bytes | None:
        """The heat map of ``image_id`` for ``query`` as PNG bytes, or None for an id the index does not hold.

        Args:
            image_id: an id of the index.
            query: the text.
            run: how to call the model (the server passes its model lock).
        """
        key = (self.searcher.loaded.tag, image_id, query)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
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
