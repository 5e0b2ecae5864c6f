"""The life of a training run in MLflow, the same for ``distrib-rda train`` and every ``tune``
trial: :class:`TrackedRun`.

A run is found again by its run key (a tag), so a resumed job or a retried trial logs into the
same MLflow run. It records:

- params: only what defines the run (:func:`run_params`); where and how it ran (storage, cache
  dir, Ray address, loader threads, checkpoint period, failure budget) are tags;
- the dataset as a run input (``mlflow.data``: name, source, digest and schema), so the UI's
  Datasets column is filled;
- each epoch's metrics exactly once (:func:`log_epochs`, the only writer of epoch metrics): the
  Ray Train controller logs them as they are checkpointed (:class:`MlflowMetricsCallback`), and
  :meth:`TrackedRun.finish` replays what the store missed from the final checkpoint's history;
- the final model as an MLflow Model (``mlflow.pytorch.log_model``, ``pt2``: a traced graph that
  loads without pickle and without this package), with a signature, an input example and the
  preprocessing (mean, std, input shape, class names) in its metadata; optionally a Model
  Registry version tagged with its sparsity, non-zeros and accuracy;
- the sparse export beside it (``sparse/model-sparse.pt``) and its size against dense;
- the outcome: FINISHED with ``summary.json``, or FAILED with the worker's error, read from Ray
  Train's structured :class:`ray.train.WorkerGroupError`.

Where records go (:func:`resolve_locations`): ``MLFLOW_TRACKING_URI`` and ``DISTRIB_RDA_STORAGE``
replace the defaults of ``--tracking-uri`` and ``--storage``. Inside a Ray job, whose working
directory is Ray's temporary copy, a relative path is refused before any work. With a sqlite
store, experiments are created with their artifacts beside the database file, never under the
current directory; with a server, the server decides.

MLflow is imported where it is used, not with this module: every Train worker imports this
module (:func:`preprocessing_of`) and the Train controller unpickles its callback from it, and
a worker never logs to MLflow, while the controller needs it only at its first checkpoint.
Importing MLflow costs a second or more of CPU in each process that does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.train import UserCallback

from distrib_rda.config import TrainConfig
from distrib_rda.errors import UserError
from distrib_rda.locations import (  # noqa: F401 - where records go, re-exported here
    DEFAULT_STORAGE,
    DEFAULT_TRACKING_URI,
    RAY_JOB_ENV,
    STORAGE_ENV,
    TRACKING_ENV,
    default_tracking_uri,
    ray_job_directory,
    resolve_locations,
    resolve_tracking_uri,
    sqlite_file,
)
from distrib_rda.safe_load import torch_load

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "distrib_rda.run_key"
PARENT_TAG = "mlflow.parentRunId"
MODEL_FORMAT_TAG = "distrib_rda.model_format"
KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # the MLflow UI's model-training view
MODEL_NAME = "model"  # runs:/<run id>/model
SPARSE_DIR = "sparse"
CHECKPOINT_FILE = "checkpoint.pt"  # what distrib_rda.training.checkpoint writes
EPOCH_MARKER = "epoch_seconds"  # written last for each epoch: an epoch is logged iff it has it
MAX_BATCH = 1000


# Config keys about where and how a run ran, not what it is: tags, not params.
PLACEMENT_KEYS = ("address", "storage", "cache_dir", "tracking_uri", "loader_workers",
                  "checkpoint_every", "max_failures", "name", "experiment", "register")
PLACEMENT_TAGS = ("address", "storage", "cache_dir", "loader_workers", "checkpoint_every",
                  "max_failures")


class TrackingError(UserError):
    """The tracking store is unreachable or refuses the request."""


class TrainingError(UserError):
    """The run failed; the message gives the cause."""


# --- where records go (distrib_rda.locations) ----------------------------------------------


def client_for(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def open_store(uri: str) -> Future[MlflowClient]:
    """:func:`client_for` ``uri``, made in a background thread while the caller starts Ray:
    MLflow imports its store and, for a new sqlite file, creates its tables by running its
    database migrations, 3-4 s. ``.result()`` gives the client or raises its error."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-store")
    future = pool.submit(client_for, uri)
    pool.shutdown(wait=False)
    return future


def import_model_logging() -> None:
    """Import what :func:`log_pytorch_model` uses (MLflow's PyTorch flavor, torch.export's
    tracer: 3-4 s), in a background thread, while the driver only waits for the training."""
    def imports() -> None:
        import mlflow.pytorch  # noqa: F401
        import torch._dynamo  # noqa: F401 - what torch.export.export imports at its first call

    threading.Thread(target=imports, name="import-model-logging", daemon=True).start()


def check_reachable(uri: str) -> None:
    """Fail fast, before any training, when a store that only MLflow can read
    (``postgresql://`` and the like; :func:`distrib_rda.preflight.check_store` checks sqlite
    files and servers itself) cannot be reached."""
    try:
        client_for(uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means "unreachable"
        raise TrackingError(
            f"--tracking-uri {uri}: the MLflow tracking store is unreachable "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: beside the database, in
    ``<db stem>-artifacts/<experiment>``. None for a server, which decides itself."""
    database = sqlite_file(uri)
    if database is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip("-.") or "experiment"
    return (database.parent / f"{database.stem}-artifacts" / slug).as_uri()


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if needed, shown as model training in the UI."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri, name),
                                            tags={KIND_TAG: MODEL_TRAINING})
        except MlflowException:  # another process created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise UserError(f"--experiment {name}: the MLflow experiment is deleted; restore it "
                        f"(mlflow experiments restore --experiment-id "
                        f"{experiment.experiment_id}) or choose another name")
    if KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


# --- what a run records ---------------------------------------------------------------------


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The whole flat config, JSON-compatible (the optimizer's keys included)."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else cfg.model_dump(mode="json")


def run_params(cfg: TrainConfig) -> dict[str, str]:
    """The params of a run: the config keys that define it, none about where it ran."""
    if hasattr(cfg, "params"):
        return cfg.params()
    return {key: json.dumps(value) if isinstance(value, list) else str(value)
            for key, value in config_dict(cfg).items() if key not in PLACEMENT_KEYS}


def placement_tags(cfg: TrainConfig) -> dict[str, str]:
    values = config_dict(cfg)
    return {f"distrib_rda.{key}": str(values[key]) for key in PLACEMENT_TAGS
            if values.get(key) is not None}


def dataset_inputs(cfg: TrainConfig, beton_dir: Path) -> list:
    """The training and test sets as MLflow dataset inputs: name, source, digest, schema.

    The digest hashes ``meta.json`` (counts, shape, classes, and mean and std over every
    pixel, so it changes whenever the images do) and, for the training set, ``--subset``.
    """
    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec

    from distrib_rda.data import DatasetMeta, resolve_source

    meta = DatasetMeta.load(beton_dir)
    try:
        files = resolve_source(cfg.dataset, data_root=cfg.data_root).files
        where = Path(os.path.commonpath([str(f) for f in files])) if files else beton_dir
    except UserError:
        where = beton_dir
    with warnings.catch_warnings():  # MLflow registers its local source class twice
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(where if where.is_dir() else where.parent))
    height, width, channels = meta.shape
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, height, width, channels), "image"),
                     TensorSpec(np.dtype(np.int64), (-1,), "label")])
    name = cfg.dataset if not cfg.dataset.startswith("imagefolder:") else \
        "imagefolder:" + Path(cfg.dataset.removeprefix("imagefolder:")).name
    meta_bytes = (Path(beton_dir) / "meta.json").read_bytes()
    inputs = []
    for split, context, extra in (("train", "training", f"subset={cfg.subset}"),
                                  ("test", "evaluation", "")):
        digest = hashlib.sha256(meta_bytes + f"\0{split}\0{extra}".encode()).hexdigest()[:16]
        dataset = MetaDataset(source, name=f"{name}/{split}", digest=digest, schema=schema)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(),
                                   [InputTag("mlflow.data.context", context)]))
    return inputs


def preprocessing_of(meta) -> dict[str, Any]:
    """What turns a raw image into the model's input, from a dataset's
    :class:`~distrib_rda.data.DatasetMeta`, as the loaders apply it. Every checkpoint holds it,
    and so do the logged model's metadata and the sparse export."""
    height, width, channels = meta.shape
    return {"input_shape": [channels, height, width], "layout": "NCHW",
            "pixel_scale": "0-255", "mean": list(meta.mean), "std": list(meta.std),
            "normalize": "(pixel - mean) / std, per channel", "classes": list(meta.classes)}


# --- epochs, exactly once -------------------------------------------------------------------


def logged_epochs(client: MlflowClient, run_id: str) -> set[int]:
    return {metric.step for metric in client.get_metric_history(run_id, EPOCH_MARKER)}


def log_epochs(client: MlflowClient, run_id: str, history: list[dict[str, Any]]) -> int:
    """Log each epoch of ``history`` that the run does not have yet, with ``step=epoch``.

    Returns the number of epochs written. ``epoch_seconds`` is written last in each batch, so
    its presence marks an epoch as complete.
    """
    from mlflow.entities import Metric

    done = logged_epochs(client, run_id)
    written = 0
    now = int(time.time() * 1000)
    for record in history:
        epoch = int(record["epoch"])
        if epoch in done:
            continue
        metrics = [Metric(key, float(value), now, epoch) for key, value in record.items()
                   if key not in ("epoch", EPOCH_MARKER) and isinstance(value, (int, float))]
        metrics.append(Metric(EPOCH_MARKER, float(record[EPOCH_MARKER]), now, epoch))
        for start in range(0, len(metrics), MAX_BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + MAX_BATCH])
        written += 1
    return written


class MlflowMetricsCallback(UserCallback):
    """Runs on the Ray Train controller: logs rank 0's epoch metrics once they are checkpointed.

    Epochs reported without a checkpoint wait for the next checkpoint, and are dropped if the
    worker group fails first: the restarted group reports them again. If the store is
    unreachable, the epochs are kept and retried at the next checkpoint.
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


# --- failures -------------------------------------------------------------------------------


def failure_cause(error: BaseException) -> str:
    """What made Ray Train give up, e.g. ``rank 1: NonFiniteError: non-finite loss at ...``.

    Ray Train V2 raises :class:`ray.train.WorkerGroupError`, holding each failed rank's own
    exception, or :class:`ray.train.ControllerError`.
    """
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(error, WorkerGroupError) and error.worker_failures:
        rank = min(error.worker_failures)
        return f"rank {rank}: {_describe(error.worker_failures[rank])}"
    if isinstance(error, ControllerError):
        return f"the Train controller: {_describe(error.controller_failure)}"
    return _describe(error)


def _describe(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# --- the lifecycle --------------------------------------------------------------------------


class TrackedRun:
    """One MLflow run from start to end: see the module docstring for what it records."""

    def __init__(self, cfg: TrainConfig, run_id: str, *, beton_dir: Path | None = None,
                 experiment_id: str | None = None, model_factory=None):
        self.cfg = cfg
        self.run_id = run_id
        self.beton_dir = beton_dir
        self.experiment_id = experiment_id
        self.model_factory = model_factory  # a Python caller's own, in place of cfg.model
        self.client = client_for(cfg.tracking_uri)

    @classmethod
    def start(cls, cfg: TrainConfig, *, run_key: str, run_name: str | None = None,
              parent_run_id: str | None = None, beton_dir: Path | None = None,
              model_factory=None) -> TrackedRun:
        """Create the run for ``run_key``, or reopen the existing one (a resumed job or trial).

        A new run gets the params, the placement tags and, with ``beton_dir``, the dataset."""
        from mlflow.entities import Param, RunTag

        client = client_for(cfg.tracking_uri)
        experiment = experiment_id(client, cfg.experiment, cfg.tracking_uri)
        existing = find_run(client, experiment, run_key)
        tags = placement_tags(cfg)
        if existing is not None:
            run_id = existing.info.run_id
            client.update_run(run_id, status="RUNNING")
            client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
            return cls(cfg, run_id, beton_dir=beton_dir, experiment_id=experiment,
                       model_factory=model_factory)
        tags.update({RUN_KEY_TAG: run_key, "dataset": cfg.dataset, "model": cfg.model,
                     "optimizer": cfg.optimizer})
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        run_id = client.create_run(experiment, run_name=run_name, tags=tags).info.run_id
        client.log_batch(run_id, params=[Param(key, value)
                                         for key, value in run_params(cfg).items()])
        if beton_dir is not None:
            client.log_inputs(run_id, datasets=dataset_inputs(cfg, beton_dir))
        return cls(cfg, run_id, beton_dir=beton_dir, experiment_id=experiment,
                   model_factory=model_factory)

    def callback(self) -> MlflowMetricsCallback:
        """The Ray Train callback that logs this run's epochs as they are checkpointed."""
        return MlflowMetricsCallback(self.cfg.tracking_uri, self.run_id)

    def fit(self, trainer, *, what: str = "training", then: str = ""):
        """``trainer.fit()``; a failure marks the run FAILED and raises :class:`TrainingError`
        naming the cause, followed by ``then`` (what the user can do)."""
        import ray.train

        import_model_logging()
        try:
            return trainer.fit()
        except ray.train.TrainingFailedError as error:
            self.mark_failed()
            raise TrainingError(f"{what} failed: {failure_cause(error)}"
                                + (f"; {then}" if then else "")) from None

    def mark_failed(self) -> None:
        try:
            self.client.set_terminated(self.run_id, status="FAILED")
        except Exception:  # noqa: BLE001 - best effort while already failing
            pass

    def finish(self, checkpoint, *, started: float,
               register: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Record the final ``checkpoint`` (a :class:`ray.train.Checkpoint`) and close the run,
        registering its model as ``register`` if given; returns the summary and the state.

        If the store is unreachable, the run stays open and a warning says how to complete it:
        the checkpoint holds every epoch, and a rerun logs what is missing without training.
        """
        with checkpoint.as_directory() as directory:
            state = torch_load(Path(directory) / CHECKPOINT_FILE)
        last = state["history"][-1]
        summary = {
            "run_id": self.run_id, "accuracy": last["accuracy"], "sparsity": last["sparsity"],
            "nonzeros": last["nonzeros"], "epochs": last["epoch"],
            "seconds": round(time.time() - started, 1), "checkpoint": checkpoint.path,
            "weights": dense_count(state["model"]),
            "model_uri": f"runs:/{self.run_id}/{MODEL_NAME}",
            "experiment_id": self.experiment_id,
        }
        try:
            summary.update(self._record(state, summary, register=register))
        except Exception as error:  # noqa: BLE001 - the model is trained; only the record waits
            print(f"warning: MLflow at {self.cfg.tracking_uri} is unreachable or refused the "
                  f"record ({_describe(error)[:300]}); every "
                  f"epoch is kept in {summary['checkpoint']}: rerun the same command once the "
                  "store is back, and it logs what is missing without training again",
                  file=sys.stderr)
        return summary, state

    def _record(self, state: dict[str, Any], summary: dict[str, Any], *,
                register: str | None) -> dict[str, Any]:
        from mlflow.entities import Metric, RunTag

        from distrib_rda.export import write_export

        client, run_id = self.client, self.run_id
        history = state["history"]
        last = history[-1]
        log_epochs(client, run_id, history)
        client.log_dict(run_id, {key.removeprefix("sparsity/"): value
                                 for key, value in last.items() if key.startswith("sparsity/")},
                        "layer_sparsity.json")
        client.log_dict(run_id, summary, "summary.json")
        preprocessing = state.get("preprocessing")
        if preprocessing is None and self.beton_dir is not None:  # an older checkpoint
            from distrib_rda.data import DatasetMeta

            preprocessing = preprocessing_of(DatasetMeta.load(self.beton_dir))
        extra: dict[str, Any] = {}

        with tempfile.TemporaryDirectory() as tmp:
            sparse_file = Path(tmp) / "model-sparse.pt"
            report = write_export(state["model"], out=sparse_file,
                                  config=state.get("config") or config_dict(self.cfg),
                                  model_args=state.get("model_args"),
                                  preprocessing=preprocessing)
            client.log_artifact(run_id, str(sparse_file), SPARSE_DIR)
            client.log_dict(run_id, report, f"{SPARSE_DIR}/export.json")
        now, step = int(time.time() * 1000), int(last["epoch"])
        client.log_batch(run_id, metrics=[
            Metric("sparse_file_bytes", report["file_bytes"], now, step),
            Metric("dense_file_bytes", report["dense_bytes"], now, step),
            Metric("compression_ratio", report["ratio"], now, step)])

        model_id = self._logged_model_id()
        if model_id is None:
            module = self._final_module(state)
            example = state.get("example")
            if example is None:  # a checkpoint written before examples were kept
                import torch

                args = state["model_args"]
                example = torch.zeros(2, args["in_channels"], args["image_size"],
                                      args["image_size"])
            info = log_pytorch_model(
                self.cfg.tracking_uri, run_id, module, example, step=step,
                preprocessing=preprocessing,
                about={"model": self.cfg.model, "model_args": state.get("model_args"),
                       "sparsity": last["sparsity"], "nonzeros": last["nonzeros"],
                       "accuracy": last["accuracy"]})
            model_id = info.model_id
        if register:
            extra["registered"] = register_version(
                client, register, run_id, model_id,
                {"sparsity": str(last["sparsity"]), "nonzeros": str(last["nonzeros"]),
                 "accuracy": str(last["accuracy"])})
        client.log_batch(run_id, tags=[RunTag("final_sparsity", f"{last['sparsity']:.4f}")])
        client.set_terminated(run_id, status="FINISHED")
        return extra

    def _logged_model_id(self) -> str | None:
        """The model this run already logged (a rerun of a finished run logs no second one)."""
        from mlflow.entities import LoggedModelStatus

        experiment = self.experiment_id or self.client.get_run(self.run_id).info.experiment_id
        found = self.client.search_logged_models(
            [experiment], filter_string=f"source_run_id = '{self.run_id}' AND name = "
                                        f"'{MODEL_NAME}'")
        ready = [model for model in found if model.status == LoggedModelStatus.READY]
        return ready[0].model_id if ready else None

    def _final_module(self, state: dict[str, Any]):
        from distrib_rda.models import build_model

        module = build_model(self.model_factory or self.cfg.model, **state["model_args"])
        module.load_state_dict(state["model"])
        return module.eval()


def find_run(client: MlflowClient, experiment: str, run_key: str):
    runs = client.search_runs([experiment], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                              max_results=1)
    return runs[0] if runs else None


def finished_result(cfg: TrainConfig, run_key: str) -> dict[str, float] | None:
    """The final metrics (and ``epoch``) of the FINISHED run of ``run_key``, else None."""
    client = client_for(cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return None
    run = find_run(client, experiment.experiment_id, run_key)
    if run is None or run.info.status != "FINISHED":
        return None
    epochs = logged_epochs(client, run.info.run_id)
    return {**run.data.metrics, "epoch": max(epochs, default=0)}


def start_run(cfg: TrainConfig, *, run_key: str, run_name: str | None = None,
              parent_run_id: str | None = None) -> str:
    """The run id of :meth:`TrackedRun.start` (a search's parent run, which holds no data)."""
    return TrackedRun.start(cfg, run_key=run_key, run_name=run_name,
                            parent_run_id=parent_run_id).run_id


# --- the model ------------------------------------------------------------------------------


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``log_model``, ``register_model``) on ``uri``, for this block."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(resolve_tracking_uri(uri))
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def log_pytorch_model(tracking_uri: str, run_id: str, module, example, *, step: int = 0,
                      preprocessing: dict[str, Any] | None = None,
                      about: dict[str, Any] | None = None):
    """Log ``module`` (in eval mode) as run ``run_id``'s MLflow Model ``model``.

    The format is ``pt2`` (``torch.export``): a graph whose predictions are the module's, that
    ``mlflow.pytorch.load_model`` reads without unpickling code and without this package, with
    a dynamic batch dimension (the input example holds 2 images). A module that torch.export
    cannot trace is logged with pickle instead, with a warning and the tag
    ``distrib_rda.model_format=pickle``: loading that needs the module's code and
    ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``.
    """
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    module = module.eval()
    example = torch.as_tensor(example, dtype=torch.float32).cpu()
    if example.shape[0] < 2:  # torch.export makes a batch of 1 a constant
        example = example.repeat(2, *([1] * (example.dim() - 1)))[:2]
    with torch.no_grad():
        output = module(example)
    signature = infer_signature(example.numpy(), output.numpy())
    metadata = {"preprocessing": preprocessing or {}, "distrib_rda": about or {}}
    fmt, reason = "pt2", None
    try:
        with torch.no_grad():
            torch.export.export(module, (example,))
    except Exception as error:  # noqa: BLE001 - torch.export raises many types
        fmt, reason = "pickle", _describe(error)
        print(f"warning: torch.export cannot trace the model ({reason[:300]}); it is logged "
              "with pickle, and loading it needs its code and "
              "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true", file=sys.stderr)
    requirements = [f"torch=={torch.__version__.split('+')[0]}"] if fmt == "pt2" else None
    with _tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            module, name=MODEL_NAME, signature=signature, input_example=example.numpy(),
            serialization_format=fmt, metadata=metadata, step=step,
            pip_requirements=requirements)
        mlflow.set_tag(MODEL_FORMAT_TAG, fmt)
    return info


def register_version(client: MlflowClient, name: str, run_id: str, model_id: str,
                     tags: dict[str, str]) -> str:
    """A Model Registry version of ``name`` for the run's model, tagged with ``tags``; the
    existing one if this run was registered under ``name`` before. Returns ``name/version``."""
    import mlflow

    for version in client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'"):
        return f"{name}/{version.version}"
    with _tracking_uri(client.tracking_uri):
        version = mlflow.register_model(f"models:/{model_id}", name, tags=tags)
    return f"{name}/{version.version}"


def dense_count(model_state: dict[str, Any]) -> int:
    """Conv and linear weights: the only parameters of two or more dimensions here."""
    return sum(value.numel() for key, value in model_state.items()
               if key.endswith(".weight") and value.dim() > 1)


# --- the summary ----------------------------------------------------------------------------


def ui_hint(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """How to look at a run. MLflow 3.17's UI picks its GenAI or model-training view with a
    sidebar switch (default GenAI) that the ``workflowType`` URL parameter sets, so the link
    asks for the model-training view."""
    uri = resolve_tracking_uri(uri)
    page = ""
    if experiment_id:
        page = f"/#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
        page += "?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{page}"
    return f"mlflow ui --backend-store-uri {uri}" + (
        f", then open http://127.0.0.1:5000{page}" if page else "")


def print_summary(cfg: TrainConfig, summary: dict[str, Any]) -> None:
    registered = (f"\n  registered {summary['registered']}" if summary.get("registered")
                  else "")
    print(
        f"\n{cfg.model} on {cfg.dataset} with {cfg.optimizer}, {summary['epochs']} epochs, "
        f"{summary['seconds']:.0f}s\n"
        f"  accuracy   {summary['accuracy']:.2%}\n"
        f"  sparsity   {summary['sparsity']:.2%}  ({summary['nonzeros']:,} non-zeros of "
        f"{summary['weights']:,} conv/linear weights)\n"
        f"  checkpoint {summary['checkpoint']}\n"
        f"  MLflow     run {summary['run_id']} in experiment '{cfg.experiment}' at "
        f"{cfg.tracking_uri}\n"
        f"             model {summary['model_uri']}{registered}\n"
        f"             view it with: "
        f"{ui_hint(cfg.tracking_uri, summary.get('experiment_id'), summary['run_id'])}",
        flush=True,
    )


__all__ = [
    "MlflowMetricsCallback", "TrackedRun", "TrackingError", "TrainingError", "check_reachable",
    "client_for", "failure_cause", "finished_result", "log_epochs", "log_pytorch_model",
    "print_summary", "resolve_locations", "resolve_tracking_uri", "run_params", "start_run",
    "ui_hint",
]
