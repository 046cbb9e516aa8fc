"""The VLMo family: a multiway transformer (shared self-attention, vision / language / vision-language
feed-forward experts) that is both a dual encoder and a fusion encoder, pre-trained in stages."""

from vlkit.models.vlmo import builders  # noqa: F401  (registers the named sizes)
from vlkit.models.vlmo.model import VLMo, VLMoConfig
from vlkit.models.vlmo.pretrain import VLMoOutput

__all__ = ["VLMo", "VLMoConfig", "VLMoOutput"]
