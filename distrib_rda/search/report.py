"""Reading finished runs from MLflow, and ``distrib-rda pareto``: fronts as tables and a plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from distrib_rda import tracking
from distrib_rda.errors import UserError
from distrib_rda.search.pareto import non_dominated, plot_fronts

PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "distrib_rda.role"  # "search" on a search's parent run
TRIAL_TAG = "distrib_rda.trial_id"


@dataclass
class RunPoint:
    """A finished run's final metrics and its params, as MLflow holds them."""

    run_id: str
    run_name: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def optimizer(self) -> str:
        return self.params.get("optimizer") or self.tags.get("optimizer", "")

    @property
    def knob(self) -> tuple[str, float] | None:
        """The key that drives this run's sparsity and its value (``None``: a dense run)."""
        from distrib_rda.optimizers import OPTIMIZERS

        if self.optimizer not in OPTIMIZERS:
            return None
        return OPTIMIZERS[self.optimizer].knob(self.params)

    def knob_text(self) -> str:
        """``"lambda 0.0008"``, ``"target 95%"``, or ``"-"``."""
        if self.knob is None:
            return "-"
        key, value = self.knob
        return f"target {value:.4g}" if key == "target_sparsity" else f"lambda {value:.3g}"

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_name": self.run_name,
                "trial_id": self.tags.get(TRIAL_TAG), "params": self.params,
                "metrics": self.metrics}


def _all_runs(client: MlflowClient, experiment_id: str, filter_string: str = ""):
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string,
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def finished_runs(client: MlflowClient, experiment_id: str, *,
                  parent_run_id: str | None = None,
                  metrics: tuple[str, ...] = ("accuracy", "sparsity")) -> list[RunPoint]:
    """Finished runs holding final values of ``metrics``, oldest first. Parent runs of
    searches are skipped; with ``parent_run_id``, only that search's children are kept."""
    filter_string = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else ""
    runs = list(_all_runs(client, experiment_id, filter_string))
    parents = {run.data.tags.get(PARENT_TAG) for run in runs}
    points = []
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        tags = run.data.tags
        if (run.info.status != "FINISHED" or run.info.run_id in parents
                or tags.get(ROLE_TAG) == "search"
                or not all(metric in run.data.metrics for metric in metrics)):
            continue
        points.append(RunPoint(run_id=run.info.run_id,
                               run_name=run.info.run_name or run.info.run_id[:8],
                               params=dict(run.data.params), metrics=dict(run.data.metrics),
                               tags=dict(tags)))
    return points


def front_of(points: list[RunPoint], metrics: list[str], modes: list[str]) -> list[int]:
    return non_dominated([[p.metrics[m] for m in metrics] for p in points], modes)


def front_table(title: str, points: list[RunPoint], front: list[int]) -> Table:
    """The front's runs, best accuracy first, each with the knob that drives its sparsity
    (lambda, or the target sparsity RDA and GMP are given; none for dense SGD)."""
    table = Table(title=title, title_justify="left")
    table.add_column("run name", overflow="fold")
    table.add_column("optimizer")
    table.add_column("knob", justify="right")
    table.add_column("sparsity", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("run id", no_wrap=True, min_width=32)
    for i in sorted(front, key=lambda i: -points[i].metrics["accuracy"]):
        point = points[i]
        table.add_row(point.run_name, point.optimizer, point.knob_text(),
                      f"{point.metrics['sparsity']:.2%}", f"{point.metrics['accuracy']:.2%}",
                      point.run_id)
    return table


def experiment_id_for(client: MlflowClient, name: str, *, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        known = sorted(e.name for e in client.search_experiments(max_results=1000))
        raise UserError(f"experiment {name!r}: no such MLflow experiment at {tracking_uri} "
                        f"(experiments there: {', '.join(known) or 'none'})")
    return experiment.experiment_id


def pareto_report(experiments: list[str], *, tracking_uri: str = "sqlite:///mlflow.db",
                  out: Path | str | None = None, force: bool = False,
                  console: Console | None = None) -> dict[str, list[dict[str, Any]]]:
    """Print each experiment's sparsity/accuracy front (both maximized) and, with ``out``,
    plot the fronts overlaid (an image type matplotlib writes, by its suffix; an existing
    file is replaced only with ``force``). Every finished run with final ``accuracy`` and
    ``sparsity`` counts: a search's trials and single ``train`` runs alike; a search's parent
    run does not. The store is read, never created (``MLFLOW_TRACKING_URI`` replaces the
    default ``tracking_uri``).

    Returns ``{experiment: [front member, ...]}``, each member as :meth:`RunPoint.as_dict`.
    """
    from distrib_rda.preflight import check_pareto
    from distrib_rda.terminal import quiet_mlflow

    tracking_uri = tracking.default_tracking_uri(tracking_uri)
    if not check_pareto(tracking_uri, out, force=force):  # a database URI only MLflow can read
        tracking.check_reachable(tracking_uri)
    quiet_mlflow()
    client = tracking.client_for(tracking_uri)
    console = console or Console(width=max(Console().width, 140))
    names = list(dict.fromkeys(experiments))
    ids = {name: experiment_id_for(client, name, tracking_uri=tracking_uri) for name in names}
    runs: dict[str, list[RunPoint]] = {}
    fronts: dict[str, list[int]] = {}
    result: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        points = finished_runs(client, ids[name])
        if not points:
            console.print(f"[yellow]{name}: no finished runs with accuracy and sparsity "
                          "metrics[/yellow]")
            continue
        front = front_of(points, ["accuracy", "sparsity"], ["max", "max"])
        runs[name], fronts[name] = points, front
        console.print(front_table(f"{name}: Pareto front, {len(front)} of {len(points)} runs",
                                  points, front))
        result[name] = [points[i].as_dict() for i in front]
    if not runs:
        raise UserError(f"--experiment {', '.join(names)}: no finished run has both accuracy "
                        "and sparsity metrics; train or search first")
    if out is not None:
        plotted = {name: [p.metrics for p in points] for name, points in runs.items()}
        path = plot_fronts(plotted, fronts, out=out, force=force)
        console.print(f"plot: {path}")
    return result
