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

    .venv/bin/ray start --head --num-cpus 2 --port 6390 --disable-usage-stats
    .venv/bin/python benchmarks/frontier.py --model lenet5 --seeds 0 1 2 \\
        --workers 1 --parallel 2 --address 127.0.0.1:6390
    .venv/bin/python benchmarks/frontier.py --model lenet5 --epochs 60 --targets 0.98 \\
        --methods gmp rda --seeds 0 1 2 --workers 1 --parallel 2 --address 127.0.0.1:6390
    .venv/bin/python benchmarks/frontier.py --model lenet5 --table-only   # table and plot again
    # one run at a time, each with its own Ray instance, taking turns with other Ray jobs:
    .venv/bin/python benchmarks/frontier.py --model lenet5 --workers 2 --lock /tmp/ray.lock
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlflow.tracking import MlflowClient

from distrib_rda.search.report import finished_runs

CLI = str(Path(sys.executable).with_name("distrib-rda"))
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


def train(method: str, target: float | None, seed: int, args: argparse.Namespace) -> None:
    """One ``distrib-rda train --json`` run; the table reads it back from MLflow."""
    label = "dense" if target is None else f"s{target:g}"
    name = f"{args.model}-e{args.epochs}-{method}-{label}-seed{seed}"
    cmd = [CLI, "train", "--json", *method_flags(method, target, args.epochs),
           "--model", args.model, "--dataset", args.dataset, "--seed", str(seed),
           "--workers", str(args.workers), "--experiment", experiment(args, method),
           "--tracking-uri", args.tracking_uri, "--storage", str(args.storage),
           "--cache-dir", str(args.cache_dir), "--name", name]
    if args.address:
        cmd += ["--address", args.address]
    if args.subset:
        cmd += ["--subset", str(args.subset)]
    if args.lock:  # one Ray instance on the machine at a time: each run takes the lock
        cmd = ["flock", str(args.lock), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"FAILED {name}: {done.stderr[-2000:]}", file=sys.stderr, flush=True)
        return
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{name}: accuracy {summary['accuracy']:.2%} sparsity {summary['sparsity']:.2%} "
          f"({summary['seconds']:.0f} s)", flush=True)


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
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--address", default=None,
                        help="a running Ray cluster for every run (needed for --parallel > 1: "
                             "one cluster, not one Ray instance per run)")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing; print the table and draw the plot from the store")
    parser.add_argument("--workers", type=int, default=1, help="DDP workers per run")
    parser.add_argument("--lock", type=Path, default=None,
                        help="run each training under `flock FILE`, so that other jobs that "
                             "start Ray on this machine take turns with it")
    parser.add_argument("--prefix", default="frontier")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path('frontier-mlflow.db').absolute()}")
    parser.add_argument("--storage", type=Path, default=Path("frontier-results").absolute())
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/distrib-rda"))
    parser.add_argument("--out", default=None, help="the plot (default: frontier-MODEL-eE.png)")
    args = parser.parse_args()
    jobs = [(method, None if method == DENSE else target, seed)
            for method in args.methods for target in ([None] if method == DENSE else args.targets)
            for seed in args.seeds]
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
              f"{half} fine-tune), batch 128, {args.workers} worker(s), seeds {args.seeds}, "
              f"{len(jobs)} runs, {args.parallel} at once", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda job: train(*job, args), jobs))
    methods = list(dict.fromkeys(args.methods))
    out = args.out or f"frontier-{args.model}-e{args.epochs}.png"
    subprocess.run([CLI, "pareto", "--experiment", experiment(args, methods[-1]), "--compare",
                    *(experiment(args, m) for m in methods[:-1]),
                    "--tracking-uri", args.tracking_uri, "--out", out, "--force"], check=False)
    print(f"{args.model}, {args.epochs} epochs: test accuracy at each target sparsity")
    print(table(stored_results(args), sorted(set(args.targets))))


if __name__ == "__main__":
    main()
