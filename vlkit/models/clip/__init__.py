"""The CLIP family: model, named sizes, and converters for OpenAI, open_clip and Hugging Face weights."""

from vlkit.models.clip import builders  # noqa: F401  (registers the named sizes)
from vlkit.models.clip.model import CLIP, CLIPConfig

__all__ = ["CLIP", "CLIPConfig"]
