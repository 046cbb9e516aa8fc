"""Multi-scale patch pooling (MSPP) as in BriVL: region features pooled from a CNN feature map."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiScalePatchPooling(nn.Module):
    """Pools a feature map over the whole image and over grids of regions at several scales.

    With the default scales ``(1, 6)`` a map gives 1 + 6*6 = 37 region features: the whole image first, then
    the 6x6 grid row by row. Regions are average- (or max-) pooled over the map cells they cover, so any map
    size works (cells are shared between neighbouring regions when the map is smaller than the grid).

    Args:
        scales: grid sides, one per scale.
        mode: ``avg`` or ``max``.
    """

    def __init__(self, scales: Sequence[int] = (1, 6), mode: str = "avg"):
        super().__init__()
        if not scales or any(s < 1 for s in scales):
            raise ValueError(f"scales must be positive grid sides, got {scales}")
        if mode not in ("avg", "max"):
            raise ValueError(f"mode must be avg or max, got {mode}")
        self.scales, self.mode = tuple(scales), mode

    @property
    def num_regions(self) -> int:
        return sum(s * s for s in self.scales)

    def forward(self, feature_map: Tensor) -> Tensor:
        """``[batch, C, H, W]`` -> ``[batch, num_regions, C]``."""
        pool = F.adaptive_avg_pool2d if self.mode == "avg" else F.adaptive_max_pool2d
        regions = [pool(feature_map, s).flatten(2) for s in self.scales]  # each [batch, C, s*s]
        return torch.cat(regions, dim=2).transpose(1, 2)
