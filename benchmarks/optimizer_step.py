"""Step time of RDA against torch's SGD(momentum) and Adam, on ResNet-18's parameters.

Every optimizer owns its own copy of torchvision's resnet18(num_classes=10) parameters (11.2M)
with fixed random gradients. All optimizers are timed round-robin, one step each per round, in
an order shuffled every round (seeded), so that machine noise hits each of them alike and none
always runs right after the same other. The table gives median step times, wall-clock and
process CPU time, and the median over rounds of the ratio to the baseline each one replaces
(RDA vs SGD, adaptive RDA vs Adam; RDA's fused path, one generated kernel per tensor, vs torch's
fused SGD and Adam kernels). On a shared machine, CPU time is the steadier of the two (it does
not count time the process waited for a core). The fused RDA rows compile on their first step,
which the warm-up rounds absorb.

Before the table, the import time of ``distrib_rda.optim`` against that of ``torch`` alone: fresh
interpreters, ``python -c "import torch"`` and ``python -c "import distrib_rda.optim"`` in
turn, medians of wall-clock and of the child's CPU time (user + system).

    .venv/bin/python benchmarks/optimizer_step.py [--repeats 60] [--threads 1 2]
        [--import-repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time

import torch
import torchvision

from distrib_rda.optim import RDA, rda_param_groups

SGD = "SGD(momentum=0.9, foreach=True)"
SGD_FUSED = "SGD(momentum=0.9, fused=True)"
ADAM = "Adam(foreach=True)"
ADAM_FUSED = "Adam(fused=True)"


def rda(**kwargs):
    return lambda m: RDA(rda_param_groups(m, 1e-4), gamma=1.0, **kwargs)


# name -> (factory(model), names of the baselines it is compared with; () for a baseline).
# The fused rows (one generated kernel per tensor) are compared with the baselines
# (foreach) and with torch's own fused kernels.
CASES = {
    SGD: (lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, foreach=True), ()),
    "RDA (default path)": (rda(), (SGD,)),
    "RDA(center='zero') (default path)": (rda(center="zero"), (SGD,)),
    "RDA(foreach=True)": (rda(foreach=True), (SGD,)),
    SGD_FUSED: (lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, fused=True), ()),
    "RDA(fused=True)": (rda(fused=True), (SGD, SGD_FUSED)),
    ADAM: (lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True), ()),
    "RDA(adaptive=True) (default path)": (rda(adaptive=True), (ADAM,)),
    "RDA(adaptive=True, foreach=True)": (rda(adaptive=True, foreach=True), (ADAM,)),
    ADAM_FUSED: (lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True), ()),
    "RDA(adaptive=True, fused=True)": (rda(adaptive=True, fused=True), (ADAM, ADAM_FUSED)),
}


def model_with_grads(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    gen = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    return model


def measure(threads: int, repeats: int, warmup: int):
    """Per optimizer, the wall-clock and the process CPU time of each timed step."""
    torch.set_num_threads(threads)
    optimizers = {name: factory(model_with_grads(0)) for name, (factory, _) in CASES.items()}
    wall: dict[str, list[float]] = {name: [] for name in optimizers}
    cpu: dict[str, list[float]] = {name: [] for name in optimizers}
    order = list(optimizers)
    rng = random.Random(threads)
    for i in range(warmup + repeats):
        rng.shuffle(order)
        for name in order:
            opt = optimizers[name]
            w0, c0 = time.perf_counter(), time.process_time()
            opt.step()
            w1, c1 = time.perf_counter(), time.process_time()
            if i >= warmup:
                wall[name].append(w1 - w0)
                cpu[name].append(c1 - c0)
    return wall, cpu


def import_times(repeats: int) -> dict[str, tuple[float, float]]:
    """Per module, the median wall-clock and CPU seconds of importing it in a new interpreter,
    the two modules taking turns."""
    modules = ("torch", "distrib_rda.optim")
    wall: dict[str, list[float]] = {m: [] for m in modules}
    cpu: dict[str, list[float]] = {m: [] for m in modules}
    for _ in range(repeats):
        for module in modules:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
            wall[module].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[module].append(after.ru_utime + after.ru_stime
                               - before.ru_utime - before.ru_stime)
    return {m: (statistics.median(wall[m]), statistics.median(cpu[m])) for m in modules}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--import-repeats", type=int, default=5, help="0: skip")
    args = parser.parse_args()

    n_params = sum(p.numel() for p in model_with_grads(0).parameters())
    print(
        f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
        f"cpu_count={os.cpu_count()} | torch {torch.__version__}"
    )
    print(
        f"params: resnet18(num_classes=10), {n_params / 1e6:.1f}M float32 | "
        f"repeats={args.repeats} (round-robin, shuffled), warmup={args.warmup} | "
        f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    if args.import_repeats:
        times = import_times(args.import_repeats)
        (tw, tc), (ow, oc) = times["torch"], times["distrib_rda.optim"]
        print(f"import, median of {args.import_repeats} in turn: torch {tw:.2f} s wall, "
              f"{tc:.2f} s CPU | distrib_rda.optim {ow:.2f} s wall, {oc:.2f} s CPU | "
              f"ratio {ow / tw:.2f} wall, {oc / tc:.2f} CPU")
    print("ratio: median over rounds of (step time / baseline step time in the same round)")
    print()
    print("| threads | optimizer | wall ms | ratio (wall) | CPU ms | ratio (CPU) |")
    print("|---|---|---:|---:|---:|---:|")
    for threads in args.threads:
        wall, cpu = measure(threads, args.repeats, args.warmup)
        for name, (_, baselines) in CASES.items():
            cells = []
            for times in (wall, cpu):
                cells.append(f"{statistics.median(times[name]) * 1e3:.2f}")
                ratios = []
                for base in baselines:
                    paired = statistics.median(
                        a / b for a, b in zip(times[name], times[base], strict=True))
                    label = base.split("(")[0] + (" fused" if "fused" in base else "")
                    ratios.append(f"{paired:.2f} vs {label}")
                cells.append(", ".join(ratios) or "baseline")
            print(f"| {threads} | {name} | " + " | ".join(cells) + " |")
    print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
