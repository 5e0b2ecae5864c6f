"""The driver: starts or joins Ray and runs the TorchTrainer inside the run's MLflow lifecycle
(:class:`distrib_rda.tracking.TrackedRun`)."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from distrib_rda import tracking
from distrib_rda.config import TrainConfig
from distrib_rda.data import ensure_converted
from distrib_rda.errors import UserError
from distrib_rda.tracking import TrainingError
from distrib_rda.training.loop import MODEL_FACTORY, train_loop_per_worker

CONFIG_FILE = "distrib_rda_config.json"
WORKER_ENV = {
    # Ray Train routes workers' print() through a logger that echoes each line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # The Train controller logs to MLflow; when the store is down it must fail fast and retry
    # at the next report, not block the run in MLflow's minutes-long HTTP retries.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# Keys that may change when a job is resumed; any other change is refused. A finished run
# rerun with --register NAME is registered without training again.
RESUMABLE_KEYS = {"max_failures", "address", "checkpoint_every", "loader_workers", "register"}
__all__ = ["TrainingError", "build_trainer", "run_training"]


def connect(address: str | None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray instance."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable_address(address)
    try:
        ray.init(address=address, runtime_env={"env_vars": WORKER_ENV})
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise UserError(f"--address {address}: cannot connect to a Ray cluster "
                        f"({str(error).splitlines()[0][:200]})") from None


def check_reachable_address(address: str, timeout: float = 5.0) -> None:
    """Ray retries an unreachable GCS for many minutes; a plain TCP probe answers in seconds."""
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" or a name Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise UserError(f"--address {address}: no Ray cluster answers there ({error}); start "
                        "one with `ray start --head` or cluster/local.sh, or leave out "
                        "--address to run on a local instance") from None


def check_resources(cfg: TrainConfig) -> None:
    """Refuse, instead of waiting forever, when the cluster cannot place the workers."""
    resources = ray.cluster_resources()
    kind, have = ("GPU", resources.get("GPU", 0)) if cfg.gpu else ("CPU", resources.get("CPU", 0))
    if cfg.workers > have:
        raise UserError(f"--workers {cfg.workers}: the Ray cluster has {have:g} {kind}s, "
                        f"and each worker needs one; use --workers {int(have)} or fewer")


def run_directory(cfg: TrainConfig) -> tuple[Path, str]:
    storage = Path(cfg.storage).expanduser().resolve()
    model = re.sub(r"[^A-Za-z0-9_.+-]+", "-", cfg.model.rpartition(":")[2])  # a plain name
    name = cfg.name or f"{model}-{cfg.optimizer}-{datetime.now():%Y%m%d-%H%M%S}"
    return storage, name


def check_model(cfg: TrainConfig, beton_dir: Path,
                factory: Callable[..., Any] | None = None) -> None:
    """Build the model once, on the CPU, before Ray starts: a spec that cannot be imported,
    a factory that raises or returns no ``nn.Module``, or a model without conv and linear
    weights is refused here, naming the spec (:class:`~distrib_rda.models.ModelSpecError`)."""
    from distrib_rda.data import DatasetMeta
    from distrib_rda.models import build_model

    build_model(factory or cfg.model, **DatasetMeta.load(beton_dir).model_args)


def ship_by_value(factory: Callable[..., Any]) -> None:
    """Let Ray send a user's model factory to the workers as code, not as a name to import:
    a notebook's or a script's module is not importable on the workers."""
    from ray import cloudpickle

    module = sys.modules.get(getattr(factory, "__module__", "") or "")
    location = getattr(module, "__file__", None) or ""
    if module is not None and module.__name__ != "__main__" and "site-packages" not in location:
        cloudpickle.register_pickle_by_value(module)


def check_resume(cfg: TrainConfig, directory: Path) -> None:
    """A job re-run under the same name must have the same config, bar RESUMABLE_KEYS."""
    saved_file = directory / CONFIG_FILE
    current = cfg.to_dict()
    if saved_file.exists():
        saved = json.loads(saved_file.read_text())
        changed = sorted(key for key in current
                         if key not in RESUMABLE_KEYS and saved.get(key) != current[key])
        if changed:
            details = ", ".join(f"{key}: {saved.get(key)!r} -> {current[key]!r}"
                                for key in changed)
            raise UserError(f"--name {directory.name}: resuming with a different config "
                            f"({details}); pick a new --name to start a new run")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        saved_file.write_text(json.dumps(current, indent=2))


def build_trainer(cfg: TrainConfig, *, callbacks=(), storage_path: Path | str | None = None,
                  name: str | None = None,
                  model_factory: Callable[..., Any] | None = None) -> TorchTrainer:
    """A TorchTrainer whose workers train ``cfg`` (with ``model_factory`` in place of the
    model spec, when a Python caller gave one); ``callbacks`` run on its controller (the
    tracked run's, which logs the epochs to MLflow, among them)."""
    storage, default_name = run_directory(cfg)
    loop_config: dict[str, Any] = cfg.to_dict()
    if model_factory is not None:
        ship_by_value(model_factory)
        loop_config[MODEL_FACTORY] = model_factory
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                     resources_per_worker={"GPU": 1} if cfg.gpu else {"CPU": 1}),
        run_config=RunConfig(
            name=name or default_name,
            storage_path=str(storage_path or storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
        ),
    )


def run_training(cfg: TrainConfig, json_output: bool = False,
                 model_factory: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Train ``cfg`` on Ray Train, record it in MLflow, and print a summary. A Python caller
    may give its own ``model_factory`` (``cfg.model`` then names it)."""
    # Where the records go is settled first: a Ray job without a usable place is refused here.
    cfg = tracking.resolve_locations(cfg)
    # Converting here checks the source before Ray starts, with progress in this terminal;
    # workers on other nodes convert into their own node's cache.
    beton_dir = ensure_converted(cfg.dataset, data_root=cfg.data_root, download=cfg.download,
                                 cache_dir=cfg.cache_dir)
    check_model(cfg, beton_dir, model_factory)
    tracking.check_reachable(cfg.tracking_uri)
    storage, name = run_directory(cfg)
    cfg = cfg.replace(name=name)
    directory = storage / name
    check_resume(cfg, directory)
    connect(cfg.address)
    check_resources(cfg)
    run = tracking.TrackedRun.start(cfg, run_key=str(directory), run_name=name,
                                    beton_dir=beton_dir, model_factory=model_factory)

    started = time.time()
    result = run.fit(build_trainer(cfg, callbacks=[run.callback()], model_factory=model_factory),
                     then=f"the last good checkpoint is kept in {directory}, rerun the same "
                          "command to resume")
    summary, _ = run.finish(result.checkpoint, started=started,
                            register=getattr(cfg, "register", None))
    tracking.print_summary(cfg, summary)
    if json_output:
        print(json.dumps({key: summary[key] for key in
                          ("run_id", "accuracy", "sparsity", "nonzeros", "epochs", "seconds")}))
    return summary
