"""Where a run's wall time goes besides its epochs: start-up, per-epoch extras and teardown.

Runs the README's main job (``distrib-rda train``, the defaults) with 1 and with 2 workers, and
a 2-trial search (``distrib-rda tune tune/fashion_mnist_lenet5.yaml --trials 2
--max-concurrent 1``: one trial after the other, so each pays its own start), each from a new
working directory (a new MLflow store and results directory, as on a fresh clone; the dataset
cache is the user's, converted once). The figure of merit is the ratio of a run's wall time,
command start to exit, to the sum of the epoch times that the same run reports
(``epoch_seconds``, what its epoch lines print); ``overhead`` is their difference.

The difference is broken down by phase, from three sources, all of the same run:

- the command's own process: it runs as ``distrib-rda`` does (``distrib_rda.cli.console``) under a
  probe that times the driver's steps by wrapping them (pre-flight checks, data and model
  check, MLflow store and run, ``ray.init``, ``fit``, the final MLflow records), and the exit
  handlers (``ray.shutdown`` among them);
- Ray Train's own structured logs in the Ray session (``logs/train/ray-train-sys-*.log``): when
  the controller is up, when the worker group has launched the training function, when rank 0
  reports each checkpoint, when the worker group is shut down;
- the run's MLflow metrics, which the training loop reports: ``epoch_seconds``,
  ``eval_seconds``, ``checkpoint_seconds`` (each epoch), ``setup_seconds`` and
  ``loader_seconds`` (the first epoch: the worker's set-up before its first step, and of it the
  loaders' build and compilation).

Each phase is the median over ``--repeats`` runs; the jobs take turns within a repeat. Only one
Ray instance may run on the machine at a time: with ``--lock FILE`` each run takes ``flock(2)``
on FILE while it runs (not while it is analysed), as ``flock FILE command`` would.

    .venv/bin/python benchmarks/overhead.py --lock /tmp/ray.lock [--repeats 3]
        [--jobs train-1 train-2 tune] [--out /tmp/distrib-rda-overhead]

Every run's output, probe events and phase table are kept under ``--out``.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROBE_ENV = "DISTRIB_RDA_OVERHEAD_PROBE"  # the file a probed command appends its events to
RAY_TMP = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
SEARCH_SPACE = REPO / "tune" / "fashion_mnist_lenet5.yaml"

JOBS = {
    "train-1": ["train", "--workers", "1"],
    "train-2": ["train", "--workers", "2"],
    "tune": ["tune", str(SEARCH_SPACE), "--trials", "2", "--max-concurrent", "1",
             "--name", "overhead"],
}
TITLES = {"train-1": "README job, 1 worker", "train-2": "README job, 2 workers",
          "tune": "search, 2 trials, 1 at a time"}

# The rows of the breakdown, in the order they happen.
PHASES = (
    "interpreter start and imports",
    "driver checks (pre-flight, data, model)",
    "MLflow store check",
    "ray.init (and the cluster's resources)",
    "MLflow run start (creates a new store)",
    "Tune: trial start, scheduling, results",
    "Train controller start",
    "Train worker group start",
    "worker set-up: loaders and their compilation",
    "worker set-up: the rest (model, optimizer)",
    "evaluation (test set, sparsity)",
    "checkpoint write (torch.save)",
    "report and the rest of each epoch",
    "Train finish and teardown",
    "MLflow final records: the model",
    "MLflow final records: the rest",
    "search finish (front, plot)",
    "exit (ray.shutdown and other exit handlers)",
    "exit (interpreter)",
    "not covered by a probe",
)


# --- the probe: runs inside the measured command --------------------------------------------


def _emit(event: dict[str, Any]) -> None:
    line = (json.dumps(event) + "\n").encode()
    fd = os.open(os.environ[PROBE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _timed(name: str, function):
    def wrapper(*args, **kwargs):
        began = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            _emit({"name": name, "t0": began, "t1": time.time()})

    wrapper.__wrapped__ = function
    return wrapper


# (module, attribute path, event name): the driver's steps, wherever the current code has them.
PROBES = (
    ("distrib_rda.preflight", "check_train", "checks"),
    ("distrib_rda.preflight", "check_search", "checks"),
    ("distrib_rda.training.driver", "ensure_converted", "checks"),
    ("distrib_rda.data", "ensure_converted", "checks"),
    ("distrib_rda.training.driver", "check_model", "checks"),
    ("distrib_rda.training.driver", "check_resume", "checks"),
    ("distrib_rda.training.driver", "save_config", "checks"),
    ("distrib_rda.preflight", "check_data", "checks"),
    ("distrib_rda.tracking", "check_reachable", "store_check"),
    ("distrib_rda.training.driver", "connect", "ray_init"),
    ("distrib_rda.training.driver", "check_resources", "ray_init"),
    ("distrib_rda.tracking", "TrackedRun.start", "run_start"),
    ("distrib_rda.search.tune", "_start_parent", "run_start"),
    ("distrib_rda.training.driver", "build_trainer", "build_trainer"),
    ("distrib_rda.tracking", "TrackedRun.fit", "fit"),
    ("ray.tune", "Tuner.fit", "tune_fit"),
    ("distrib_rda.tracking", "TrackedRun.finish", "finish"),
    ("distrib_rda.tracking", "log_pytorch_model", "log_model"),
    ("distrib_rda.search.tune", "finish_search", "finish_search"),
)
# What each command imports before its work (so that its steps can be wrapped); the command
# would import the same, a moment later.
PROBE_IMPORTS = {"train": ("distrib_rda.training.driver",),
                 "tune": ("distrib_rda.search.tune", "distrib_rda.training.driver", "ray.tune")}


def probe(argv: list[str]) -> None:
    """Run ``distrib-rda ARGV`` in this process, as the console script does, timing its
    steps into the file named by the environment variable :data:`PROBE_ENV`."""
    import importlib

    _emit({"name": "probe_start", "t0": time.time()})
    # atexit runs handlers last-in first-out: this one runs after every other, Ray's included.
    atexit.register(lambda: _emit({"name": "exit_handlers_done", "t0": time.time()}))
    import distrib_rda.cli as cli

    for module_name in PROBE_IMPORTS.get(argv[0] if argv else "", ()):
        importlib.import_module(module_name)
    _emit({"name": "imports_done", "t0": time.time()})
    for module_name, path, name in PROBES:
        owner = sys.modules.get(module_name)
        *parents, attribute = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        function = getattr(owner, attribute, None) if owner is not None else None
        if function is None:
            continue
        if isinstance(owner, type) and isinstance(owner.__dict__.get(attribute), classmethod):
            setattr(owner, attribute, classmethod(_timed(name, function.__func__)))
        else:
            setattr(owner, attribute, _timed(name, function))
    try:
        code = cli.main(argv)
    finally:
        _emit({"name": "main_done", "t0": time.time()})
        atexit.register(lambda: _emit({"name": "exit_handlers_start", "t0": time.time()}))
    cli.exit_quickly(code)


# --- one run --------------------------------------------------------------------------------


@contextmanager
def locked(path: str | None):
    """``flock(2)`` on ``path`` for the duration, as ``flock path command`` takes it."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_command(job: str, work: Path, lock: str | None,
                extra: list[str] = ()) -> dict[str, Any]:
    """Run ``job`` in a new directory ``work`` under the probe; return what the parent saw."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    events = work / "probe.jsonl"
    env = {**os.environ, PROBE_ENV: str(events), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", "--", *JOBS[job],
               *extra]
    lines: list[tuple[float, str, str]] = []

    def read(stream, label):
        for line in stream:
            lines.append((time.time(), label, line.rstrip("\n")))

    with locked(lock):
        launched = time.time()
        process = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, bufsize=1)
        readers = [threading.Thread(target=read, args=(process.stdout, "out")),
                   threading.Thread(target=read, args=(process.stderr, "err"))]
        for reader in readers:
            reader.start()
        code = process.wait()
        exited = time.time()
        for reader in readers:
            reader.join()
    (work / "output.txt").write_text(
        "".join(f"{t - launched:8.2f} {label} {line}\n" for t, label, line in lines))
    if code:
        tail = "\n".join(line for _, _, line in lines[-20:])
        sys.exit(f"overhead: {job} failed with exit code {code} (in {work}):\n{tail}")
    return {"job": job, "work": str(work), "pid": process.pid, "launched": launched,
            "exited": exited}


# --- what the run left behind ---------------------------------------------------------------


def probe_events(work: Path) -> dict[str, list[tuple[float, float]]]:
    found: dict[str, list[tuple[float, float]]] = {}
    for line in (work / "probe.jsonl").read_text().splitlines():
        event = json.loads(line)
        found.setdefault(event["name"], []).append((event["t0"], event.get("t1", event["t0"])))
    return found


def total(events: dict[str, list[tuple[float, float]]], name: str) -> float:
    """Seconds spent in ``name``, nested calls (a wrapped function calling another wrapped
    one of the same name) counted once."""
    spans = sorted(events.get(name, []))
    seconds, end = 0.0, float("-inf")
    for t0, t1 in spans:
        if t0 >= end:
            seconds += t1 - t0
            end = t1
        elif t1 > end:
            seconds += t1 - end
            end = t1
    return seconds


def train_logs(pid: int) -> list[dict[str, Any]]:
    """The Train controllers of the Ray session this command started, each with the times
    (seconds since the epoch) of its steps, in order of start."""
    sessions = sorted(RAY_TMP.glob(f"session_*_{pid}"))
    if not sessions:
        return []
    logs = sessions[-1] / "logs" / "train"
    controllers = []
    for path in logs.glob("ray-train-sys-controller-*.log"):
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        if not records:
            continue
        run_name = records[0].get("run_name")
        times = {"up": records[0]["timestamp_ns"] / 1e9, "run_name": run_name}
        for record in records:
            message = record["message"]
            if "Train function launched" in message:
                times["launched"] = record["timestamp_ns"] / 1e9
            elif "Worker group shutdown successful" in message:
                times["group_down"] = record["timestamp_ns"] / 1e9
        times["reports"] = []
        controllers.append(times)
    for path in logs.glob("ray-train-sys-worker-*.log"):
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        reports = [r["timestamp_ns"] / 1e9 for r in records
                   if r.get("world_rank") == 0 and "Copying checkpoint files" in r["message"]]
        for controller in controllers:
            if records and records[0].get("run_name") == controller["run_name"]:
                controller["reports"].extend(reports)
    for controller in controllers:
        controller["reports"].sort()
    return sorted(controllers, key=lambda c: c["up"])


def mlflow_runs(work: Path) -> list[dict[str, Any]]:
    """The training runs in the run's MLflow store (a search's parent left out), with their
    start and end and the loop's timing metrics per epoch."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            if "epoch_seconds" not in run.data.metrics:
                continue
            metrics = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                               key)}
                       for key in ("epoch_seconds", "eval_seconds", "checkpoint_seconds",
                                   "setup_seconds", "loader_seconds")}
            runs.append({"start": run.info.start_time / 1000,
                         "end": (run.info.end_time or 0) / 1000, "metrics": metrics,
                         "name": run.info.run_name})
    return sorted(runs, key=lambda r: r["start"])


def breakdown(seen: dict[str, Any]) -> dict[str, float]:
    """The phases of one run (see the module docstring), in seconds."""
    work = Path(seen["work"])
    events = probe_events(work)
    controllers = train_logs(seen["pid"])
    runs = mlflow_runs(work)
    launched, exited = seen["launched"], seen["exited"]
    phases = dict.fromkeys(PHASES, 0.0)
    phases["interpreter start and imports"] = events["imports_done"][0][0] - launched
    phases["driver checks (pre-flight, data, model)"] = total(events, "checks")
    phases["MLflow store check"] = total(events, "store_check")
    phases["ray.init (and the cluster's resources)"] = total(events, "ray_init")
    phases["MLflow run start (creates a new store)"] = total(events, "run_start")

    epochs = 0.0
    trials = []
    for run in runs:
        metrics = run["metrics"]
        epochs += sum(metrics["epoch_seconds"].values())
        phases["evaluation (test set, sparsity)"] += sum(metrics["eval_seconds"].values())
        phases["checkpoint write (torch.save)"] += sum(metrics["checkpoint_seconds"].values())
        loaders = sum(metrics["loader_seconds"].values())
        phases["worker set-up: loaders and their compilation"] += loaders
        phases["worker set-up: the rest (model, optimizer)"] += \
            sum(metrics["setup_seconds"].values()) - loaders
        controller = next((c for c in controllers if c["run_name"] and
                           run["start"] <= c["up"] <= (run["end"] or exited)), None)
        trials.append((run, controller))

    tune = "tune_fit" in events
    fit_spans = events.get("fit", [])
    for index, (run, controller) in enumerate(trials):
        if controller is None or "launched" not in controller or not controller["reports"]:
            continue
        metrics = run["metrics"]
        if tune:
            began = run["start"]
        else:  # the trainer is built just before fit() is called
            began = min([fit_spans[index][0], *(t0 for t0, _ in events.get("build_trainer", []))])
        phases["Train controller start"] += controller["up"] - began
        phases["Train worker group start"] += controller["launched"] - controller["up"]
        first_step = controller["launched"] + sum(metrics["setup_seconds"].values())
        in_epochs = controller["reports"][-1] - first_step
        phases["report and the rest of each epoch"] += in_epochs - (
            sum(metrics["epoch_seconds"].values()) + sum(metrics["eval_seconds"].values())
            + sum(metrics["checkpoint_seconds"].values()))
        if tune:
            down = controller.get("group_down", run["end"])
            phases["Train finish and teardown"] += down - controller["reports"][-1]
            phases["MLflow final records: the rest"] += run["end"] - down
        else:
            phases["Train finish and teardown"] += fit_spans[index][1] - controller["reports"][-1]
    if tune:
        inside_trials = sum(run["end"] - run["start"] for run in runs)
        phases["Tune: trial start, scheduling, results"] = total(events, "tune_fit") - inside_trials
        phases["search finish (front, plot)"] = total(events, "finish_search")
    else:
        model = total(events, "log_model")
        phases["MLflow final records: the model"] = model
        phases["MLflow final records: the rest"] = total(events, "finish") - model
    exit_start = events.get("exit_handlers_start", events["main_done"])[0][0]
    exit_done = events.get("exit_handlers_done", [(exit_start, 0)])[0][0]
    phases["exit (ray.shutdown and other exit handlers)"] = exit_done - exit_start
    phases["exit (interpreter)"] = exited - exit_done
    wall = exited - launched
    phases["not covered by a probe"] = wall - epochs - sum(phases.values())
    return {"wall": wall, "epochs": epochs, "trials": len(runs), **phases}


# --- the report -----------------------------------------------------------------------------


def machine() -> str:
    """loader.py's machine line (CPU, cores, load, Python, torch), with Ray's and MLflow's."""
    import mlflow
    import ray
    from loader import machine as host  # benchmarks/ is the script's own directory

    return f"{host()}, Ray {ray.__version__}, MLflow {mlflow.__version__}"


def report(results: dict[str, list[dict[str, float]]]) -> str:
    jobs = [job for job in JOBS if results.get(job)]
    median = {job: {key: statistics.median(r[key] for r in results[job])
                    for key in results[job][0]} for job in jobs}
    lines = [f"{'job':34} {'runs':>4} {'wall s':>8} {'epochs s':>9} {'wall/epochs':>12} "
             f"{'overhead s':>11}"]
    for job in jobs:
        ratios = [r["wall"] / r["epochs"] for r in results[job]]
        overheads = [r["wall"] - r["epochs"] for r in results[job]]
        lines.append(f"{TITLES[job]:34} {len(results[job]):4d} {median[job]['wall']:8.1f} "
                     f"{median[job]['epochs']:9.1f} {statistics.median(ratios):12.2f} "
                     f"{statistics.median(overheads):11.1f}")
    lines.append("")
    lines.append(f"{'phase (median s)':46}" + "".join(f"{job:>10}" for job in jobs))
    for phase in ("epochs", *PHASES):
        if all(abs(median[job].get(phase, 0.0)) < 0.05 for job in jobs):
            continue
        label = "epochs (the baseline)" if phase == "epochs" else phase
        lines.append(f"{label:46}" + "".join(f"{median[job][phase]:10.1f}" for job in jobs))
    lines.append(f"{'wall':46}" + "".join(f"{median[job]['wall']:10.1f}" for job in jobs))
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        probe(sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/distrib-rda-overhead"))
    parser.add_argument("--extra", default="", help="flags added to every command, for a "
                                                     "quick check (e.g. '--epochs 2')")
    parser.add_argument("--lock", help="a file to flock(2) while each run runs, such as "
                                       "/tmp/ray.lock")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    commands = " | ".join(" ".join(["distrib-rda", *JOBS[job], args.extra]).strip()
                          for job in args.jobs)
    print(f"commands: {commands}; a new working directory each, {args.repeats} repeats",
          flush=True)
    results: dict[str, list[dict[str, float]]] = {}
    for repeat in range(args.repeats):
        for job in args.jobs:
            work = args.out / f"{job}-{repeat}"
            seen = run_command(job, work, args.lock, args.extra.split())
            phases = breakdown(seen)
            (work / "phases.json").write_text(json.dumps(phases, indent=2))
            results.setdefault(job, []).append(phases)
            print(f"repeat {repeat} {job}: wall {phases['wall']:.1f}s, epochs "
                  f"{phases['epochs']:.1f}s, ratio {phases['wall'] / phases['epochs']:.2f}",
                  flush=True)
    print()
    print(report(results))
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
