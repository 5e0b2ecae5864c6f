"""What bounds 2-worker strong scaling on one machine: a step's compute against one all-reduce.

Two processes of one thread each join a gloo process group (as Ray Train's CPU workers do) and
time, in the same run:

- ``t₁(B)``: one training step (forward, backward, optimizer) of the model at batch ``B`` with
  the other process idle, what 1 worker computes;
- ``t(B)`` and ``t(B/2)``: the same with both processes computing at once, at the full and
  the half batch; ``t(B/2)`` is what each of 2 workers computes at global batch ``B``, and
  ``t₁(B) / t(B)`` says what two busy cores cost each other (shared caches, memory, host;
  1 when nothing);
- ``a``: one all-reduce of the model's gradient (one flat tensor, as DDP's single bucket),
  back to back, and right after a step's compute, which is what DDP pays every step.

Each quantity is a mean over a round of repetitions (throughput pays the slow tail too), and
the quantities take turns for several rounds, of which the median is reported.

With the all-reduce after every step (``--sync-every 1``), 2 workers process ``B`` samples in
``t(B/2) + a`` while 1 worker takes ``t₁(B)``, so strong scaling is at most

    S ≤ t₁(B) / (t(B/2) + a),

and without any communication at most ``t₁(B) / t(B/2)``.

    .venv/bin/python benchmarks/allreduce_latency.py [--model lenet5] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distrib_rda.config import TrainConfig
from distrib_rda.models import MODELS, build_model
from distrib_rda.optim.parts import OptimizerParts
from distrib_rda.training.dual_sync import LocalDualAveraging
from distrib_rda.training.loop import train_step

STEPS = 40   # per round: a mean, so the slow tail counts
ROUNDS = 5   # the quantities take turns; the median round is reported (the host is noisy)


def step_seconds(model: torch.nn.Module, parts: OptimizerParts, batch: int,
                 steps: int = STEPS) -> float:
    """Mean seconds of the training loop's ``train_step`` at ``batch`` (random data)."""
    images, labels = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    dual = LocalDualAveraging(parts.optimizer, every=1)
    times = []
    for step in range(1, steps + 1):
        started = time.perf_counter()
        train_step(model, parts, dual, images, labels, step)
        times.append(time.perf_counter() - started)
    return statistics.mean(times)


def all_reduce_seconds(flat: torch.Tensor, between=None, steps: int = STEPS) -> float:
    """Mean seconds of ``dist.all_reduce(flat)``, each after ``between()`` if given."""
    times = []
    for _ in range(steps):
        if between is not None:
            between()
        started = time.perf_counter()
        dist.all_reduce(flat)
        times.append(time.perf_counter() - started)
    return statistics.mean(times)


def worker(rank: int, store: str, model_name: str, batch: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_model(model_name, in_channels=1, image_size=28, num_classes=10)
    parts = TrainConfig.build(model=model_name).optim.build(model, total_steps=10 * STEPS)
    flat = torch.zeros(sum(p.numel() for p in model.parameters()))

    def after_step() -> float:
        return all_reduce_seconds(flat, between=lambda: step_seconds(model, parts, batch // 2,
                                                                     steps=1))

    def alone() -> float:
        return step_seconds(model, parts, batch) if rank == 0 else 0.0  # rank 1 waits

    measures = {"alone": alone, "full": lambda: step_seconds(model, parts, batch),
                "half": lambda: step_seconds(model, parts, batch // 2),
                "back_to_back": lambda: all_reduce_seconds(flat), "after_step": after_step}
    rounds: dict[str, list[float]] = {key: [] for key in measures}
    for round_ in range(ROUNDS + 1):  # round 0 warms up
        for key, measure in measures.items():
            dist.barrier()
            seconds = measure()
            if round_:
                rounds[key].append(seconds)
    if rank == 0:
        results.put({key: statistics.median(values) for key, values in rounds.items()}
                    | {"numel": flat.numel()})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5", choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    context = mp.get_context("spawn")
    results = context.Queue()
    store = Path(tempfile.mkdtemp(prefix="allreduce-")) / "store"
    processes = [context.Process(target=worker, args=(rank, str(store), args.model,
                                                      args.batch_size, results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    measured = results.get()
    for process in processes:
        process.join()

    batch, ms = args.batch_size, 1e3
    print(f"{args.model}, {measured['numel']:,} parameters, gloo, 2 processes of 1 thread, "
          f"torch {torch.__version__} (median of {ROUNDS} rounds of {STEPS}-repetition means)\n")
    print("| quantity | ms |\n| --- | --- |")
    print(f"| t₁({batch}): one step at batch {batch}, the other process idle "
          f"| {measured['alone'] * ms:.2f} |")
    print(f"| t({batch}): one step at batch {batch}, both processes computing "
          f"| {measured['full'] * ms:.2f} |")
    print(f"| t({batch // 2}): one step at batch {batch // 2}, both processes computing "
          f"| {measured['half'] * ms:.2f} |")
    print(f"| a: one gradient all-reduce, back to back | {measured['back_to_back'] * ms:.2f} |")
    print(f"| a: one gradient all-reduce, after a step | {measured['after_step'] * ms:.2f} |")
    bound = measured["alone"] / (measured["half"] + measured["after_step"])
    no_comm = measured["alone"] / measured["half"]
    print("\n| 2-worker strong scaling bound | value |\n| --- | --- |")
    print(f"| two busy cores: t₁({batch}) / t({batch}) | {measured['alone'] / measured['full']:.2f}"
          " (1 = no cost) |")
    print(f"| no communication: t₁({batch}) / t({batch // 2}) | {no_comm:.2f}x |")
    print(f"| all-reduce every step: t₁({batch}) / (t({batch // 2}) + a) | {bound:.2f}x |")


if __name__ == "__main__":
    main()
