"""Local dual averaging: all-reduce the dual state every H steps instead of gradients every step.

With ``sync_every = H > 1`` each rank runs its steps under ``model.no_sync()``, adding its own
gradients to a local dual sum. Every H steps, one all-reduce averages the dual tensors. Since
``G`` was identical on every rank at the previous sync, the average is

    G ← G_sync + (1/R)·Σ_r ΔG_r,

the dual increments averaged in the dual, before thresholding, so sparsity survives (averaging
sparse primal weights would merge their supports). The optimizer then re-projects, so every rank
resumes from the same weights (after FedDualAvg, Yuan et al. 2021).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class LocalDualAveraging:
    """Counts steps and averages ``optimizer.dual_state_tensors()`` across ranks every ``every``."""

    def __init__(self, optimizer: torch.optim.Optimizer, every: int):
        self.optimizer = optimizer
        self.every = every
        self.steps_since_sync = 0
        self.all_reduces = 0

    @property
    def local(self) -> bool:
        """Whether steps skip DDP's gradient all-reduce."""
        return self.every > 1

    def after_step(self, force: bool = False) -> None:
        """Call after ``optimizer.step()``; syncs when H steps have passed, or when forced."""
        if not self.local:
            return
        self.steps_since_sync += 1
        if self.steps_since_sync >= self.every or (force and self.steps_since_sync > 0):
            self.sync()

    def sync(self) -> None:
        tensors = self.optimizer.dual_state_tensors()
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = _flatten_dense_tensors(tensors)
            dist.all_reduce(flat, op=dist.ReduceOp.AVG if flat.is_cuda else dist.ReduceOp.SUM)
            if not flat.is_cuda:  # gloo has no AVG
                flat.div_(dist.get_world_size())
            averaged = _unflatten_dense_tensors(flat, tensors)
            torch._foreach_copy_(tensors, list(averaged))
            self.all_reduces += 1
        self.optimizer.project()
        self.steps_since_sync = 0
