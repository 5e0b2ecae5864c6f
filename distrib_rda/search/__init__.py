"""Hyperparameter search with Ray Tune, and sparsity/accuracy Pareto fronts in MLflow."""

from distrib_rda.search.pareto import non_dominated
from distrib_rda.search.report import pareto_report
from distrib_rda.search.space import SearchSpec, load_space
from distrib_rda.search.tune import run_search

__all__ = ["SearchSpec", "load_space", "non_dominated", "pareto_report", "run_search"]
