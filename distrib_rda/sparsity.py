"""Sparsity, measured: exact zeros among the weights of convolution and linear layers.

Every function takes the unwrapped model (``ddp.module``), and counts the tensors as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from distrib_rda.optim.groups import prunable_weights

__all__ = ["layer_sparsity", "nonzeros", "num_prunable", "sparsity"]


def num_prunable(model: nn.Module) -> int:
    """Number of conv and linear weight elements."""
    return sum(w.numel() for _, w in prunable_weights(model))


@torch.no_grad()
def nonzeros(model: nn.Module) -> int:
    """Number of non-zero conv and linear weight elements."""
    return sum(int(torch.count_nonzero(w)) for _, w in prunable_weights(model))


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros among all conv and linear weights (0.0 if there are none)."""
    total = num_prunable(model)
    return 1.0 - nonzeros(model) / total if total else 0.0


@torch.no_grad()
def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros of each conv and linear weight, keyed by module name."""
    return {
        name: 1.0 - int(torch.count_nonzero(w)) / w.numel() if w.numel() else 0.0
        for name, w in prunable_weights(model)
    }
