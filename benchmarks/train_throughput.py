"""Training throughput: Ray Train's overhead, 2-worker scaling, and local dual averaging.

Every figure is samples/s over the epochs after the first (which pays FFCV's JIT compile and
Ray's start-up), the median over ``--repeats`` rounds that run every configuration once in turn
(the machine is shared and noisy), and every ratio compares runs measured in this one
invocation:

- orchestration overhead: a plain single-process loop / Ray Train with 1 worker,
  same model, data, optimizer and thread count;
- scaling: 2 workers of 1 thread / 1 worker of 1 thread, at the same global batch (strong
  scaling: each worker gets half the batch) and at the same per-worker batch (weak scaling:
  the global batch doubles, as when a user adds workers and keeps ``batch / worker``);
- communication saved: ``--sync-every 8`` / ``--sync-every 1``, 2 workers.

    .venv/bin/python benchmarks/train_throughput.py [--model lenet5] [--epochs 4] [--subset 30000]
        [--repeats 2]

``benchmarks/allreduce_latency.py`` measures what bounds the strong scaling: the latency of one
gradient all-reduce against the compute of one step. A larger model (``--model resnet20``, with
a smaller ``--subset``) shows the scaling when a step's compute dwarfs that latency.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from mlflow.tracking import MlflowClient

from distrib_rda.config import TrainConfig
from distrib_rda.data import build_loaders, ensure_converted
from distrib_rda.models import MODELS, build_model
from distrib_rda.training import run_training
from distrib_rda.training.driver import WORKER_ENV
from distrib_rda.training.dual_sync import LocalDualAveraging
from distrib_rda.training.loop import train_step


def plain_loop(cfg: TrainConfig) -> float:
    """The same work without Ray or DDP: one process, one thread."""
    torch.set_num_threads(1)
    beton_dir = ensure_converted(cfg.dataset, cache_dir=cfg.cache_dir)
    loaders = build_loaders(beton_dir, batch_size=cfg.batch_size, seed=cfg.seed,
                            subset=cfg.subset, num_workers=cfg.loader_workers)
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    height, _, channels = loaders.meta.shape
    model = build_model(cfg.model, in_channels=channels, image_size=height,
                        num_classes=len(loaders.meta.classes))
    parts = cfg.optim.build(model, total_steps=len(loaders.train) * cfg.epochs)
    dual = LocalDualAveraging(parts.optimizer, every=1)
    rates, step = [], 0
    for _ in range(cfg.epochs):
        started, samples = time.perf_counter(), 0
        for images, labels in loaders.train:
            step += 1
            train_step(model, parts, dual, images, labels, step)
            samples += labels.numel()
        torch.set_num_threads(1)
        rates.append(samples / (time.perf_counter() - started))
    return statistics.median(rates[1:])


def ray_run(cfg: TrainConfig, name: str) -> float:
    summary = run_training(cfg.replace(name=name))
    history = MlflowClient(cfg.tracking_uri).get_metric_history(summary["run_id"],
                                                                "samples_per_second")
    return statistics.median(m.value for m in sorted(history, key=lambda m: m.step)[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5", choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--subset", type=int, default=30000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    base = TrainConfig.build(
        model=args.model, epochs=args.epochs, subset=args.subset, batch_size=args.batch_size,
        loader_workers=1, storage=work / "results", tracking_uri=f"sqlite:///{work}/mlflow.db",
        experiment="throughput", checkpoint_every=args.epochs,
    )
    ray.init(num_cpus=2, runtime_env={"env_vars": WORKER_ENV},
             _temp_dir=tempfile.mkdtemp(prefix="rda-"))
    batch, double = args.batch_size, 2 * args.batch_size
    runs = {
        "one": base.replace(workers=1),
        "two": base.replace(workers=2),
        "two_h8": base.replace(workers=2, sync_every=8),
        "weak": base.replace(workers=2, batch_size=double),
        "weak_h8": base.replace(workers=2, batch_size=double, sync_every=8),
    }
    rates: dict[str, list[float]] = {"plain": [], **{key: [] for key in runs}}
    for repeat in range(args.repeats):
        rates["plain"].append(plain_loop(base))
        for key, cfg in runs.items():
            rates[key].append(ray_run(cfg, f"{key}-{repeat}"))
    ray.shutdown()
    plain, one, two, two_h8, weak, weak_h8 = (
        statistics.median(rates[key]) for key in ("plain", *runs))

    print(f"machine: {platform.machine()} {platform.processor() or ''}, "
          f"{torch.get_num_threads()} threads available, torch {torch.__version__}, "
          f"ray {ray.__version__}")
    print(f"{args.model} on fashion-mnist, {args.subset} images, {args.epochs} epochs (median "
          f"samples/s of epochs 2..{args.epochs}, median of {args.repeats} rounds)\n")
    print("| run | samples/s |\n| --- | --- |")
    for label, rate in [
        (f"plain loop, 1 thread, batch {batch}", plain),
        (f"Ray Train, 1 worker, batch {batch}", one),
        (f"Ray Train, 2 workers, batch {batch} ({batch // 2} each)", two),
        (f"Ray Train, 2 workers, batch {batch}, H=8", two_h8),
        (f"Ray Train, 2 workers, batch {double} ({batch} each)", weak),
        (f"Ray Train, 2 workers, batch {double}, H=8", weak_h8),
    ]:
        print(f"| {label} | {rate:,.0f} |")
    print("\n| ratio | value | target |\n| --- | --- | --- |")
    print(f"| orchestration overhead (plain / Ray 1 worker) | {plain / one:.2f} | <= 1.10 |")
    print(f"| 2-worker strong scaling (same global batch) | {two / one:.2f}x | >= 1.7x |")
    print(f"| 2-worker strong scaling, H=8 | {two_h8 / one:.2f}x | - |")
    print(f"| 2-worker weak scaling (same batch per worker) | {weak / one:.2f}x | - |")
    print(f"| 2-worker weak scaling, H=8 | {weak_h8 / one:.2f}x | - |")
    print(f"| communication saved (H=8 / H=1, 2 workers, batch {batch}) "
          f"| {two_h8 / two:.2f}x | - |")


if __name__ == "__main__":
    main()
