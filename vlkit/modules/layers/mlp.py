"""The transformer feed-forward block and activations."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation the original CLIP weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    """An activation module by name: ``gelu``, ``gelu_tanh``, ``quick_gelu``, ``relu``, ``silu``."""
    table = {
        "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "quick_gelu": QuickGELU,
        "relu": nn.ReLU,
        "silu": nn.SiLU,
    }
    if name not in table:
        raise ValueError(f"unknown activation '{name}'; choose one of {sorted(table)}")
    return table[name]()


class MLP(nn.Module):
    """Linear -> activation -> dropout -> Linear.

    Args:
        dim: input and output width.
        hidden_dim: inner width.
        act: activation name (see :func:`activation`).
        dropout: dropout after the activation.
        out_dim: output width (default ``dim``).
        bias: biases on both linear layers.
    """

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", dropout: float = 0.0, out_dim: int | None = None,
                 bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = activation(act)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))
