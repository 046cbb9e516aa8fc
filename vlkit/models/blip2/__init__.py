"""The BLIP-2 family: a frozen image encoder, a Querying Transformer trained with ITC, ITM and image-grounded
generation (stage 1), and a frozen language model conditioned on the queries (stage 2)."""

from vlkit.models.blip2 import builders  # noqa: F401  (registers the named sizes)
from vlkit.models.blip2.config import BLIP2CaptionOutput, BLIP2Config, BLIP2Output
from vlkit.models.blip2.model import BLIP2

__all__ = ["BLIP2", "BLIP2CaptionOutput", "BLIP2Config", "BLIP2Output"]
