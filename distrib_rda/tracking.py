"""MLflow records: one run per training job, metrics logged exactly once per epoch.

Workers never talk to MLflow. The driver creates the run and logs the config; the Ray Train
controller logs each epoch's metrics through :class:`MlflowMetricsCallback`; the driver replays
anything missing from the final checkpoint's history. Every write goes through
:func:`log_epochs`, which skips epochs the run already has, so a restarted worker group, a
resumed job or a replay never duplicates a step.

If the store is unreachable mid-run, the callback keeps the epochs it could not log and retries at
the next report; the checkpoint's history is the local record that the driver replays at the end.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from distrib_rda.config import TrainConfig
from distrib_rda.errors import UserError

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "distrib_rda.run_key"
PARENT_TAG = "mlflow.parentRunId"
MAX_BATCH = 1000


class TrackingError(UserError):
    """The tracking store is unreachable or refuses the request."""


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute, so every process writes the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def check_reachable(uri: str) -> None:
    """Fail fast, before any training, when the store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:  # MLflow's own client retries for minutes; one plain request answers now
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except (OSError, ValueError) as error:
            raise TrackingError(f"--tracking-uri {uri}: the MLflow tracking server is "
                                f"unreachable ({error})") from None
        return
    elif uri.startswith("sqlite:///"):
        parent = Path(resolve_tracking_uri(uri)[len("sqlite:///"):]).parent
        if not parent.is_dir():
            raise TrackingError(f"--tracking-uri {uri}: directory {parent} does not exist")
    elif "://" not in uri or uri.startswith("file:"):
        raise TrackingError(
            f"--tracking-uri {uri}: MLflow 3 needs a database or server URI, "
            "such as sqlite:///mlflow.db or http://127.0.0.1:5000"
        )
    try:
        client_for(uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means "unreachable"
        raise TrackingError(
            f"--tracking-uri {uri}: the MLflow tracking store is unreachable "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from None


def config_params(cfg: TrainConfig) -> dict[str, str]:
    return {key: json.dumps(value) if isinstance(value, list) else str(value)
            for key, value in cfg.model_dump(mode="json").items()}


def start_run(cfg: TrainConfig, *, run_key: str, run_name: str | None = None,
              parent_run_id: str | None = None) -> str:
    """Create the run for ``run_key``, or return the existing one (a resumed job or trial)."""
    client = client_for(cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = (experiment.experiment_id if experiment
                     else client.create_experiment(cfg.experiment))
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {RUN_KEY_TAG: run_key, "dataset": cfg.dataset, "model": cfg.model,
            "optimizer": cfg.optimizer}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    params = [Param(key, value) for key, value in config_params(cfg).items()]
    client.log_batch(run.info.run_id, params=params)
    return run.info.run_id


def logged_epochs(client: MlflowClient, run_id: str) -> set[int]:
    return {metric.step for metric in client.get_metric_history(run_id, "epoch_seconds")}


def log_epochs(client: MlflowClient, run_id: str, history: list[dict[str, Any]]) -> int:
    """Log each epoch of ``history`` that the run does not have yet, with ``step=epoch``.

    Returns the number of epochs written. ``epoch_seconds`` is written last in each batch, so
    its presence marks an epoch as complete.
    """
    done = logged_epochs(client, run_id)
    written = 0
    now = int(time.time() * 1000)
    for record in history:
        epoch = int(record["epoch"])
        if epoch in done:
            continue
        metrics = [Metric(key, float(value), now, epoch) for key, value in record.items()
                   if key not in ("epoch", "epoch_seconds") and isinstance(value, (int, float))]
        metrics.append(Metric("epoch_seconds", float(record["epoch_seconds"]), now, epoch))
        for start in range(0, len(metrics), MAX_BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + MAX_BATCH])
        written += 1
    return written


class MlflowMetricsCallback(UserCallback):
    """Runs on the Ray Train controller: logs rank 0's epoch metrics once they are checkpointed.

    Epochs reported without a checkpoint wait for the next checkpoint, and are dropped if the
    worker group fails first: the restarted group reports them again.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.run_id = run_id
        self.pending: list[dict[str, Any]] = []
        self.unlogged: list[dict[str, Any]] = []

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.pending.append(metrics[0])
        if checkpoint is None:
            return
        self.unlogged.extend(self.pending)
        self.pending.clear()
        try:
            log_epochs(client_for(self.tracking_uri), self.run_id, self.unlogged)
            self.unlogged.clear()
        except Exception as error:  # noqa: BLE001 - the store may be down; retry next report
            logger.warning("MLflow unreachable, will retry at the next report: %s", error)

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.pending.clear()


def finish_run(cfg: TrainConfig, run_id: str, *, history: list[dict[str, Any]],
               model_state: dict[str, Any], model_args: dict[str, int],
               layer_sparsity: dict[str, float],
               summary: dict[str, Any], status: str = "FINISHED") -> None:
    """Replay missing epochs, attach the final model and per-layer sparsity, close the run."""
    client = client_for(cfg.tracking_uri)
    log_epochs(client, run_id, history)
    with tempfile.TemporaryDirectory() as tmp:
        import torch

        model_file = Path(tmp) / "model.pt"
        torch.save({"model": model_state, "model_args": model_args,
                    "config": cfg.model_dump(mode="json")}, model_file)
        client.log_artifact(run_id, str(model_file), artifact_path="model")
        client.log_dict(run_id, layer_sparsity, "layer_sparsity.json")
        client.log_dict(run_id, summary, "summary.json")
    client.log_batch(run_id, tags=[RunTag("final_sparsity", f"{summary['sparsity']:.4f}")])
    client.set_terminated(run_id, status=status)


def mark_failed(cfg: TrainConfig, run_id: str) -> None:
    try:
        client_for(cfg.tracking_uri).set_terminated(run_id, status="FAILED")
    except Exception:  # noqa: BLE001 - best effort while already failing
        pass


def ui_hint(uri: str) -> str:
    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri}"


__all__ = [
    "MlflowMetricsCallback", "TrackingError", "check_reachable", "client_for", "finish_run",
    "log_epochs", "mark_failed", "resolve_tracking_uri", "start_run", "ui_hint",
]
