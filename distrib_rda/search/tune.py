"""``distrib-rda tune``: a Ray Tune search whose trials are whole distributed training runs.

Each trial is a Tune function trainable that builds a ``TorchTrainer`` (Train V2) and passes
``TuneReportCallback``, so Tune sees every epoch's metrics. The trial itself only drives the
Train controller: it reserves a little memory and no CPU, so the Train workers get the CPUs
or GPUs. Both objectives are searched at once (Optuna's multi-objective TPE or NSGA-II, or
random/grid sampling). No Tune scheduler stops trials early: that leaks Train placement groups
in Ray 2.60 (ray-project/ray#54305).

MLflow: one parent run per search, one child run per trial (``mlflow.parentRunId``), keyed by
the Tune trial id, so a retried or resumed trial logs into the same child. When the search ends,
the parent gets ``pareto.png`` and ``pareto.json``, and the front's children the tag
``pareto=true``.

The search lives in ``storage/name`` (``name`` defaults to the space file's stem); the Train
runs of its trials in ``storage/name/trials/<trial id>``, and ``search.json`` there names the
parent run, so ``--resume`` continues the same search under the same parent.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray import tune
from rich.console import Console

from distrib_rda import tracking
from distrib_rda.errors import UserError
from distrib_rda.preflight import check_data, check_search, facts_of
from distrib_rda.search.pareto import plot_search
from distrib_rda.search.report import (
    PARENT_TAG,
    ROLE_TAG,
    TRIAL_TAG,
    finished_runs,
    front_of,
    front_table,
)
from distrib_rda.search.space import SearchSpec, load_space
from distrib_rda.terminal import prepare_ray, quiet_mlflow, say

SEARCH_FILE = "search.json"
# The trial only drives the Train controller (which itself asks for 0 CPUs). A bundle needs
# some resource, so it reserves memory, not a CPU that a Train worker could use.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 128 * 1024**2}
# Keys a resumed search may change; any other change to the space file or flags is refused.
RESUMABLE_KEYS = {"max_failures", "address", "checkpoint_every", "loader_workers", "register"}


def run_search(space: SearchSpec | Path | str, *, trials: int | None = None,
               max_concurrent: int | None = None, resume: bool = False,
               overrides: dict[str, Any] | None = None, stop_ray: bool = False) -> dict[str, Any]:
    """Run (or with ``resume``, continue) the search that ``space`` (a loaded spec, or the
    path of a space file) describes.

    ``overrides`` are training-config keys given as flags; they fix those keys for every trial
    (with a path; a loaded spec has them already).
    Returns ``{"parent_run_id", "search_dir", "trials", "finished", "errored", "lost",
    "front"}``: Tune's trial count, the finished and failed ones, the run ids of unfinished
    trials lost in a kill (see :func:`_retire_lost_trials`), and the front's members.
    ``stop_ray`` shuts Ray down once the trials end, if this call started or joined it, as
    :func:`distrib_rda.training.run_training` does.
    """
    spec = space if isinstance(space, SearchSpec) else load_space(
        space, overrides=overrides, trials=trials, max_concurrent=max_concurrent)
    # Where the records go is settled first: a Ray job without a usable place is refused here.
    spec.base = tracking.resolve_locations(spec.base)
    cfg = spec.base
    search_dir = cfg.storage / spec.name
    state_file = search_dir / SEARCH_FILE
    # Everything checkable is checked before any file is written (distrib_rda.preflight).
    if not check_search(spec, resume=resume):  # a database URI only MLflow can read
        tracking.check_reachable(cfg.tracking_uri)
    quiet_mlflow()
    store = tracking.open_store(cfg.tracking_uri)  # while the data are checked and Ray starts
    parent_run_id = _check_resume(state_file, spec, store.result()) if resume else None

    # As `train` does: convert the data here, before any trial, with progress in this
    # terminal, and check the exact counts; workers on other nodes convert into their own
    # node's cache.
    from distrib_rda.data import DatasetMeta, ensure_converted
    from distrib_rda.training.driver import check_resources, connect, stop_ray_in_background

    datasets = spec.space["dataset"].values if "dataset" in spec.space else [cfg.dataset]
    for dataset in datasets:
        beton_dir = ensure_converted(dataset, data_root=cfg.data_root, download=cfg.download,
                                     cache_dir=cfg.cache_dir, image_size=cfg.image_size)
        check_data(cfg.replace(dataset=dataset), facts_of(DatasetMeta.load(beton_dir)))
    prepare_ray(cfg.address)
    say(f"starting Ray ({'joining ' + cfg.address if cfg.address else 'a local instance'}) ...")
    connected = connect(cfg.address)
    check_resources(cfg)
    _warn_if_oversubscribed(spec)
    client = store.result()
    if parent_run_id:
        client.update_run(parent_run_id, status="RUNNING")
    else:
        parent_run_id = _start_parent(spec, search_dir, state_file)

    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, spec=spec, parent_run_id=parent_run_id,
                             search_dir=str(search_dir)),
        TRIAL_DRIVER_RESOURCES)
    print(f"search '{spec.name}': {spec.trials} trials of {cfg.model} on {cfg.dataset}, "
          f"{spec.search.max_concurrent} at a time, {spec.search.algorithm} over "
          f"{', '.join(spec.space)}; stored in {search_dir}; MLflow parent run "
          f"{parent_run_id} in experiment '{cfg.experiment}'", flush=True)
    with _legacy_progress_output():
        if resume and tune.Tuner.can_restore(str(search_dir)):
            tuner = tune.Tuner.restore(str(search_dir), trainable=trainable,
                                       resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=spec.param_space(),
                               tune_config=_tune_config(spec),
                               run_config=_run_config(spec, search_dir))
        results = tuner.fit()
    if stop_ray and connected:
        stop_ray_in_background()

    errored = results.num_errors
    if results.num_terminated + errored < spec.trials:
        print(f"search '{spec.name}' interrupted with {results.num_terminated} of "
              f"{spec.trials} trials done; continue it with --resume", file=sys.stderr)
        raise KeyboardInterrupt
    trial_ids = {Path(result.path).name.removeprefix("trial-") for result in results}
    return finish_search(spec, parent_run_id, search_dir, errored=errored, trial_ids=trial_ids)


def _warn_if_oversubscribed(spec: SearchSpec) -> None:
    kind = "GPU" if spec.base.gpu else "CPU"
    have = int(ray.cluster_resources().get(kind, 0))
    fit = max(1, have // spec.base.workers)
    if spec.search.max_concurrent > fit:
        print(f"note: --max-concurrent {spec.search.max_concurrent}: the cluster has {have} "
              f"{kind}s, room for {fit} trial(s) of {spec.base.workers} worker(s) at once; the "
              "others wait for a free slot", file=sys.stderr)


@contextmanager
def _legacy_progress_output():
    """Tune calls a progress reporter of ours (:class:`~distrib_rda.search.progress.
    SearchProgress`) only in its legacy output engine; Ray 2.60 selects it with
    ``RAY_AIR_NEW_OUTPUT=0``."""
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


def _tune_config(spec: SearchSpec) -> tune.TuneConfig:
    settings = spec.search
    if settings.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory"

        if settings.sampler == "nsga2":
            sampler = optuna.samplers.NSGAIISampler(
                population_size=max(4, spec.trials // 4), seed=settings.seed)
        else:
            sampler = optuna.samplers.TPESampler(
                n_startup_trials=max(2, min(10, spec.trials // 3)), seed=settings.seed)
        return tune.TuneConfig(
            search_alg=OptunaSearch(metric=spec.metrics, mode=spec.modes, sampler=sampler,
                                    points_to_evaluate=spec.start_points() or None),
            num_samples=spec.trials, max_concurrent_trials=settings.max_concurrent,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
            reuse_actors=True)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return tune.TuneConfig(
        search_alg=BasicVariantGenerator(max_concurrent=settings.max_concurrent,
                                         random_state=settings.seed,
                                         points_to_evaluate=spec.start_points() or None),
        num_samples=1 if settings.algorithm == "grid" else spec.trials,
        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name, reuse_actors=True)


def _trial_name(trial) -> str:
    """Tune's trial name and directory, and the MLflow child run's name."""
    return f"trial-{trial.trial_id}"


def _run_config(spec: SearchSpec, search_dir: Path) -> tune.RunConfig:
    from distrib_rda.search.progress import SearchProgress

    reporter = SearchProgress(keys=list(spec.space), metrics=spec.metrics, total=spec.trials,
                              search_dir=search_dir)
    return tune.RunConfig(name=search_dir.name, storage_path=str(search_dir.parent),
                          progress_reporter=reporter, verbose=1,
                          failure_config=tune.FailureConfig(max_failures=0))


def _start_parent(spec: SearchSpec, search_dir: Path, state_file: Path) -> str:
    cfg = spec.base
    run_key = f"search:{search_dir}:{uuid.uuid4().hex}"
    parent_run_id = tracking.start_run(cfg, run_key=run_key, run_name=spec.name)
    client = tracking.client_for(cfg.tracking_uri)
    for key, value in {ROLE_TAG: "search", "search.space_file": str(spec.path.resolve()),
                       "search.algorithm": spec.search.algorithm,
                       "search.trials": str(spec.trials),
                       "search.objectives": ", ".join(f"{o.metric} {o.mode}"
                                                      for o in spec.objectives),
                       "search.dir": str(search_dir)}.items():
        client.set_tag(parent_run_id, key, value)
    client.log_dict(parent_run_id, spec.as_dict(), "search_space.json")
    search_dir.mkdir(parents=True)
    state_file.write_text(json.dumps({
        "parent_run_id": parent_run_id, "run_key": run_key,
        "tracking_uri": cfg.tracking_uri, "experiment": cfg.experiment,
        "trials": spec.trials, "max_concurrent": spec.search.max_concurrent,
        "spec": spec.as_dict(),
    }, indent=2))
    return parent_run_id


def _check_resume(state_file: Path, spec: SearchSpec, client) -> str:
    """The parent run of the search to resume, after checking the search is the same one."""
    state = json.loads(state_file.read_text())
    saved, current = state["spec"], spec.as_dict()
    changed = [f"config.{key}: {saved['config'].get(key)!r} -> {value!r}"
               for key, value in current["config"].items()
               if key not in RESUMABLE_KEYS and saved["config"].get(key) != value]
    changed += [f"{section}: {saved.get(section)!r} -> {current[section]!r}"
                for section in ("space", "objectives", "algorithm", "sampler", "seed")
                if saved.get(section) != current[section]]
    if changed:
        raise UserError(f"--resume: the search in {state_file.parent} was started with a "
                        f"different space or config ({'; '.join(changed)}); resume it with "
                        "the same file and flags, or give --name NEW for a new search")
    for flag, key, value in (("--trials", "trials", spec.trials),
                             ("--max-concurrent", "max_concurrent", spec.search.max_concurrent)):
        if state.get(key, value) != value:
            raise UserError(f"{flag} {value}: the search in {state_file.parent} runs "
                            f"{key.replace('_', ' ')} {state[key]}, and Tune resumes it as it "
                            f"was started; leave {flag} out")
    parent_run_id = state["parent_run_id"]
    try:
        client.get_run(parent_run_id)
    except Exception:  # noqa: BLE001 - any lookup failure means the run is gone
        raise UserError(f"--resume: the search's MLflow parent run {parent_run_id} is not in "
                        f"{spec.base.tracking_uri}; use the --tracking-uri it was started "
                        "with") from None
    return parent_run_id


def _run_trial(config: dict[str, Any], *, spec: SearchSpec, parent_run_id: str,
               search_dir: str) -> None:
    """One trial: train ``config`` with Ray Train into this trial's MLflow child run, through
    the same run lifecycle as ``distrib-rda train``."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from distrib_rda.data import ensure_converted
    from distrib_rda.training import build_trainer

    context = tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    cfg = spec.trial_config(config).replace(name=f"{spec.name}-{trial_id}")
    run_key = f"{parent_run_id}/{trial_id}"

    done = tracking.finished_result(cfg, run_key)
    if done is not None:
        # Tune's saved state predates this trial's end: report its result, do not retrain.
        tune.report(done)
        return

    beton_dir = ensure_converted(cfg.dataset, data_root=cfg.data_root, download=cfg.download,
                                 cache_dir=cfg.cache_dir, image_size=cfg.image_size)
    run = tracking.TrackedRun.start(cfg, run_key=run_key, run_name=trial_name,
                                    parent_run_id=parent_run_id, beton_dir=beton_dir)
    run.client.set_tag(run.run_id, TRIAL_TAG, trial_id)
    trainer = build_trainer(cfg, callbacks=[run.callback(), TuneReportCallback()],
                            storage_path=Path(search_dir) / "trials", name=trial_id)
    started = time.time()
    result = run.fit(trainer, what=f"trial {trial_name}")
    _, state = run.finish(result.checkpoint, started=started)
    last = state["history"][-1]
    # The final epoch once more, read from the checkpoint: a trial resumed after its last
    # epoch was checkpointed trains nothing, and Tune must still see its result.
    tune.report({key: value for key, value in last.items() if isinstance(value, (int, float))})


def finish_search(spec: SearchSpec, parent_run_id: str, search_dir: Path, *,
                  errored: int = 0, trial_ids: set[str] | None = None) -> dict[str, Any]:
    """Compute the front over the search's finished children and record it on the parent:
    ``pareto.png``, ``pareto.json``, and the tag ``pareto=true`` on the front's children.
    With ``trial_ids`` (Tune's trials), unfinished children of other trials are retired."""
    cfg = spec.base
    client = tracking.client_for(cfg.tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    lost = _retire_lost_trials(client, experiment_id, parent_run_id, trial_ids)
    metrics = list(dict.fromkeys([*spec.metrics, "accuracy", "sparsity"]))
    points = finished_runs(client, experiment_id, parent_run_id=parent_run_id,
                           metrics=tuple(metrics))
    front = front_of(points, spec.metrics, spec.modes)
    members = set(front)
    for i, point in enumerate(points):
        if i in members:
            client.set_tag(point.run_id, "pareto", "true")
        elif "pareto" in point.tags:
            client.delete_tag(point.run_id, "pareto")

    y_metric, x_metric = spec.metrics  # plotted as in the paper: sparsity across, accuracy up
    y_mode, x_mode = spec.modes
    plot_points = [{x_metric: p.metrics[x_metric], y_metric: p.metrics[y_metric],
                    "knob": p.knob} for p in points]
    png = search_dir / "pareto.png"
    if points:
        title = (f"{cfg.experiment}: Pareto front of {len(points)} trials\n"
                 f"{cfg.model} on {cfg.dataset}, search '{spec.name}'")
        plot_search(plot_points, front, x=x_metric, y=y_metric, modes=(x_mode, y_mode),
                    title=title, out=png)
        client.log_artifact(parent_run_id, str(png))
    payload = {
        "experiment": cfg.experiment, "search": spec.name, "parent_run_id": parent_run_id,
        "objectives": [o.model_dump() for o in spec.objectives],
        "trials_finished": len(points), "trials_errored": errored,
        "front": [points[i].as_dict() for i in front],
    }
    client.log_dict(parent_run_id, payload, "pareto.json")
    (search_dir / "pareto.json").write_text(json.dumps(payload, indent=2))
    client.log_metric(parent_run_id, "trials_finished", len(points))
    client.log_metric(parent_run_id, "pareto_size", len(front))
    client.set_tag(parent_run_id, "search.trials_errored", str(errored))
    client.set_terminated(parent_run_id, status="FINISHED")

    console = Console(width=max(Console().width, 140))
    if points:
        console.print(front_table(f"search '{spec.name}': Pareto front, {len(front)} of "
                                  f"{len(points)} finished trials", points, front))
    if lost:
        console.print(f"[yellow]{len(lost)} unfinished trial(s) started just before the search "
                      "was killed were not in Tune's last saved state, and Tune ran others in "
                      f"their place; their MLflow runs are deleted (restore with: mlflow runs "
                      f"restore --run-id ID): {', '.join(lost)}[/yellow]")
    if errored:
        console.print(f"[yellow]{errored} trial(s) failed; their errors are in "
                      f"{search_dir}; --resume retries them[/yellow]")
    console.print(f"MLflow parent run {parent_run_id} (experiment '{cfg.experiment}'): "
                  f"pareto.png, pareto.json; view with: "
                  f"{tracking.ui_hint(cfg.tracking_uri, experiment_id, parent_run_id)}")
    return {"parent_run_id": parent_run_id, "search_dir": str(search_dir),
            "trials": len(trial_ids) if trial_ids is not None else len(points),
            "finished": len(points), "errored": errored, "lost": lost,
            "front": payload["front"]}


def _retire_lost_trials(client, experiment_id: str, parent_run_id: str,
                        trial_ids: set[str] | None) -> list[str]:
    """A trial started in the seconds between Tune's last state snapshot and a kill is not
    resumed: Tune samples a new trial in its place. Its unfinished child run would stay RUNNING
    forever beside the parent's real trials, so it is soft-deleted (MLflow can restore it)."""
    if trial_ids is None:
        return []
    children = client.search_runs([experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    lost = [run.info.run_id for run in children
            if run.data.tags.get(TRIAL_TAG) not in trial_ids and run.info.status != "FINISHED"]
    for run_id in lost:
        client.set_tag(run_id, "distrib_rda.lost_trial",
                       "started just before the search was killed; not in Tune's saved state")
        client.set_terminated(run_id, status="KILLED")
        client.delete_run(run_id)
    return lost
