"""The driver: starts or joins Ray and runs the TorchTrainer inside the run's MLflow lifecycle
(:class:`distrib_rda.tracking.TrackedRun`)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from distrib_rda import preflight, tracking
from distrib_rda.config import TrainConfig
from distrib_rda.data import DatasetMeta, ensure_converted
from distrib_rda.errors import UserError
from distrib_rda.preflight import CONFIG_FILE, RESUMABLE_KEYS, run_directory
from distrib_rda.preflight import check_address as check_reachable_address
from distrib_rda.terminal import prepare_ray, quiet_mlflow, say
from distrib_rda.tracking import TrainingError
from distrib_rda.training.loop import MODEL_FACTORY, train_loop_per_worker

WORKER_ENV = {
    # Ray Train routes workers' print() through a logger that echoes each line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # The Train controller logs to MLflow; when the store is down it must fail fast and retry
    # at the next report, not block the run in MLflow's minutes-long HTTP retries.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # The Train controller polls its workers every 2 s by default, for their reports and for
    # their end: a run's last report waits up to two polls before the run ends, and a trial
    # pays that in every search. Polling is a small actor call; a poll that does not answer in
    # time is awaited at the next one, so a busy worker is not taken for a dead one.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# Only for a local instance, which lives as long as the command and whose one node is never
# drained: Ray Train's preemption watcher (an actor per run, polling for node drains) has
# nothing to watch there. On a cluster it stays on.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
__all__ = ["CONFIG_FILE", "RESUMABLE_KEYS", "TrainingError", "build_trainer", "run_training"]


def connect(address: str | None) -> bool:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray instance. Returns whether
    this call connected (False when Ray was initialized before)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env = WORKER_ENV
    if address:
        check_reachable_address(address)
    else:
        env = {**WORKER_ENV, **LOCAL_ENV}
        # A new local instance starts one idle worker process per CPU for tasks without a
        # runtime environment when the first driver connects. This job has one (WORKER_ENV),
        # so none of them is ever used, and starting them takes CPU from the start of the
        # run's own processes.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    try:
        ray.init(address=address, runtime_env={"env_vars": env})
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise UserError(f"--address {address}: cannot connect to a Ray cluster "
                        f"({str(error).splitlines()[0][:200]})") from None
    return True


def stop_ray_in_background() -> None:
    """``ray.shutdown()`` in a thread, for a command that is done with Ray: what it still does
    (MLflow's final records, the logged model) needs no Ray, and stopping a local instance
    takes about 2 s. The thread is not a daemon, so the command exits after it ends."""
    threading.Thread(target=ray.shutdown, name="ray-shutdown").start()


def check_resources(cfg: TrainConfig) -> None:
    """Refuse, instead of waiting forever, when the cluster cannot place the workers."""
    resources = ray.cluster_resources()
    kind, have = ("GPU", resources.get("GPU", 0)) if cfg.gpu else ("CPU", resources.get("CPU", 0))
    if cfg.workers > have:
        raise UserError(f"--workers {cfg.workers}: the Ray cluster has {have:g} {kind}s, "
                        f"and each worker needs one; use --workers {int(have)} or fewer")


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


def save_config(cfg: TrainConfig, directory: Path) -> None:
    """Create the run's directory and its config file (:data:`CONFIG_FILE`), the first thing
    a run writes, once every check has passed and Ray is up. A rerun compares against it
    (:func:`distrib_rda.preflight.check_resume`)."""
    saved_file = directory / CONFIG_FILE
    if saved_file.exists():
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{CONFIG_FILE}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(cfg.to_dict(), indent=2))
        os.replace(temporary, saved_file)
    except OSError as error:
        raise UserError(f"--storage {directory.parent}: the run's directory {directory} cannot "
                        f"be written ({error.strerror})") from None


def resume_hint(directory: Path) -> str:
    """What a user can do after a failed run: resume from its last checkpoint, if it has one."""
    if any(directory.glob("checkpoint_*")):
        return (f"the last good checkpoint is kept in {directory}; rerun the same command to "
                "resume from it")
    return f"no epoch was checkpointed, so nothing is kept in {directory}"


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
                 model_factory: Callable[..., Any] | None = None, *,
                 stop_ray: bool = False) -> dict[str, Any]:
    """Train ``cfg`` on Ray Train, record it in MLflow, and print a summary. A Python caller
    may give its own ``model_factory`` (``cfg.model`` then names it). With ``stop_ray``, Ray
    is shut down once training ends, if this call started or joined it (the command does;
    a Python caller keeps Ray for its next call, as Ray Train's ``fit`` does)."""
    # Everything checkable is checked first, in about a second, before any file is written:
    # places, name, store, cluster address and the dataset's size, classes and shape.
    plan = preflight.check_train(cfg)
    cfg, directory, name = plan.cfg, plan.directory, plan.cfg.name
    # Converting here, before Ray starts, shows its progress in this terminal; workers on
    # other nodes convert into their own node's cache.
    beton_dir = ensure_converted(cfg.dataset, data_root=cfg.data_root, download=cfg.download,
                                 cache_dir=cfg.cache_dir, image_size=cfg.image_size)
    preflight.check_data(cfg, preflight.facts_of(DatasetMeta.load(beton_dir)))  # exact counts
    check_model(cfg, beton_dir, model_factory)
    if not plan.store_checked:  # a database URI only MLflow can read
        tracking.check_reachable(cfg.tracking_uri)
    quiet_mlflow()
    store = tracking.open_store(cfg.tracking_uri)  # while Ray starts
    prepare_ray(cfg.address)
    say(f"starting Ray ({'joining ' + cfg.address if cfg.address else 'a local instance'}) ...")
    connected = connect(cfg.address)
    check_resources(cfg)
    store.result()
    # The run starts: its directory, its config file and its MLflow run are created now.
    save_config(cfg, directory)
    run = tracking.TrackedRun.start(cfg, run_key=str(directory), run_name=name,
                                    beton_dir=beton_dir, model_factory=model_factory)
    say(f"{'resuming' if plan.resumed else 'training'} {name}: {cfg.workers} worker(s), "
        f"{cfg.epochs} epochs; MLflow run {run.run_id} in experiment '{cfg.experiment}'")

    started = time.time()
    try:
        result = run.fit(build_trainer(cfg, callbacks=[run.callback()],
                                       model_factory=model_factory))
    except TrainingError as error:
        raise TrainingError(f"{error}; {resume_hint(directory)}") from None
    if stop_ray and connected:
        stop_ray_in_background()
    summary, _ = run.finish(result.checkpoint, started=started,
                            register=getattr(cfg, "register", None))
    tracking.print_summary(cfg, summary)
    if json_output:
        print(json.dumps({key: summary[key] for key in
                          ("run_id", "accuracy", "sparsity", "nonzeros", "epochs", "seconds")}))
    return summary
