"""VLMo's staged pre-training losses.

- ``image`` (stage 1, image-only passes): masked image modelling. VLMo (after BEiT) predicts the discrete
  visual tokens of a pretrained tokenizer at the masked patches; here the target is instead each masked patch's
  own pixels, normalised by the patch's mean and variance (MAE's target), regressed with a mean squared error.
  A fraction ``mim_ratio`` of the patches of each image is replaced by a learned mask embedding.
- ``text`` (stage 2, text-only passes): masked language modelling with the language expert, the shared
  self-attention and the vision side frozen (:meth:`VLMo.apply_stage`).
- ``image_text`` (stage 3): image-text contrastive learning between the image-only class token and the
  text-only [CLS] token (in-batch negatives); image-text matching in the fusion pass on the positives and on
  hard negatives drawn from the contrastive similarities (a text for each image and an image for each text);
  masked language modelling in the fusion pass. Without ``group_ids``, pairs whose captions are the same text
  form a group: a caption word for word the image's own is a positive in ITC and never drawn as an ITM
  negative (datasets with generic captions, "two coloured shapes", would otherwise teach ITM contradictions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vlkit.modules.fusion.itm import hard_negatives, itm_loss
from vlkit.modules.fusion.mlm import IGNORE_INDEX, mask_tokens, mlm_loss
from vlkit.modules.losses.contrastive import contrastive_loss

STAGES = ("image", "text", "image_text")


@dataclass
class VLMoOutput:
    """The losses of a batch; the fields of other stages are None.

    Attributes:
        loss: the sum of the stage's losses.
        itc: image-text contrastive loss (stage ``image_text``).
        itm: image-text matching loss over the positives and the mined hard negatives (``image_text``).
        mlm: masked language modelling loss (``text``: text-only pass; ``image_text``: fusion pass).
        mim: masked image modelling loss, MSE of the normalised pixels of masked patches (``image``).
        itm_accuracy: ITM accuracy over positives and negatives (no gradient).
        mlm_accuracy: accuracy of the masked-token predictions (no gradient).
    """

    loss: Tensor
    itc: Tensor | None = None
    itm: Tensor | None = None
    mlm: Tensor | None = None
    mim: Tensor | None = None
    itm_accuracy: Tensor | None = None
    mlm_accuracy: Tensor | None = None


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``[batch, C, H, W]`` -> ``[batch, N, patch_size * patch_size * C]``, patches in the order of
    :class:`vlkit.modules.layers.patch_embed.PatchEmbed` (row by row), pixels row by row, channels last."""
    b, c, h, w = images.shape
    p = patch_size
    x = images[:, :, : h // p * p, : w // p * p].reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def random_patch_mask(batch: int, patches: int, ratio: float, generator: torch.Generator | None = None,
                      device: torch.device | None = None) -> Tensor:
    """``[batch, patches]`` bool with exactly ``max(1, round(ratio * patches))`` True per row, placed at random."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mim_ratio must be in (0, 1), got {ratio}")
    count = max(1, round(ratio * patches))
    order = torch.rand(batch, patches, generator=generator, device=device).argsort(dim=1)
    return order < count  # ranks below count


def mim_loss(predicted: Tensor, images: Tensor, patch_mask: Tensor, patch_size: int) -> Tensor:
    """Mean squared error between ``predicted`` ``[batch, N, p*p*3]`` and the per-patch normalised pixels of
    ``images``, over the masked patches (``patch_mask`` ``[batch, N]``)."""
    target = patchify(images.float(), patch_size)  # [batch, N, p*p*3]
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()
    error = (predicted.float() - target).pow(2).mean(dim=-1)  # [batch, N]
    return (error * patch_mask).sum() / patch_mask.sum().clamp(min=1)


def text_groups(input_ids: Tensor, mask: Tensor) -> Tensor:
    """``[batch]`` group ids under which rows with the same text (same tokens where the mask is set) share a
    group: a caption that is word for word the image's own is a positive, never a negative."""
    keyed = torch.where(mask.bool(), input_ids, -1)  # padding never tells two texts apart
    return torch.unique(keyed, dim=0, return_inverse=True)[1]


def _word_weight(model) -> Tensor | None:
    return model.text_embed.word_embed.weight if model.config.tie_word_embeddings else None


def image_stage(model, images: Tensor, generator: torch.Generator | None) -> VLMoOutput:
    """Stage ``image``: masked image modelling in image-only passes."""
    c = model.config
    grid = model.patch_embed.grid(images.shape[-2], images.shape[-1])
    patch_mask = random_patch_mask(images.shape[0], grid[0] * grid[1], c.mim_ratio, generator, images.device)
    tokens = model.image_features(images, patch_mask)  # [batch, 1 + N, width]
    loss = mim_loss(model.mim_head(tokens[:, 1:]), images, patch_mask, c.patch_size)
    return VLMoOutput(loss=loss, mim=loss)


def text_stage(model, input_ids: Tensor, mask: Tensor, mask_token_id: int, generator: torch.Generator | None,
               word_ids: Tensor | None) -> VLMoOutput:
    """Stage ``text``: masked language modelling in text-only passes."""
    c = model.config
    masked = mask_tokens(input_ids, mask, word_ids, mask_token_id, c.vocab_size, c.mlm_prob, generator,
                         c.special_token_ids)
    tokens = model.text_features(masked.input_ids, mask)  # [batch, L, width]
    predicted = masked.labels != IGNORE_INDEX
    mlm = mlm_loss(model.mlm_head(tokens[predicted], _word_weight(model)), masked.labels[predicted])
    return VLMoOutput(loss=mlm.loss, mlm=mlm.loss, mlm_accuracy=mlm.accuracy)


def image_text_stage(model, images: Tensor, input_ids: Tensor, mask: Tensor, group_ids: Tensor | None,
                     mask_token_id: int, generator: torch.Generator | None, word_ids: Tensor | None) -> VLMoOutput:
    """Stage ``image_text``: ITC + ITM (hard negatives) + MLM; see the module docstring."""
    c = model.config
    batch, length = input_ids.shape
    if group_ids is None:  # identical captions of different images are positives of each other
        group_ids = text_groups(input_ids, mask)
        group_ids = None if bool((group_ids == group_ids[0]).all()) else group_ids  # one text: nothing to draw
    image_embeds = model.embed_image(images)  # [batch, 1 + N, width]
    image_feat = F.normalize(model.vision_proj(
        model.encode_tokens(image_embeds, [("image", image_embeds.shape[1])])[:, 0]), dim=-1)  # [batch, embed_dim]
    text_feat = F.normalize(model.text_proj(model.text_features(input_ids, mask)[:, 0]), dim=-1)
    itc = contrastive_loss(image_feat, text_feat, model.scale(), group_ids)
    neg = hard_negatives(itc.logits_per_image, itc.logits_per_image.T, group_ids, generator)
    masked = mask_tokens(input_ids, mask, word_ids, mask_token_id, c.vocab_size, c.mlm_prob, generator,
                         c.special_token_ids)
    # one fusion pass over [positives; image + hard negative text; hard negative image + text; masked text]
    fused = model.fuse_embedded(
        torch.cat([image_embeds, image_embeds, image_embeds[neg.image_index], image_embeds]),
        torch.cat([input_ids, input_ids[neg.text_index], input_ids, masked.input_ids]),
        torch.cat([mask, mask[neg.text_index], mask, mask]))  # [4 * batch, L + 1 + N, width]
    cls = model.itm_head(model.pooler(fused[: 3 * batch, 0]))  # [3 * batch, 2]
    itm = itm_loss(cls[:batch], cls[batch:])
    predicted = masked.labels != IGNORE_INDEX  # [batch, L]
    logits = model.mlm_head(fused[3 * batch:, :length][predicted], _word_weight(model))  # [M, vocab]
    mlm = mlm_loss(logits, masked.labels[predicted])
    return VLMoOutput(loss=itc.loss + itm.loss + mlm.loss, itc=itc.loss, itm=itm.loss, mlm=mlm.loss,
                      itm_accuracy=itm.accuracy, mlm_accuracy=mlm.accuracy)


def pretrain_losses(model, images: Tensor, input_ids: Tensor, mask: Tensor, group_ids: Tensor | None = None,
                    mask_token_id: int | None = None, generator: torch.Generator | None = None,
                    word_ids: Tensor | None = None) -> VLMoOutput:
    """The losses of ``model.config.stage`` on a batch.

    Args:
        model: a :class:`vlkit.models.vlmo.VLMo`.
        images: ``[batch, 3, H, W]`` (unused by stage ``text``).
        input_ids: ``[batch, L]``; row ``i`` describes image ``i`` (unused by stage ``image``).
        mask: ``[batch, L]`` attention mask.
        group_ids: ``[batch]``: pairs of one group are positives of each other in ITC and never drawn as ITM
            negatives of each other.
        mask_token_id: overrides ``config.mask_token_id``.
        generator: random generator for the masking and the negatives.
        word_ids: word of each token for whole-word masking (None: each token is a word).

    Returns:
        :class:`VLMoOutput`.
    """
    c = model.config
    mask_id = c.mask_token_id if mask_token_id is None else mask_token_id
    if c.stage == "image":
        return image_stage(model, images, generator)
    if c.stage == "text":
        return text_stage(model, input_ids, mask, mask_id, generator, word_ids)
    return image_text_stage(model, images, input_ids, mask, group_ids, mask_id, generator, word_ids)
