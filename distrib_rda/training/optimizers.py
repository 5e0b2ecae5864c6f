"""The optimizer, learning-rate schedule and pruner that a config asks for."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distrib_rda.config import TrainConfig
from distrib_rda.optim import (
    RDA,
    MagnitudePruner,
    ProxSGD,
    magnitude_masks,
    prunable_weights,
    rda_param_groups,
)

# Gradual magnitude pruning prunes from 10% to 60% of training, then trains the mask.
GMP_WINDOW = (0.1, 0.6)
GMP_PRUNINGS = 40


@dataclass
class OptimizerParts:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    pruner: MagnitudePruner | FixedMask | None = None

    def step(self) -> None:
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.pruner is not None:
            self.pruner.step()

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self._parts().items()}

    def load_state_dict(self, state: dict) -> None:
        for name, part in self._parts().items():
            part.load_state_dict(state[name])

    def _parts(self) -> dict:
        parts = {"optimizer": self.optimizer, "scheduler": self.scheduler, "pruner": self.pruner}
        return {name: part for name, part in parts.items() if part is not None}


class FixedMask:
    """Keeps every given weight that is zero now at zero: ``w <- w * m`` after each step, with
    ``m = (w != 0)`` taken at construction. Quacks like :class:`MagnitudePruner` for
    :class:`OptimizerParts`."""

    def __init__(self, weights: list[torch.Tensor]):
        self.weights = weights
        self.masks = [w.detach() != 0 for w in weights]

    @torch.no_grad()
    def step(self) -> None:
        for weight, mask in zip(self.weights, self.masks, strict=True):
            weight.mul_(mask)

    def state_dict(self) -> dict:
        return {"masks": [mask.clone() for mask in self.masks]}

    def load_state_dict(self, state: dict) -> None:
        for mask, saved in zip(self.masks, state["masks"], strict=True):
            mask.copy_(saved)


def build_finetune(cfg: TrainConfig, model: nn.Module, total_steps: int) -> OptimizerParts:
    r"""The closing fine-tune of ``finetune_epochs``: SGD with momentum on every parameter,
    cosine decay from ``lr`` over ``total_steps``, and the support of the conv and linear
    weights fixed to the one they have now:

    .. math::
        m = \mathbb{1}[w \ne 0], \qquad
        w \leftarrow m \odot \operatorname{SGD}(w), \qquad
        \eta_k = \tfrac{\eta}{2}\bigl(1 + \cos(\pi k / K)\bigr).

    Sparsity cannot change; accuracy is what the surviving weights can reach.

    **RDA to a target sparsity** (``optimizer: rda`` with ``target_sparsity`` :math:`s`): first
    the RDA iterate :math:`w = S_\tau(u)`, :math:`u = w_1 - G_t/\beta_t`, is cut to the support
    it would have at the raised threshold :math:`\tau' \ge \tau` that leaves
    :math:`\operatorname{round}(sN)` of the :math:`N` conv and linear weights at zero. As
    :math:`|w| = \max(|u| - \tau, 0)` ranks the weights as :math:`|u|` does, that support is the
    :math:`N - \operatorname{round}(sN)` largest :math:`|w|` over all layers together (the
    survivors keep their values, unshrunk by :math:`\tau' - \tau`). A weight that is already
    zero stays zero, so an iterate sparser than :math:`s` is left as it is, and building the
    fine-tune again on the cut model (a resume) cuts nothing more."""
    weights = [weight for _, weight in prunable_weights(model)]
    if cfg.optimizer == "rda" and cfg.target_sparsity is not None:
        with torch.no_grad():
            for weight, keep in zip(weights, magnitude_masks(weights, cfg.target_sparsity),
                                    strict=True):
                weight.mul_(keep)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return OptimizerParts(optimizer, scheduler, FixedMask(weights))


def build_optimizer(cfg: TrainConfig, model: nn.Module, total_steps: int) -> OptimizerParts:
    """RDA has its own step-size schedule; the SGD family gets cosine decay over the run."""
    if cfg.optimizer == "rda":
        return OptimizerParts(RDA(
            rda_param_groups(model, cfg.lambda_), gamma=cfg.gamma, adaptive=cfg.adaptive,
            eps=cfg.eps, center=cfg.center, warmup=cfg.warmup, power=cfg.power, fused=cfg.fused,
        ))
    if cfg.optimizer == "prox-sgd":
        optimizer = ProxSGD(rda_param_groups(model, cfg.lambda_), lr=cfg.lr,
                            momentum=cfg.momentum)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    pruner = None
    if cfg.optimizer == "gmp":
        start, end = (int(fraction * total_steps) for fraction in GMP_WINDOW)
        pruner = MagnitudePruner(
            [weight for _, weight in prunable_weights(model)],
            target_sparsity=cfg.target_sparsity, start_step=start, end_step=end,
            frequency=max(1, (end - start) // GMP_PRUNINGS),
        )
    return OptimizerParts(optimizer, scheduler, pruner)
