"""Which parameters the l1 term applies to: the weights of convolution and linear layers."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["PRUNABLE_MODULES", "prunable_weights", "rda_param_groups"]

PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(module name, weight)`` of every Conv*d and Linear module, in module order.

    A weight shared by several modules is listed once, under its first module's name."""
    seen: set[int] = set()
    out: list[tuple[str, nn.Parameter]] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, PRUNABLE_MODULES) and isinstance(weight, nn.Parameter):
            if id(weight) not in seen:
                seen.add(id(weight))
                out.append((name, weight))
    return out


def rda_param_groups(model: nn.Module, lambda_: float) -> list[dict[str, Any]]:
    """Two parameter groups: the prunable weights with ``lambda_``, everything else
    (biases, normalization parameters) with ``lambda_ = 0``.

    Works for :class:`~distrib_rda.optim.RDA` and :class:`~distrib_rda.optim.ProxSGD`."""
    if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) or not lambda_ >= 0:
        raise ValueError(f"lambda_ must be a number >= 0, got {lambda_!r}")
    weights = [p for _, p in prunable_weights(model)]
    ids = {id(p) for p in weights}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [
        {"params": weights, "lambda_": float(lambda_)},
        {"params": rest, "lambda_": 0.0},
    ]
