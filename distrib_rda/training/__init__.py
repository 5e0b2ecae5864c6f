"""Distributed training on Ray Train: the worker loop, the driver and the dual-state sync.

``build_trainer`` and ``run_training`` are imported from the driver when first asked for: the
Train workers import :mod:`distrib_rda.training.loop` through this package, and need none of
the driver's imports.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_trainer", "run_training"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from distrib_rda.training import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'distrib_rda.training' has no attribute {name!r}")
