"""Sparsity/accuracy frontier on Fashion-MNIST (lenet5, or --model): RDA against the baselines.

Every run goes through the product, ``distrib-rda train ... --json`` (Ray Train, DDP, MLflow),
one MLflow experiment per method (``<prefix>-sgd``, ``-gmp``, ``-prox-sgd``, ``-rda``,
``-rda-target``); then ``distrib-rda pareto --experiment <prefix>-<last method> --compare <the
others> --out frontier.png`` draws all the fronts in one plot. Every method gets the same epoch
budget: RDA runs ``epochs - finetune`` epochs of RDA and then ``finetune`` epochs of fixed-mask
fine-tuning (``finetune_epochs``); GMP prunes over 10-60% of its run and trains the mask for
the rest. ``rda-target`` is RDA at a smaller lambda whose iterate is cut to a target sparsity
(``--target-sparsity``: the l1 threshold raised, i.e. global magnitude of the RDA iterate)
before the same fine-tune. Printed at the end, per method: the best accuracy (mean over seeds
of one setting, its standard deviation and the number of seeds) among settings whose mean
sparsity is >= 90%, >= 95% and >= 98%, read back from the MLflow store, so that later
invocations (more seeds) add to the same table. RDA's runs appear twice: after the fine-tune,
and as "rda (no fine-tune)" at their last RDA epoch.

    .venv/bin/python benchmarks/frontier.py                # 20 epochs, seed 0, the full grid
    # two runs at once, sharing one Ray cluster:
    .venv/bin/ray start --head --num-cpus 2 --port 6390
    .venv/bin/python benchmarks/frontier.py --workers 1 --parallel 2 --address 127.0.0.1:6390
    # more seeds for some settings, into the same store; the table covers both calls:
    .venv/bin/python benchmarks/frontier.py --methods gmp rda --gmp-targets 0.95 0.98 \\
        --rda-lambdas 6e-4 1.1e-3 --seeds 1 2 --workers 1 --parallel 2 --address 127.0.0.1:6390
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlflow.tracking import MlflowClient

from distrib_rda.search.report import finished_runs

CLI = str(Path(sys.executable).with_name("distrib-rda"))
LEVELS = (0.90, 0.95, 0.98)
# A method is an optimizer, or one of these settings of one, with its own experiment.
OPTIMIZER = {"rda-target": "rda"}
# GMP masks round(s*N) weights and reports e.g. 94.9992% for a 95% target: count it as 95%.
SPARSITY_SLACK = 1e-4


def grid(args: argparse.Namespace, finetune: int) -> dict[str, list[dict]]:
    """The settings per method (flags of ``distrib-rda train``)."""
    rda_epochs = max(1, args.epochs - finetune)
    rda = {"gamma": args.rda_gamma, "warmup": args.rda_warmup, "epochs": rda_epochs,
           "finetune-epochs": args.epochs - rda_epochs}
    return {
        "sgd": [{}],
        "gmp": [{"target-sparsity": s} for s in args.gmp_targets],
        "prox-sgd": [{"lambda": lam} for lam in args.prox_lambdas],
        "rda": [{"lambda": lam, **rda} for lam in args.rda_lambdas],
        "rda-target": [{"lambda": lam, "target-sparsity": s, **rda}
                       for s, lam in args.rda_targets],
    }


def target_and_lambda(text: str) -> tuple[float, float]:
    """``--rda-targets`` items: ``SPARSITY:LAMBDA``, e.g. ``0.98:4e-4``."""
    try:
        sparsity, lam = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected SPARSITY:LAMBDA such as 0.98:4e-4, got {text!r}") from None
    return sparsity, lam


def train(method: str, flags: dict, seed: int, args: argparse.Namespace) -> None:
    """One ``distrib-rda train --json`` run into the ``<prefix>-<method>`` experiment; the
    table reads it back from MLflow (:func:`stored_results`)."""
    flags = {"epochs": args.epochs, **flags}
    if args.subset:
        flags["subset"] = args.subset
    name = "-".join([method, *(f"{k}{v}" for k, v in sorted(flags.items())), f"s{seed}"])
    cmd = [CLI, "train", "--json", "--optimizer", OPTIMIZER.get(method, method),
           "--model", args.model, "--dataset", "fashion-mnist", "--seed", str(seed),
           "--workers", str(args.workers),
           "--experiment", f"{args.prefix}-{method}", "--tracking-uri", args.tracking_uri,
           "--storage", str(args.storage / args.prefix), "--cache-dir", str(args.cache_dir),
           "--name", name]
    if args.address:
        cmd += ["--address", args.address]
    for key, value in flags.items():
        cmd += [f"--{key}", str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"FAILED {name}: {done.stderr[-2000:]}", file=sys.stderr, flush=True)
        return
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{name}: accuracy {summary['accuracy']:.2%} sparsity {summary['sparsity']:.2%}",
          flush=True)


def stored_results(args: argparse.Namespace) -> list[dict]:
    """Every finished run of the ``<prefix>-<method>`` experiments, read back from MLflow, so
    that the table covers all invocations that wrote into the same store (e.g. more seeds)."""
    client = MlflowClient(args.tracking_uri)
    results = []
    for method in args.methods:
        experiment = client.get_experiment_by_name(f"{args.prefix}-{method}")
        if experiment is None:
            continue
        for point in finished_runs(client, experiment.experiment_id):
            setting = re.sub(r"-s\d+$", "", point.run_name).removeprefix(f"{method}-")
            row = {"method": method, "setting": setting or "defaults",
                   "seed": int(point.params.get("seed", 0)),
                   "accuracy": point.metrics["accuracy"], "sparsity": point.metrics["sparsity"]}
            results.append(row)
            if method == "rda" and int(point.params.get("finetune_epochs", 0)) > 0:
                # The same run before its fine-tune: the metrics of its last RDA epoch.
                last = int(point.params["epochs"])
                before = {metric: {m.step: m.value for m in
                                   client.get_metric_history(point.run_id, metric)}.get(last)
                          for metric in ("accuracy", "sparsity")}
                if None not in before.values():
                    results.append({**row, **before, "method": f"{method} (no fine-tune)"})
    return results


def table(results: list[dict]) -> str:
    """Per method, the best mean accuracy among settings with mean sparsity >= each level,
    with the standard deviation over seeds and their number."""
    by_setting: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        by_setting.setdefault((r["method"], r["setting"]), []).append(r)
    width = 22
    lines = [f"{'method':<19}" + "".join(f"{f'acc@sp>={lvl:.0%}':>{width}}" for lvl in LEVELS)]
    details = []
    for method in dict.fromkeys(r["method"] for r in results):
        points = []
        for (m, setting), runs in by_setting.items():
            if m == method:
                accs = [r["accuracy"] for r in runs]
                spread = statistics.stdev(accs) if len(accs) > 1 else float("nan")
                points.append((statistics.mean(r["sparsity"] for r in runs),
                               statistics.mean(accs), spread, len(runs), setting))
        cells = []
        for level in LEVELS:
            ok = [pt for pt in points if pt[0] >= level - SPARSITY_SLACK]
            if ok:
                _, acc, spread, n, _ = max(ok, key=lambda pt: pt[1])
                cells.append(f"{acc:.2%} ±{spread:.2%} n={n}" if n > 1 else f"{acc:.2%} n=1")
            else:
                cells.append("-")
        lines.append(f"{method:<19}" + "".join(f"{cell:>{width}}" for cell in cells))
        for sp, acc, spread, n, setting in sorted(points):
            seeds = sorted(r["seed"] for r in by_setting[(method, setting)])
            sd = f" ±{spread:.2%}" if n > 1 else ""
            details.append(f"  {method:<19} {setting}: sparsity {sp:.2%}, accuracy {acc:.2%}{sd}"
                           f" (seeds {seeds})")
    return "\n".join(lines + ["", "settings (mean over seeds, ± standard deviation):"] + details)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run (all methods)")
    parser.add_argument("--model", default="lenet5", help="lenet5 (default) or lenet300, ...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--finetune", type=int, default=None,
                        help="RDA's fine-tune epochs within the budget (default: epochs // 2)")
    parser.add_argument("--methods", nargs="+",
                        default=["sgd", "gmp", "prox-sgd", "rda", "rda-target"])
    parser.add_argument("--subset", type=int, default=None, help="train on the first N images")
    parser.add_argument("--gmp-targets", type=float, nargs="+", default=list(LEVELS))
    parser.add_argument("--prox-lambdas", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--rda-lambdas", type=float, nargs="+",
                        default=[4.5e-4, 6e-4, 9e-4, 1.1e-3])
    parser.add_argument("--rda-targets", type=target_and_lambda, nargs="+",
                        default=[(0.95, 2e-4), (0.98, 4e-4)], metavar="SPARSITY:LAMBDA",
                        help="rda-target: RDA at LAMBDA, cut to SPARSITY before the fine-tune")
    parser.add_argument("--rda-gamma", type=float, default=0.15)
    parser.add_argument("--rda-warmup", type=float, default=1000)
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--address", default=None,
                        help="a running Ray cluster for every run (needed for --parallel > 1: "
                             "one cluster, not one Ray instance per run)")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing; print the table and draw the plot from the store")
    parser.add_argument("--workers", type=int, default=2, help="DDP workers per run")
    parser.add_argument("--prefix", default="frontier")
    parser.add_argument("--tracking-uri", default="sqlite:///frontier-mlflow.db")
    parser.add_argument("--storage", type=Path, default=Path("frontier-results").absolute())
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/distrib-rda"))
    parser.add_argument("--out", default="frontier.png")
    args = parser.parse_args()
    finetune = args.epochs // 2 if args.finetune is None else args.finetune
    settings = grid(args, finetune)
    jobs = [(method, flags, seed) for method in args.methods for flags in settings[method]
            for seed in args.seeds]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.table_only:
        print(f"the runs stored in {args.tracking_uri}, experiments {args.prefix}-*", flush=True)
    else:
        print(f"{args.model} on fashion-mnist ({args.subset or 'all'} training images, the whole"
              f" test set), {args.epochs} epochs per run (RDA: {args.epochs - finetune}"
              f" + {finetune} fine-tune), batch 128, {args.workers} workers, seeds {args.seeds}, "
              f"{len(jobs)} runs, {args.parallel} at once", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda job: train(*job, args), jobs))
    methods = list(dict.fromkeys(args.methods))
    subprocess.run([CLI, "pareto", "--experiment", f"{args.prefix}-{methods[-1]}", "--compare",
                    *(f"{args.prefix}-{m}" for m in methods[:-1]),
                    "--tracking-uri", args.tracking_uri, "--out", args.out], check=False)
    print(table(stored_results(args)))


if __name__ == "__main__":
    main()
