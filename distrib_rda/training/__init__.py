"""Distributed training on Ray Train: the worker loop, the driver and the dual-state sync."""

from distrib_rda.training.driver import build_trainer, run_training

__all__ = ["build_trainer", "run_training"]
