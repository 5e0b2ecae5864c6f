"""What a training step drives: an optimizer, its learning-rate schedule, and a mask keeper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Pruner(Protocol):
    """Called after every optimizer step (e.g. :class:`~distrib_rda.optim.MagnitudePruner`)."""

    def step(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class OptimizerParts:
    """One step is ``optimizer.step()``, then ``scheduler.step()``, then ``pruner.step()``;
    the state of all three round-trips as one dict."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    pruner: Pruner | None = None

    def step(self) -> None:
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.pruner is not None:
            self.pruner.step()

    def settle(self) -> None:
        """At the end of an epoch, an optimizer that can :meth:`~distrib_rda.optim.RDA.project`
        does: an RDA target group reselects its threshold, so the epoch ends with exactly its
        scheduled number of zeros."""
        project = getattr(self.optimizer, "project", None)
        if project is not None:
            project()

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self._parts().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self._parts().items():
            part.load_state_dict(state[name])

    def _parts(self) -> dict[str, Any]:
        parts = {"optimizer": self.optimizer, "scheduler": self.scheduler, "pruner": self.pruner}
        return {name: part for name, part in parts.items() if part is not None}


class FixedMask:
    """Keeps every given weight that is zero now at zero: ``w <- w * m`` after each step, with
    ``m = (w != 0)`` taken at construction."""

    def __init__(self, weights: list[torch.Tensor]):
        self.weights = weights
        self.masks = [w.detach() != 0 for w in weights]

    @torch.no_grad()
    def step(self) -> None:
        torch._foreach_mul_(self.weights, self.masks)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": [mask.clone() for mask in self.masks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for mask, saved in zip(self.masks, state["masks"], strict=True):
            mask.copy_(saved)
