r"""Proximal SGD with an l1 term: the baseline whose zeros fade as the learning rate decays."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from distrib_rda.optim.rda import (
    check_foreach,
    check_nonnegative,
    chunk_size,
    chunked,
    foreach_soft_threshold_,
    resolve_foreach,
    soft_threshold_,
)

__all__ = ["ProxSGD"]


class ProxSGD(torch.optim.SGD):
    r"""SGD with momentum followed by the l1 proximal step (soft threshold).

    .. math::
       \begin{aligned}
         &b_t = \mu b_{t-1} + g_t \quad (b_1 = g_1), \qquad
          v = w_t - \eta_t b_t, \\
         &w_{t+1} = S_{\eta_t\lambda}(v), \qquad
          S_\tau(u) = \operatorname{sign}(u)\max(|u| - \tau, 0)
       \end{aligned}

    The first line is :class:`torch.optim.SGD` (momentum :math:`\mu`, no dampening); the
    threshold is applied to groups with :math:`\lambda > 0` only. The learning rate
    :math:`\eta_t` is read from each group's ``"lr"`` at every step, so any
    ``torch.optim.lr_scheduler`` drives both the gradient step and the threshold.

    Args:
        params: parameters or parameter groups (e.g. :func:`~distrib_rda.optim.rda_param_groups`);
            ``lr``, ``momentum``, ``lambda_`` and ``foreach`` can be set per group.
        lr: learning rate :math:`\eta > 0` (a scheduler may later take it down to 0).
        momentum: :math:`\mu \in [0, 1)`.
        lambda_: l1 strength :math:`\lambda \ge 0`.
        foreach: multi-tensor path, as in :class:`torch.optim.SGD` (``None``: torch's choice).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        lambda_: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        _check(lr, momentum, lambda_, foreach)
        if lr <= 0:
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        super().__init__(params, lr=lr, momentum=momentum, foreach=foreach)
        self.defaults["lambda_"] = float(lambda_)
        for group in self.param_groups:
            group.setdefault("lambda_", float(lambda_))
            _check(group["lr"], group["momentum"], group["lambda_"], group["foreach"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # torch.optim.SGD's __init__ passes its own defaults only; lambda_ is filled in by ours.
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "lambda_" in group:
            _check(group["lr"], group["momentum"], group["lambda_"], group["foreach"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One SGD-momentum step, then ``w <- S_{lr*lambda}(w)`` on groups with lambda > 0."""
        for group in self.param_groups:
            _check(group["lr"], group["momentum"], group["lambda_"], group["foreach"])
        loss = super().step(closure)
        for group in self.param_groups:
            tau = float(group["lr"]) * float(group["lambda_"])
            params = [p for p in group["params"] if p.grad is not None]
            if tau <= 0 or not params:
                continue
            if resolve_foreach(group["foreach"], params):
                foreach_soft_threshold_(params, tau)
            else:
                chunk = chunk_size()
                for p in params:
                    for (pc,) in chunked([p], chunk):
                        soft_threshold_(pc, tau)
        return loss


def _check(lr: Any, momentum: Any, lambda_: Any, foreach: Any) -> None:
    if isinstance(lr, Tensor):
        lr = float(lr)
    check_nonnegative("lr", lr)
    if not check_nonnegative("momentum", momentum) < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    check_nonnegative("lambda_", lambda_)
    check_foreach(foreach)
