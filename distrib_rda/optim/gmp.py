r"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"), global magnitude.

The target sparsity follows the cubic schedule

.. math::
    s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{n\Delta t}\right)^3,
    \qquad t_0 \le t \le t_0 + n\Delta t,

with :math:`s_t = 0` before :math:`t_0` (``start_step``) and :math:`s_t = s_f` from
:math:`t_0 + n\Delta t` (``end_step``) on. Every :math:`\Delta t` (``frequency``) steps from
:math:`t_0`, and at ``end_step``, the masks are recomputed: of all the given weights together,
the :math:`\operatorname{round}(s_t N)` of smallest magnitude are masked. A masked weight stays
masked (the masks are nested). The masks are applied after every optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from distrib_rda.optim.schedule import cubic_sparsity

__all__ = ["MagnitudePruner", "magnitude_masks"]


class MagnitudePruner:
    """Masks the given weights following the cubic schedule; call :meth:`step` after each
    ``optimizer.step()``.

    Args:
        weights: the parameters to prune, e.g. ``[p for _, p in prunable_weights(model)]``
            (``(name, parameter)`` pairs are accepted too).
        target_sparsity: :math:`s_f \\in [0, 1)`, the fraction of zeros reached at ``end_step``.
        start_step: :math:`t_0 \\ge 0`, the optimizer step of the first pruning.
        end_step: the step of the last pruning, ``>= start_step`` (equal: prune once, to
            :math:`s_f`).
        frequency: :math:`\\Delta t \\ge 1`, steps between prunings.
        initial_sparsity: :math:`s_i \\in [0, s_f]`, the sparsity of the first pruning.

    ``step()`` counts optimizer steps: the k-th call is step k (a pruning scheduled at step 0
    happens at the first call). The state (step count and masks) round-trips through
    :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(
        self,
        weights: Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]],
        target_sparsity: float,
        start_step: int,
        end_step: int,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
    ) -> None:
        self.weights: list[Tensor] = [w[1] if isinstance(w, tuple) else w for w in weights]
        if not self.weights:
            raise ValueError("weights must hold at least one parameter to prune, got none")
        if not all(isinstance(w, Tensor) for w in self.weights):
            raise ValueError("weights must be tensors or (name, tensor) pairs")
        _check_fraction("target_sparsity", target_sparsity, upper=1.0)
        _check_fraction("initial_sparsity", initial_sparsity, upper=target_sparsity, closed=True)
        _check_int("start_step", start_step, 0)
        _check_int("end_step", end_step, start_step)
        _check_int("frequency", frequency, 1)
        self.target_sparsity = float(target_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.start_step = int(start_step)
        self.end_step = int(end_step)
        self.frequency = int(frequency)
        self.num_weights = sum(w.numel() for w in self.weights)
        self.step_count = 0
        self.masks: list[Tensor] = [torch.ones_like(w, dtype=torch.bool) for w in self.weights]

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity :math:`s_t` at optimizer step ``step``."""
        return cubic_sparsity(step, self.start_step, self.end_step, self.target_sparsity,
                              self.initial_sparsity)

    def is_pruning_step(self, step: int) -> bool:
        """Whether the masks are recomputed at ``step``."""
        if step < self.start_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.frequency == 0

    @torch.no_grad()
    def step(self) -> None:
        """Count one optimizer step; recompute the masks on pruning steps; apply them."""
        self.step_count += 1
        t = self.step_count
        # A pruning scheduled at step 0 (before any optimizer step) happens at the first call.
        if self.is_pruning_step(t) or (t == 1 and self.is_pruning_step(0)):
            self._prune(self.sparsity_at(t))
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the masked weights, in place."""
        for w, m in zip(self.weights, self.masks, strict=True):
            w.mul_(m)

    def _prune(self, sparsity: float) -> None:
        self.masks = magnitude_masks(self.weights, sparsity, self.masks)

    def sparsity(self) -> float:
        """Fraction of the pruned weights that are masked now."""
        return 1.0 - sum(int(m.sum()) for m in self.masks) / self.num_weights

    def state_dict(self) -> dict[str, Any]:
        """Step count, masks and schedule; loadable with ``torch.load(weights_only=True)``."""
        return {
            "step": self.step_count,
            "masks": [m.clone() for m in self.masks],
            "schedule": self._schedule(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the schedule and weight shapes must match this pruner's."""
        if state.get("schedule") != self._schedule():
            raise ValueError(
                f"pruner state has schedule {state.get('schedule')!r}, but this pruner has "
                f"{self._schedule()!r}"
            )
        masks = state["masks"]
        shapes = [tuple(w.shape) for w in self.weights]
        if [tuple(m.shape) for m in masks] != shapes:
            raise ValueError(
                f"pruner state has masks of shapes {[tuple(m.shape) for m in masks]}, "
                f"but the weights have shapes {shapes}"
            )
        self.step_count = int(state["step"])
        self.masks = [
            m.to(device=w.device, dtype=torch.bool).clone()
            for m, w in zip(masks, self.weights, strict=True)
        ]

    def _schedule(self) -> dict[str, float | int]:
        return {
            "target_sparsity": self.target_sparsity,
            "initial_sparsity": self.initial_sparsity,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "frequency": self.frequency,
        }


def magnitude_masks(
    weights: list[Tensor], sparsity: float, masks: list[Tensor] | None = None
) -> list[Tensor]:
    r"""Global magnitude selection: boolean masks over ``weights`` (``True``: kept) that mask
    exactly :math:`k = \operatorname{round}(sN)` of the :math:`N` weights together, those of
    smallest :math:`|w|`. Weights already masked in ``masks`` are masked first, so the new masks
    are nested in the old ones. Ties at the threshold are masked in order until :math:`k` are.
    """
    if masks is None:
        masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    k = round(sparsity * sum(w.numel() for w in weights))
    if k <= 0:
        return masks
    # Masked weights score -1, below every kept one: they are pruned first (nested masks).
    scores = torch.cat(
        [
            torch.where(m, w.detach().abs(), -1.0).flatten().float()
            for w, m in zip(weights, masks, strict=True)
        ]
    )
    threshold = scores.kthvalue(k).values
    keep = scores > threshold
    tied = (scores == threshold).nonzero().flatten()
    n_tied_pruned = k - int((scores < threshold).sum())
    keep[tied[n_tied_pruned:]] = True
    out, offset = [], 0
    for w in weights:
        out.append(keep[offset : offset + w.numel()].view_as(w).to(w.device))
        offset += w.numel()
    return out


def _check_fraction(name: str, value: Any, *, upper: float, closed: bool = False) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and 0 <= value
        and (value <= upper if closed else value < upper)
    )
    if not ok:
        bound = f"<= {upper}" if closed else f"< {upper}"
        raise ValueError(f"{name} must be a number >= 0 and {bound}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
