"""The preprocessing a model expects; saved with it so the two always travel together."""

from __future__ import annotations

from dataclasses import dataclass

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Preprocess:
    """Image size and normalisation, and the tokenizer and context length of the text side.

    Attributes:
        image_size: side of the square input images.
        mean: per-channel mean on the [0, 1] scale.
        std: per-channel standard deviation on the [0, 1] scale.
        context_length: maximum tokens per text.
        tokenizer: a ``tokenizer.json`` path or a Hugging Face model directory, or None when the tokenizer is
            saved beside the model (``tokenizer.json`` in its directory).
    """

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    context_length: int = 77
    tokenizer: str | None = None

    def image_transform(self, train: bool = False, **kwargs):
        """The matching :class:`~vlkit.data.transforms.ImageTransform`."""
        from vlkit.data.transforms import ImageTransform

        return ImageTransform(self.image_size, train=train, mean=tuple(self.mean), std=tuple(self.std), **kwargs)
