"""The Python API: the same distributed jobs as the command line, from a notebook or a script.

    import distrib_rda

    def my_cnn(in_channels, num_classes):
        ...  # any torch.nn.Module with conv or linear layers

    summary = distrib_rda.train({"epochs": 5, "target_sparsity": 0.95}, model=my_cnn)
    print(summary["accuracy"], summary["sparsity"])

``config`` is a :class:`~distrib_rda.config.TrainConfig`, a dict of the same flat keys as the
YAML files, or the path of such a file; keyword arguments override its keys. ``model`` is a
factory called on every worker with ``in_channels``, ``image_size`` and ``num_classes`` (those
it accepts); Ray ships it to the workers by value, so it may be defined in the notebook itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from distrib_rda.config import TrainConfig, as_config


def train(config: TrainConfig | dict[str, Any] | str | Path | None = None, *,
          model: Callable[..., Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Train one model with Ray Train, as ``distrib-rda train`` does, and return its summary:
    ``run_id``, ``accuracy``, ``sparsity``, ``nonzeros``, ``epochs``, ``seconds``,
    ``checkpoint``. Bad input raises :class:`~distrib_rda.errors.UserError` before any work."""
    from distrib_rda.models import spec_of
    from distrib_rda.training import run_training

    if model is not None:
        if not callable(model):
            from distrib_rda.models import ModelSpecError

            raise ModelSpecError(f"model must be a callable that returns an nn.Module, not "
                                 f"{type(model).__name__}; a spec string goes in the config")
        overrides["model"] = spec_of(model)
    return run_training(as_config(config, **overrides), model_factory=model)


def search(space: str | Path, *, trials: int | None = None, max_concurrent: int | None = None,
           resume: bool = False, **overrides: Any) -> dict[str, Any]:
    """Run a Ray Tune search over a ``tune/`` space file, as ``distrib-rda tune`` does;
    keyword arguments fix config keys for every trial. Returns the parent MLflow run id, the
    trial counts and the Pareto front's members."""
    from distrib_rda.search import run_search

    return run_search(space, trials=trials, max_concurrent=max_concurrent, resume=resume,
                      overrides=overrides)
