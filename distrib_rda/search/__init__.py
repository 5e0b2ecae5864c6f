"""Hyperparameter search with Ray Tune, and sparsity/accuracy Pareto fronts in MLflow.

Importing this package is cheap; Ray, Tune and MLflow are imported with the module that needs
them (:mod:`~distrib_rda.search.tune`, :mod:`~distrib_rda.search.report`).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"non_dominated": "pareto", "pareto_report": "report", "SearchSpec": "space",
          "load_space": "space", "run_search": "tune"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
