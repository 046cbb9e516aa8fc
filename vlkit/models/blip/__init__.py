"""The BLIP family: one text transformer in three modes (unimodal encoder, image-grounded encoder,
image-grounded decoder) trained with ITC, ITM and captioning."""

from vlkit.models.blip import builders  # noqa: F401  (registers the named sizes)
from vlkit.models.blip.model import BLIP, BLIPConfig, BLIPOutput

__all__ = ["BLIP", "BLIPConfig", "BLIPOutput"]
