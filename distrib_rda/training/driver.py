"""The driver: starts or joins Ray, runs the TorchTrainer, and closes the MLflow run."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from distrib_rda import tracking
from distrib_rda.config import TrainConfig
from distrib_rda.data import ensure_converted
from distrib_rda.errors import UserError
from distrib_rda.training import checkpoint
from distrib_rda.training.loop import train_loop_per_worker

CONFIG_FILE = "distrib_rda_config.json"
WORKER_ENV = {
    # Ray Train routes workers' print() through a logger that echoes each line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # The Train controller logs to MLflow; when the store is down it must fail fast and retry
    # at the next report, not block the run in MLflow's minutes-long HTTP retries.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# Keys that may change when a job is resumed; any other change is refused.
RESUMABLE_KEYS = {"max_failures", "address", "checkpoint_every", "loader_workers"}


class TrainingError(UserError):
    """The run failed; the message gives the cause."""


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
    name = cfg.name or f"{cfg.model}-{cfg.optimizer}-{datetime.now():%Y%m%d-%H%M%S}"
    return storage, name


def check_resume(cfg: TrainConfig, directory: Path) -> None:
    """A job re-run under the same name must have the same config, bar RESUMABLE_KEYS."""
    saved_file = directory / CONFIG_FILE
    current = cfg.model_dump(mode="json")
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


def build_trainer(cfg: TrainConfig, *, mlflow_run_id: str, callbacks=(),
                  storage_path: Path | str | None = None, name: str | None = None) -> TorchTrainer:
    """A TorchTrainer whose workers train ``cfg`` and whose controller logs to MLflow."""
    storage, default_name = run_directory(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        torch_config=TorchConfig(backend="nccl" if cfg.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                     resources_per_worker={"GPU": 1} if cfg.gpu else {"CPU": 1}),
        run_config=RunConfig(
            name=name or default_name,
            storage_path=str(storage_path or storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=[tracking.MlflowMetricsCallback(cfg.tracking_uri, mlflow_run_id),
                       *callbacks],
        ),
    )


def root_cause(error: BaseException) -> str:
    """The innermost worker error's last line, e.g. ``NonFiniteError: ... step 12 ...``."""
    text = str(error)
    for line in reversed(text.splitlines()):
        if "Error" in line and ":" in line:
            return line.strip()
    return text.splitlines()[-1] if text else type(error).__name__


def run_training(cfg: TrainConfig, json_output: bool = False) -> dict[str, Any]:
    """Train ``cfg`` on Ray Train, record it in MLflow, and print a summary."""
    cfg = cfg.replace(tracking_uri=tracking.resolve_tracking_uri(cfg.tracking_uri))
    # Converting here checks the source before Ray starts, with progress in this terminal;
    # workers on other nodes convert into their own node's cache.
    ensure_converted(cfg.dataset, data_root=cfg.data_root, download=cfg.download,
                     cache_dir=cfg.cache_dir)
    tracking.check_reachable(cfg.tracking_uri)
    storage, name = run_directory(cfg)
    cfg = cfg.replace(name=name)
    directory = storage / name
    check_resume(cfg, directory)
    connect(cfg.address)
    check_resources(cfg)
    run_id = tracking.start_run(cfg, run_key=str(directory), run_name=name)

    started = time.time()
    trainer = build_trainer(cfg, mlflow_run_id=run_id)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        tracking.mark_failed(cfg, run_id)
        raise TrainingError(f"training failed: {root_cause(error)}; the last good checkpoint "
                            f"is kept in {directory}, rerun the same command to resume") from None
    summary, state = record_result(cfg, run_id, result, started=started)
    print_summary(cfg, summary, dense=dense_count(state["model"]))
    if json_output:
        print(json.dumps({key: summary[key] for key in
                          ("run_id", "accuracy", "sparsity", "nonzeros", "epochs", "seconds")}))
    return summary


def record_result(cfg: TrainConfig, run_id: str, result: ray.train.Result, *,
                  started: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Close the MLflow run from the final checkpoint; returns the summary and that state.

    If the store is unreachable, the run stays open and a warning says how to replay it: the
    checkpoint holds every epoch's metrics.
    """
    with result.checkpoint.as_directory() as final:
        state = checkpoint.load(final)
    history = state["history"]
    last = history[-1]
    summary = {
        "run_id": run_id, "accuracy": last["accuracy"], "sparsity": last["sparsity"],
        "nonzeros": last["nonzeros"], "epochs": last["epoch"],
        "seconds": round(time.time() - started, 1), "checkpoint": result.checkpoint.path,
    }
    layers = {key.removeprefix("sparsity/"): value for key, value in last.items()
              if key.startswith("sparsity/")}
    try:
        tracking.finish_run(cfg, run_id, history=history, model_state=state["model"],
                            model_args=state["model_args"], layer_sparsity=layers,
                            summary=summary)
    except Exception as error:  # noqa: BLE001 - the model is trained; only the record waits
        print(f"warning: MLflow at {cfg.tracking_uri} is unreachable ({type(error).__name__}); "
              f"every epoch is kept in {summary['checkpoint']}: rerun the same command once "
              "the store is back, and it logs what is missing without training again",
              file=sys.stderr)
    return summary, state


def dense_count(model_state: dict[str, Any]) -> int:
    """Conv and linear weights: the only parameters of two or more dimensions here."""
    return sum(value.numel() for key, value in model_state.items()
               if key.endswith(".weight") and value.dim() > 1)


def print_summary(cfg: TrainConfig, summary: dict[str, Any], dense: int) -> None:
    print(
        f"\n{cfg.model} on {cfg.dataset} with {cfg.optimizer}, {summary['epochs']} epochs, "
        f"{summary['seconds']:.0f}s\n"
        f"  accuracy   {summary['accuracy']:.2%}\n"
        f"  sparsity   {summary['sparsity']:.2%}  ({summary['nonzeros']:,} non-zeros of "
        f"{dense:,} conv/linear weights)\n"
        f"  checkpoint {summary['checkpoint']}\n"
        f"  MLflow     run {summary['run_id']} in experiment '{cfg.experiment}' at "
        f"{cfg.tracking_uri}\n"
        f"             view it with: {tracking.ui_hint(cfg.tracking_uri)}",
        flush=True,
    )
