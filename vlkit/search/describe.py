"""Captions for uploaded images by the served model, when it has a text decoder: ``/api/describe`` of
:mod:`vlkit.search.server` and the "describe this image" mode of its page."""

from __future__ import annotations

from typing import Callable

from vlkit.data.decode import ImageDecodeError
from vlkit.errors import VlkitError
from vlkit.inference.loading import LoadedModel
from vlkit.search.searcher import QueryError

MAX_DESCRIPTIONS = 5
DESCRIBE_BEAMS = 3  # beam search width (more when more captions are asked for)
DESCRIBE_TOKENS = 30


class Describer:
    """Captions for uploaded images, by a generative model (see :mod:`vlkit.inference.interface`).

    Args:
        source: the model: a :class:`~vlkit.inference.loading.LoadedModel`, or a callable returning the current one
            (the searcher's, which changes when the index is rebuilt with another model).
    """

    def __init__(self, source: LoadedModel | Callable[[], LoadedModel]):
        self._source = source

    @property
    def loaded(self) -> LoadedModel:
        return self._source() if callable(self._source) else self._source

    @property
    def available(self) -> bool:
        """Whether the model can write captions."""
        from vlkit.inference.interface import is_generative

        return is_generative(self.loaded.model)

    def require(self) -> LoadedModel:
        """The model, or a :class:`QueryError` (400) when it cannot write captions."""
        loaded = self.loaded
        if not self.available:
            raise QueryError(f"the served model ({type(loaded.model).__name__}) cannot describe images: it has "
                             "no text decoder; serve a generative model (coca-*, captioner-*, blip-*, blip2-* at "
                             "stage 2)")
        return loaded

    def describe(self, data: bytes, n: int = 1) -> list[tuple[str, float]]:
        """``n`` captions of an encoded image with their scores (length-normalised log-probabilities), best
        first: beam search with ``max(n, DESCRIBE_BEAMS)`` beams.

        Raises:
            QueryError: the model cannot write captions, or the bytes are not a readable image.
        """
        import torch

        from vlkit.inference.captions import write_captions

        loaded = self.require()
        transform = loaded.model.preprocess.image_transform(train=False)
        try:
            pixels = transform.normalize(transform(data)[None])  # [1, 3, S, S]
        except (VlkitError, ImageDecodeError) as exc:
            raise QueryError(f"not a readable image: {exc}") from None
        with torch.no_grad():
            return write_captions(loaded.model, loaded.tokenizer, pixels, loaded.generation.prompt,
                                  **describe_settings(n, loaded.generation))[0]


def describe_settings(n: int, defaults=None) -> dict:
    """The decoding options of ``/api/describe`` for ``n`` captions: the model's own (its ``generation.json``)
    with at least ``max(n, DESCRIBE_BEAMS)`` beams and at most ``DESCRIBE_TOKENS`` tokens."""
    from vlkit.inference.defaults import GenerationDefaults

    settings = (defaults or GenerationDefaults()).settings()
    settings.update(num_beams=max(n, DESCRIBE_BEAMS, settings["num_beams"]), num_return_sequences=n,
                    max_new_tokens=min(DESCRIBE_TOKENS, settings["max_new_tokens"]))
    return settings
