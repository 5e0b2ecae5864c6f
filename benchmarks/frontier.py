"""Sparsity/accuracy frontier: RDA against magnitude pruning, at the sparsity the user names.

Every run goes through the product, ``distrib-rda train ... --json`` (Ray Train, FFCV, MLflow),
on Fashion-MNIST, into one MLflow experiment per model and method
(``<prefix>-<model>-<method>``), so that later invocations (more seeds, another model) add to
the same table. Every method gets the same epoch budget:

- ``sgd``: dense SGD with momentum and cosine decay, the accuracy reference;
- ``gmp``: gradual magnitude pruning (Zhu & Gupta), the cubic ramp over 10-60% of the run, then
  the mask is trained;
- ``rda``: the product's default, ``distrib-rda train --target-sparsity S``: l1-RDA whose
  threshold follows the cubic ramp to S (its l1 strength is found, not given) for half the
  epochs, then a fixed-mask fine-tune for the other half (the default ``finetune_epochs``).

Printed at the end, read back from the MLflow store: per model, method and target, the mean
accuracy ± the standard deviation over seeds and their number; and RDA − GMP paired by seed
(the mean of the per-seed differences ± their standard deviation). ``distrib-rda pareto`` draws
every method's front, one plot per model.

Runs are made one seed at a time on a real cluster of ``--nodes`` one-CPU nodes started by
``cluster/local.sh`` (and stopped after the seed), one-worker runs ``--nodes`` at a time; with
``--lock FILE`` each seed's cluster lives under ``flock FILE``, so other jobs that start Ray on
the machine take turns with it. A run already finished in the store is not run again.

    .venv/bin/python benchmarks/frontier.py --model lenet5 --seeds 0 1 2 --lock /tmp/ray.lock
    .venv/bin/python benchmarks/frontier.py --model lenet5 --epochs 60 --targets 0.98 \\
        --methods gmp rda --seeds 0 1 2 --lock /tmp/ray.lock
    .venv/bin/python benchmarks/frontier.py --model lenet5 --table-only   # table and plot again
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from mlflow.tracking import MlflowClient

from distrib_rda.search.report import finished_runs

CLI = str(Path(sys.executable).with_name("distrib-rda"))
LOCAL_CLUSTER = Path(__file__).resolve().parents[1] / "cluster" / "local.sh"
TARGETS = (0.90, 0.95, 0.98, 0.99)
DENSE = "sgd"
PAIRED = ("rda", "gmp")  # the difference the table pairs by seed: first minus second


def method_flags(method: str, target: float | None, epochs: int) -> list[str]:
    """The ``distrib-rda train`` flags of one method at one target, for an ``epochs`` budget;
    everything else is the product's default."""
    flags = ["--optimizer", method, "--epochs", str(epochs)]
    return flags if target is None else [*flags, "--target-sparsity", str(target)]


def experiment(args: argparse.Namespace, method: str) -> str:
    return f"{args.prefix}-{args.model}-e{args.epochs}-{method}"


def run_name(args: argparse.Namespace, method: str, target: float | None, seed: int) -> str:
    label = "dense" if target is None else f"s{target:g}"
    return f"{args.model}-e{args.epochs}-{method}-{label}-seed{seed}"


def train(method: str, target: float | None, seed: int, args: argparse.Namespace, *,
          address: str, env: dict[str, str]) -> None:
    """One ``distrib-rda train --json`` run on the cluster at ``address``; the table reads it
    back from MLflow."""
    name = run_name(args, method, target, seed)
    cmd = [CLI, "train", "--json", *method_flags(method, target, args.epochs),
           "--model", args.model, "--dataset", args.dataset, "--seed", str(seed),
           "--workers", "1", "--experiment", experiment(args, method),
           "--tracking-uri", args.tracking_uri, "--storage", str(args.storage),
           "--cache-dir", str(args.cache_dir), "--name", name, "--address", address]
    if args.subset:
        cmd += ["--subset", str(args.subset)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"FAILED {name}: {done.stderr[-2000:]}", file=sys.stderr, flush=True)
        return
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{name}: accuracy {summary['accuracy']:.2%} sparsity {summary['sparsity']:.2%} "
          f"({summary['seconds']:.0f} s)", flush=True)


@contextmanager
def local_cluster(args: argparse.Namespace) -> Iterator[tuple[str, dict[str, str]]]:
    """A real cluster of ``args.nodes`` one-CPU nodes (``cluster/local.sh``) for the time of
    the block, under ``flock args.lock`` if given; yields its address and the environment of a
    client (its token)."""
    state = Path(args.storage) / "cluster"
    lock = open(args.lock, "a") if args.lock else None  # noqa: SIM115 - held for the block
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run([str(LOCAL_CLUSTER), "start", "--workers", str(args.nodes),
                        "--state-dir", str(state)], check=True, stdout=subprocess.DEVNULL)
        try:
            addresses = dict(line.split("=", 1) for line in
                             (state / "addresses").read_text().split())
            env = {**os.environ, "RAY_AUTH_MODE": "token",
                   "RAY_AUTH_TOKEN_PATH": str(state / "auth_token")}
            yield addresses["gcs"], env
        finally:
            subprocess.run([str(LOCAL_CLUSTER), "stop", "--state-dir", str(state)],
                           check=False, stdout=subprocess.DEVNULL)
    finally:
        if lock is not None:
            lock.close()


def finished_names(args: argparse.Namespace) -> set[str]:
    """The names of the runs already finished in the store."""
    client = MlflowClient(args.tracking_uri)
    names = set()
    for method in args.methods:
        found = client.get_experiment_by_name(experiment(args, method))
        if found is not None:
            names |= {point.run_name for point in finished_runs(client, found.experiment_id)}
    return names


def stored_results(args: argparse.Namespace) -> list[dict]:
    """Every finished run of this model's experiments, read back from the store."""
    client = MlflowClient(args.tracking_uri)
    rows = []
    for method in args.methods:
        found = client.get_experiment_by_name(experiment(args, method))
        if found is None:
            continue
        for point in finished_runs(client, found.experiment_id):
            target = point.params.get("target_sparsity")
            rows.append({"method": method, "seed": int(point.params["seed"]),
                         "target": None if method == DENSE else float(target),
                         "accuracy": point.metrics["accuracy"],
                         "sparsity": point.metrics["sparsity"]})
    return rows


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2%} (n=1)"
    return f"{statistics.mean(values):.2%} ± {statistics.stdev(values):.2%} (n={len(values)})"


def table(rows: list[dict], targets: list[float]) -> str:
    """Per method, the accuracy at each target (mean ± sd over seeds, n); then RDA − GMP
    paired by seed; dense SGD in its own line."""
    width = 26
    lines = [f"{'method':<10}" + "".join(f"{f'sparsity {t:.0%}':>{width}}" for t in targets)]
    cells: dict[tuple[str, float | None], dict[int, dict]] = {}
    for row in rows:
        cells.setdefault((row["method"], row["target"]), {})[row["seed"]] = row
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for method in methods:
        if method == DENSE:
            continue
        line = f"{method:<10}"
        for target in targets:
            runs = cells.get((method, target), {})
            line += f"{mean_sd([r['accuracy'] for r in runs.values()]) if runs else '-':>{width}}"
        lines.append(line)
    first, second = PAIRED
    if first in methods and second in methods:
        line = f"{first}-{second:<6}"
        for target in targets:
            a, b = cells.get((first, target), {}), cells.get((second, target), {})
            seeds = sorted(set(a) & set(b))
            diffs = [a[s]["accuracy"] - b[s]["accuracy"] for s in seeds]
            if not diffs:
                text = "-"
            elif len(diffs) == 1:
                text = f"{diffs[0] * 100:+.2f} pt (n=1)"
            else:
                text = (f"{statistics.mean(diffs) * 100:+.2f} ± "
                        f"{statistics.stdev(diffs) * 100:.2f} pt (n={len(diffs)})")
            line += f"{text:>{width}}"
        lines.append(line + "   (paired by seed)")
    dense = cells.get((DENSE, None), {})
    if dense:
        lines.append(f"{'sgd':<10}{mean_sd([r['accuracy'] for r in dense.values()]):>{width}}"
                     "   (dense)")
    sparsities = [abs(r["sparsity"] - r["target"]) for r in rows if r["target"] is not None]
    if sparsities:
        lines.append(f"largest |sparsity - target| over the runs: {max(sparsities):.1e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5",
                        help="lenet5 (default), lenet300, lenet5-caffe, ...")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run (all methods)")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--methods", nargs="+", default=[DENSE, "gmp", "rda"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--subset", type=int, default=None, help="train on the first N images")
    parser.add_argument("--nodes", type=int, default=2,
                        help="one-CPU nodes of the local cluster: runs at once, one worker each")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing; print the table and draw the plot from the store")
    parser.add_argument("--lock", type=Path, default=None,
                        help="hold `flock FILE` while each seed's cluster runs, so that other "
                             "jobs that start Ray on this machine take turns with it")
    parser.add_argument("--prefix", default="frontier")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path('frontier-mlflow.db').absolute()}")
    parser.add_argument("--storage", type=Path, default=Path("frontier-results").absolute())
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/distrib-rda"))
    parser.add_argument("--out", default=None, help="the plot (default: frontier-MODEL-eE.png)")
    args = parser.parse_args()
    jobs = {seed: [(method, None if method == DENSE else target, seed)
                   for method in args.methods
                   for target in ([None] if method == DENSE else args.targets)]
            for seed in args.seeds}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.table_only:
        print(f"the runs stored in {args.tracking_uri}, experiments "
              f"{experiment(args, '*')}", flush=True)
    else:
        half = args.epochs // 2
        print(f"{args.model} on {args.dataset} ({args.subset or 'all'} training images, the "
              f"whole test set), {args.epochs} epochs per run (RDA: {args.epochs - half} + "
              f"{half} fine-tune), batch 128, 1 worker per run, seeds {args.seeds}, "
              f"{sum(map(len, jobs.values()))} runs, {args.nodes} at once", flush=True)
        for seed_jobs in jobs.values():
            done = finished_names(args)
            todo = [job for job in seed_jobs if run_name(args, *job) not in done]
            if not todo:
                continue
            with local_cluster(args) as (address, env), ThreadPoolExecutor(args.nodes) as pool:
                list(pool.map(lambda job: train(*job, args, address=address, env=env), todo))
    methods = list(dict.fromkeys(args.methods))
    out = args.out or f"frontier-{args.model}-e{args.epochs}.png"
    subprocess.run([CLI, "pareto", "--experiment", experiment(args, methods[-1]), "--compare",
                    *(experiment(args, m) for m in methods[:-1]),
                    "--tracking-uri", args.tracking_uri, "--out", out, "--force"], check=False)
    print(f"{args.model}, {args.epochs} epochs: test accuracy at each target sparsity")
    print(table(stored_results(args), sorted(set(args.targets))))


if __name__ == "__main__":
    main()
