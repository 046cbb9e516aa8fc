"""Losses: each a pure function plus a thin module, with typed outputs."""

from vlkit.modules.losses.contrastive import (
    ContrastiveLoss,
    ContrastiveOutput,
    LearnableLogitScale,
    contrastive_loss,
)
from vlkit.modules.losses.distributed import (
    DistributedContrastiveLoss,
    distributed_contrastive_loss,
    gather_no_grad,
    gather_with_grad,
)
from vlkit.modules.losses.momentum import (
    FeatureQueue,
    MomentumContrastiveLoss,
    MomentumContrastiveOutput,
    make_momentum_copy,
    momentum_update,
    queue_contrastive_loss,
)
from vlkit.modules.losses.siglip import SiglipLoss, SiglipOutput, siglip_loss

__all__ = [
    "ContrastiveLoss",
    "ContrastiveOutput",
    "DistributedContrastiveLoss",
    "FeatureQueue",
    "LearnableLogitScale",
    "MomentumContrastiveLoss",
    "MomentumContrastiveOutput",
    "SiglipLoss",
    "SiglipOutput",
    "contrastive_loss",
    "distributed_contrastive_loss",
    "gather_no_grad",
    "gather_with_grad",
    "make_momentum_copy",
    "momentum_update",
    "queue_contrastive_loss",
    "siglip_loss",
]
