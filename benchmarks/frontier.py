"""Sparsity/accuracy frontier on Fashion-MNIST with lenet5: RDA against the baselines.

Every run goes through the product, ``distrib-rda train ... --json`` (Ray Train, DDP, MLflow),
one MLflow experiment per method (``<prefix>-sgd``, ``-gmp``, ``-prox-sgd``, ``-rda``); then
``distrib-rda pareto --experiment <prefix>-rda --compare ... --out frontier.png`` draws all the
fronts in one plot. Every method gets the same epoch budget: RDA runs ``epochs - finetune``
epochs of RDA and then ``finetune`` epochs of fixed-mask fine-tuning (``finetune_epochs``);
GMP prunes over 10-60% of its run and trains the mask for the rest. Printed at the end, per
method: the best accuracy (mean over seeds of one setting) among settings whose mean sparsity
is >= 90%, >= 95% and >= 98%.

    .venv/bin/python benchmarks/frontier.py                # 20 epochs, seed 0, the full grid
    .venv/bin/python benchmarks/frontier.py --epochs 4 --subset 12000 --rda-lambdas 3e-3 \\
        --rda-warmup 30 --prox-lambdas 1e-2 3e-2 --workers 1 --parallel 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CLI = str(Path(sys.executable).with_name("distrib-rda"))
LEVELS = (0.90, 0.95, 0.98)
# GMP masks round(s*N) weights and reports e.g. 94.9992% for a 95% target: count it as 95%.
SPARSITY_SLACK = 1e-3


def grid(args: argparse.Namespace, finetune: int) -> dict[str, list[dict]]:
    """The settings per method (flags of ``distrib-rda train``)."""
    rda_epochs = max(1, args.epochs - finetune)
    rda = [{"lambda": lam, "gamma": args.rda_gamma, "warmup": args.rda_warmup,
            "epochs": rda_epochs, "finetune-epochs": args.epochs - rda_epochs}
           for lam in args.rda_lambdas]
    return {
        "sgd": [{}],
        "gmp": [{"target-sparsity": s} for s in args.gmp_targets],
        "prox-sgd": [{"lambda": lam} for lam in args.prox_lambdas],
        "rda": rda,
    }


def train(method: str, flags: dict, seed: int, args: argparse.Namespace) -> dict:
    """One ``distrib-rda train --json`` run; returns its JSON summary plus the setting."""
    flags = {"epochs": args.epochs, **flags}
    if args.subset:
        flags["subset"] = args.subset
    name = "-".join([method, *(f"{k}{v}" for k, v in sorted(flags.items())), f"s{seed}"])
    cmd = [CLI, "train", "--json", "--optimizer", method, "--model", "lenet5",
           "--dataset", "fashion-mnist", "--seed", str(seed), "--workers", str(args.workers),
           "--experiment", f"{args.prefix}-{method}", "--tracking-uri", args.tracking_uri,
           "--storage", str(args.storage), "--cache-dir", str(args.cache_dir), "--name", name]
    for key, value in flags.items():
        cmd += [f"--{key}", str(value)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"FAILED {name}: {done.stderr[-2000:]}", file=sys.stderr, flush=True)
        return {"method": method, "setting": flags, "seed": seed, "failed": True}
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    summary.update(method=method, setting=flags, seed=seed,
                   wall=time.perf_counter() - started)
    print(f"{name}: accuracy {summary['accuracy']:.2%} sparsity {summary['sparsity']:.2%} "
          f"({summary['wall']:.0f}s)", flush=True)
    return summary


def table(results: list[dict]) -> str:
    """Per method, the best mean accuracy among settings with mean sparsity >= each level."""
    by_setting: dict[tuple, list[dict]] = {}
    for r in results:
        if not r.get("failed"):
            by_setting.setdefault((r["method"], json.dumps(r["setting"], sort_keys=True)),
                                  []).append(r)
    lines = [f"{'method':<10}" + "".join(f"  acc@sp>={lvl:.0%}" for lvl in LEVELS)
             + "   settings (sparsity, accuracy: mean over seeds)"]
    for method in dict.fromkeys(r["method"] for r in results):
        points = []
        for (m, setting), runs in by_setting.items():
            if m == method:
                points.append((statistics.mean(r["sparsity"] for r in runs),
                               statistics.mean(r["accuracy"] for r in runs), setting, len(runs)))
        cells = []
        for level in LEVELS:
            ok = [acc for sp, acc, _, _ in points if sp >= level - SPARSITY_SLACK]
            cells.append(f"{max(ok):>13.2%}" if ok else f"{'-':>13}")
        shown = "; ".join(f"{s} -> {sp:.1%}, {acc:.2%} (n={n})"
                          for sp, acc, s, n in sorted(points))
        lines.append(f"{method:<10}" + "  ".join([""] + cells) + "   " + shown)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run (all methods)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--finetune", type=int, default=None,
                        help="RDA's fine-tune epochs within the budget (default: epochs // 5)")
    parser.add_argument("--methods", nargs="+", default=["sgd", "gmp", "prox-sgd", "rda"])
    parser.add_argument("--subset", type=int, default=None, help="train on the first N images")
    parser.add_argument("--gmp-targets", type=float, nargs="+", default=list(LEVELS))
    parser.add_argument("--prox-lambdas", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--rda-lambdas", type=float, nargs="+", default=[5e-4, 8e-4, 1.2e-3])
    parser.add_argument("--rda-gamma", type=float, default=0.3)
    parser.add_argument("--rda-warmup", type=float, default=300)
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--workers", type=int, default=2, help="DDP workers per run")
    parser.add_argument("--prefix", default="frontier")
    parser.add_argument("--tracking-uri", default="sqlite:///frontier-mlflow.db")
    parser.add_argument("--storage", type=Path, default=Path("frontier-results").absolute())
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/distrib-rda"))
    parser.add_argument("--out", default="frontier.png")
    args = parser.parse_args()
    finetune = args.epochs // 5 if args.finetune is None else args.finetune
    settings = grid(args, finetune)
    jobs = [(method, flags, seed) for method in args.methods for flags in settings[method]
            for seed in args.seeds]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"lenet5 on fashion-mnist ({args.subset or 'all'} training images, the whole test"
          f" set), {args.epochs} epochs per run (RDA: {args.epochs - finetune}"
          f" + {finetune} fine-tune), batch 128, {args.workers} workers, seeds {args.seeds}, "
          f"{len(jobs)} runs, {args.parallel} at once", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: train(*job, args), jobs))
    methods = list(dict.fromkeys(args.methods))
    subprocess.run([CLI, "pareto", "--experiment", f"{args.prefix}-{methods[-1]}", "--compare",
                    *(f"{args.prefix}-{m}" for m in methods[:-1]),
                    "--tracking-uri", args.tracking_uri, "--out", args.out], check=False)
    print(table(results))


if __name__ == "__main__":
    main()
