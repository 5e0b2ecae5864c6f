"""distrib-rda: distributed training of sparse CNNs with l1-regularized dual averaging.

``distrib_rda.train(config, model=...)`` and ``distrib_rda.search(space)`` run the same jobs as
the ``distrib-rda`` command (:mod:`distrib_rda.api`). Importing the package is cheap: torch,
Ray and MLflow are imported when a job starts.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["TrainConfig", "search", "train"]


def __getattr__(name: str) -> Any:
    if name in ("train", "search"):
        from distrib_rda import api

        return getattr(api, name)
    if name == "TrainConfig":
        from distrib_rda.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'distrib_rda' has no attribute {name!r}")
