"""Where the machine's CPU goes while Ray Train workers train: 1 worker against 2.

Runs ``distrib-rda train`` (a local Ray instance, as a user starts it) with 1 and then 2
workers, and samples every thread of every process on the machine once a second (psutil).
Over the seconds in which the workers' training threads run, it adds up the CPU time of:

- the training threads (in each worker, the thread that runs the training function: the one
  with the most CPU time);
- the workers' other threads (the actor's main thread, FFCV loader threads, gloo);
- Ray's other actors (the Train controller, its helpers, idle pooled workers), Ray's
  services (raylet, GCS, dashboard, agents), the driver, this sampler, everything else;
- idle and steal, from the kernel's per-machine counters.

A worker's training thread that gets less than a whole core is what keeps 2 workers from twice
the throughput of 1 on a machine with as many cores as workers.

    .venv/bin/python benchmarks/cpu_share.py [--model resnet20] [--subset 8192] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

import psutil

from distrib_rda.models import MODELS

GROUPS = ("training threads", "workers' other threads", "other Ray actors", "Ray services",
          "driver", "this sampler", "other")


def thread_times() -> dict[tuple[int, int], tuple[str, float]]:
    """CPU seconds of every thread on the machine, keyed by (pid, tid), with its process title."""
    times = {}
    for process in psutil.process_iter(["cmdline", "name"]):
        try:
            title = " ".join(process.info["cmdline"] or [process.info["name"] or ""])
            for thread in process.threads():
                times[(process.pid, thread.id)] = (title, thread.user_time + thread.system_time)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return times


def group(title: str, pid: int, driver: int) -> str:
    if pid == os.getpid():
        return "this sampler"
    if pid == driver:
        return "driver"
    if title.startswith("ray::RayTrainWorker"):
        return "worker"
    if title.startswith("ray::"):
        return "other Ray actors"
    if "/ray/" in title or title.startswith("ray-"):
        return "Ray services"
    return "other"


def measure(args: argparse.Namespace, workers: int, work: Path) -> tuple[dict[str, float], float]:
    """Core-seconds per group and the window's wall seconds, for one run with ``workers``."""
    command = [str(Path(sys.executable).parent / "distrib-rda"), "train", "--model", args.model,
               "--subset", str(args.subset), "--epochs", str(args.epochs), "--workers",
               str(workers), "--batch-size", str(args.batch_size), "--loader-workers", "1",
               "--storage", str(work / "results"), "--experiment", "cpu-share",
               "--tracking-uri", f"sqlite:///{work}/mlflow.db", "--name", f"workers-{workers}"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = []
    while driver.poll() is None:
        samples.append((time.perf_counter(), psutil.cpu_times(), thread_times()))
        time.sleep(1.0)
    if driver.returncode:
        sys.exit(f"cpu_share: `{' '.join(command)}` failed with exit code {driver.returncode}")

    totals: Counter[str] = Counter()
    wall = 0.0
    for (t0, cpu0, before), (t1, cpu1, after) in pairwise(samples):
        used: Counter[str] = Counter()
        per_worker: dict[int, list[float]] = {}
        for (pid, tid), (title, seconds) in after.items():
            delta = seconds - before.get((pid, tid), ("", 0.0))[1]  # a new thread: all of it
            kind = group(title, pid, driver.pid)
            if kind == "worker":
                per_worker.setdefault(pid, []).append(delta)
            else:
                used[kind] += delta
        training = sum(max(deltas) for deltas in per_worker.values())
        if len(per_worker) < workers or training < 0.5 * workers * (t1 - t0):
            continue  # start-up, shutdown, or a pause: not the training window
        used["training threads"] += training
        used["workers' other threads"] += sum(sum(d) - max(d) for d in per_worker.values())
        used["idle"] += ((cpu1.idle - cpu0.idle) + (cpu1.iowait - cpu0.iowait)
                         + (cpu1.steal - cpu0.steal))
        totals.update(used)
        wall += t1 - t0
    return dict(totals), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", choices=list(MODELS))
    parser.add_argument("--subset", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    cores = psutil.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="cpu-share-"))
    runs = {workers: measure(args, workers, work) for workers in (1, 2)}

    print(f"{args.model} on fashion-mnist, {args.subset} images, {args.epochs} epochs, global "
          f"batch {args.batch_size}, {cores} cores; CPU over the seconds the training threads "
          "run\n")
    print("| where | 1 worker | 2 workers |\n| --- | --- | --- |")
    for kind in (*GROUPS, "idle"):
        cells = [f"{totals.get(kind, 0.0) / (cores * wall):.1%}" for totals, wall in runs.values()]
        print(f"| {kind} | {' | '.join(cells)} |")
    per_thread = [runs[w][0]["training threads"] / (w * runs[w][1]) for w in (1, 2)]
    print(f"| core share of each training thread | {per_thread[0]:.0%} | {per_thread[1]:.0%} |")
    print(f"\nwindows: {runs[1][1]:.0f} s (1 worker), {runs[2][1]:.0f} s (2 workers)")


if __name__ == "__main__":
    main()
