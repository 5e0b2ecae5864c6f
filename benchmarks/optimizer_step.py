"""Step time of RDA against torch's SGD(momentum) and Adam, on ResNet-18's parameters.

Every optimizer owns its own copy of torchvision's resnet18(num_classes=10) parameters (11.2M)
with fixed random gradients. All optimizers are timed round-robin, one step each per round, in
an order shuffled every round (seeded), so that machine noise hits each of them alike and none
always runs right after the same other. The table gives median step times, wall-clock and
process CPU time, and the median over rounds of the ratio to the baselines each one replaces
(RDA vs SGD, adaptive RDA vs Adam, each against torch's multi-tensor (foreach) and fused
kernels). On a shared machine, CPU time is the steadier of the two (it does not count time the
process waited for a core). The rows that run RDA's generated kernel (``fused=True``, and the
default path on CUDA) compile on their first step, which is timed apart and printed above the
table: it is what making that kernel the default would cost every process.

With ``--passes``, a second table splits the default path's step on the CPU into its passes:
each single pass (and whole steps written differently: chunks that stay in cache between the
passes) over the parameters that the per-tensor kernel takes (those of at least 16Ki
elements), timed round-robin after writing 64 MiB of other memory (cold caches), as a ratio to
SGD(momentum)'s three passes over the same tensors in the same round.

With ``--device cuda`` every timed sample is ``--steps`` steps between two
``torch.cuda.synchronize()`` calls, and ``--only`` keeps the rows whose names contain one of
the given strings (benchmarks/gpu_check.sh uses both).

Before the table, the import time of ``distrib_rda.optim`` against that of ``torch`` alone: fresh
interpreters, ``python -c "import torch"`` and ``python -c "import distrib_rda.optim"`` in
turn, medians of wall-clock and of the child's CPU time (user + system).

    .venv/bin/python benchmarks/optimizer_step.py [--repeats 60] [--threads 1 2]
        [--import-repeats 5] [--device cpu] [--steps 1] [--only NAME ...] [--passes]
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
from distrib_rda.optim.rda import _SMALL as SMALL
from distrib_rda.optim.rda import hard_threshold_, soft_threshold_

SGD = "SGD(momentum=0.9, foreach=True)"
SGD_FUSED = "SGD(momentum=0.9, fused=True)"
ADAM = "Adam(foreach=True)"
ADAM_FUSED = "Adam(fused=True)"


def rda(**kwargs):
    return lambda m: RDA(rda_param_groups(m, 1e-4), gamma=1.0, **kwargs)


def rda_target(sparsity: float = 0.95):
    """The product's default: RDA to a target (hard threshold), inside its ramp, where the
    threshold is reselected (a quantile of all the weights) every 16 steps. Time it with
    ``--steps 16`` or more, so that each sample holds one reselection."""
    def build(m):
        weights, rest = rda_param_groups(m, 0.0)
        weights.update(target_sparsity=sparsity, ramp=(0, 10**9), threshold="hard")
        return RDA([weights, rest], gamma=1.0)
    return build


# name -> (factory(model), names of the baselines it is compared with; () for a baseline).
# Every RDA row is compared with the baseline (foreach) and with torch's fused kernel.
CASES = {
    SGD: (lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, foreach=True), ()),
    "RDA (default path)": (rda(), (SGD, SGD_FUSED)),
    "RDA(center='zero') (default path)": (rda(center="zero"), (SGD, SGD_FUSED)),
    "RDA(foreach=True)": (rda(foreach=True), (SGD, SGD_FUSED)),
    "RDA(target_sparsity=0.95, threshold='hard') (default path)": (rda_target(),
                                                                   (SGD, SGD_FUSED)),
    SGD_FUSED: (lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, fused=True), ()),
    "RDA(fused=True)": (rda(fused=True), (SGD, SGD_FUSED)),
    ADAM: (lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True), ()),
    "RDA(adaptive=True) (default path)": (rda(adaptive=True), (ADAM, ADAM_FUSED)),
    "RDA(adaptive=True, foreach=True)": (rda(adaptive=True, foreach=True), (ADAM, ADAM_FUSED)),
    ADAM_FUSED: (lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True), ()),
    "RDA(adaptive=True, fused=True)": (rda(adaptive=True, fused=True), (ADAM, ADAM_FUSED)),
}


def model_with_grads(seed: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device)
    return model


def generated(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is an RDA that runs the generated (compiled) kernel."""
    from distrib_rda.optim.rda import resolve_fused

    if not isinstance(optimizer, RDA):
        return False
    group = optimizer.param_groups[0]
    return resolve_fused(group["fused"], group["foreach"], group["params"][0].device)


def select(only: list[str] | None) -> list[str]:
    """The rows to time: all, or those whose names contain one of ``only``, with their
    baselines."""
    if not only:
        return list(CASES)
    chosen = {name for name in CASES if any(part in name for part in only)}
    chosen |= {base for name in chosen for base in CASES[name][1]}
    return [name for name in CASES if name in chosen]


def measure(threads: int, repeats: int, warmup: int, device: torch.device | str = "cpu",
            names: list[str] | None = None, steps: int = 1):
    """Per optimizer, the wall-clock and the process CPU time of each timed step (the mean of
    ``steps`` steps taken in a row), and the wall-clock of its very first step."""
    torch.set_num_threads(threads)
    device = torch.device(device)
    names = names or list(CASES)
    optimizers = {name: CASES[name][0](model_with_grads(0, device)) for name in names}
    wall: dict[str, list[float]] = {name: [] for name in optimizers}
    cpu: dict[str, list[float]] = {name: [] for name in optimizers}
    first: dict[str, float] = {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for name, opt in optimizers.items():
        sync()
        start = time.perf_counter()
        opt.step()
        sync()
        first[name] = time.perf_counter() - start
    order = list(optimizers)
    rng = random.Random(threads)
    for i in range(warmup + repeats):
        rng.shuffle(order)
        for name in order:
            opt = optimizers[name]
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                opt.step()
            sync()
            w1, c1 = time.perf_counter(), time.process_time()
            if i >= warmup:
                wall[name].append((w1 - w0) / steps)
                cpu[name].append((c1 - c0) / steps)
    compiled = {name for name, opt in optimizers.items() if generated(opt)}
    return wall, cpu, {name: first[name] for name in compiled}


def ratio_cells(times: dict[str, list[float]], name: str) -> list[str]:
    """The median step time of ``name`` in ms, and its paired ratios to the baselines timed."""
    ratios = []
    for base in CASES[name][1]:
        if base not in times:
            continue
        paired = statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))
        label = base.split("(")[0] + (" fused" if "fused" in base else "")
        ratios.append(f"{paired:.2f} vs {label}")
    return [f"{statistics.median(times[name]) * 1e3:.2f}", ", ".join(ratios) or "baseline"]


def chunked_step(chunk: int):
    """RDA's per-tensor step over matching chunks of ``chunk`` elements: the second and third
    passes find ``G`` and ``p`` in cache."""
    def step(g, dual, w1, p, alpha, tau):
        for gc, dc, wc, pc in zip(g.view(-1).split(chunk), dual.view(-1).split(chunk),
                                  w1.view(-1).split(chunk), p.view(-1).split(chunk),
                                  strict=True):
            dc.add_(gc)
            torch.add(wc, dc, alpha=alpha, out=pc)
            soft_threshold_(pc, tau)
    return step


def passes(threads: int, repeats: int) -> dict[str, list[float]]:
    """Per pass (or step variant) of the table printed with ``--passes``, the ratio of its
    CPU time to SGD's step in each round."""
    torch.set_num_threads(threads)
    shapes = [p.shape for p in model_with_grads(0).parameters() if p.numel() >= SMALL]
    gen = torch.Generator().manual_seed(0)
    g, dual, w1, p, buf, q = ([torch.randn(s, generator=gen) for s in shapes] for _ in range(6))
    flush = torch.zeros(16 << 20)
    alpha, tau = -0.1, 1e-3

    def each(f):
        return lambda: [f(i) for i in range(len(shapes))]

    def rda_step(i):
        dual[i].add_(g[i])
        torch.add(w1[i], dual[i], alpha=alpha, out=p[i])
        soft_threshold_(p[i], tau)

    def sgd_step():
        torch._foreach_mul_(buf, 0.9)
        torch._foreach_add_(buf, g)
        torch._foreach_add_(q, buf, alpha=-0.01)

    cases = {
        "SGD step: buf.mul_(m); buf.add_(g); p.add_(buf) (foreach)": sgd_step,
        "RDA step: G.add_(g); add(w1, G, alpha, out=p); softshrink(p, out=p)": each(rda_step),
        "RDA step in chunks of 64Ki elements": each(
            lambda i: chunked_step(1 << 16)(g[i], dual[i], w1[i], p[i], alpha, tau)),
        "RDA step in chunks of 512Ki elements": each(
            lambda i: chunked_step(1 << 19)(g[i], dual[i], w1[i], p[i], alpha, tau)),
        "pass G.add_(g)": each(lambda i: dual[i].add_(g[i])),
        "pass torch.add(w1, G, alpha, out=p)": each(
            lambda i: torch.add(w1[i], dual[i], alpha=alpha, out=p[i])),
        "pass torch.mul(G, alpha, out=p) (center='zero')": each(
            lambda i: torch.mul(dual[i], alpha, out=p[i])),
        "pass p.add_(G, alpha) (in place)": each(lambda i: p[i].add_(dual[i], alpha=alpha)),
        "pass softshrink(p, out=p)": each(lambda i: soft_threshold_(p[i], tau)),
        "pass hardshrink(p, out=p)": each(lambda i: hard_threshold_(p[i], tau)),
        "pass buf.mul_(m) (SGD's first)": each(lambda i: buf[i].mul_(0.9)),
    }
    base = next(iter(cases))
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    rng = random.Random(threads)
    for i in range(repeats + 3):
        rng.shuffle(order)
        for name in order:
            flush.add_(1.0)
            start = time.process_time()
            cases[name]()
            if i >= 3:
                cpu[name].append(time.process_time() - start)
    return {name: [a / b for a, b in zip(cpu[name], cpu[base], strict=True)] for name in cases}


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
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=1, help="steps per timed sample")
    parser.add_argument("--only", nargs="+", help="rows whose names contain one of these")
    parser.add_argument("--passes", action="store_true",
                        help="also time the default path's passes on the CPU")
    args = parser.parse_args()
    names = select(args.only)

    n_params = sum(p.numel() for p in model_with_grads(0).parameters())
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "-"
    print(
        f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
        f"cpu_count={os.cpu_count()} | torch {torch.__version__} | device {args.device} ({gpu})"
    )
    print(
        f"params: resnet18(num_classes=10), {n_params / 1e6:.1f}M float32 | "
        f"repeats={args.repeats} (round-robin, shuffled) of {args.steps} step(s), "
        f"warmup={args.warmup} | "
        f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    if args.import_repeats:
        times = import_times(args.import_repeats)
        (tw, tc), (ow, oc) = times["torch"], times["distrib_rda.optim"]
        print(f"import, median of {args.import_repeats} in turn: torch {tw:.2f} s wall, "
              f"{tc:.2f} s CPU | distrib_rda.optim {ow:.2f} s wall, {oc:.2f} s CPU | "
              f"ratio {ow / tw:.2f} wall, {oc / tc:.2f} CPU")
    print("ratio: median over rounds of (step time / baseline step time in the same round)")
    rows = []
    for i, threads in enumerate(args.threads):
        wall, cpu, first = measure(threads, args.repeats, args.warmup, args.device, names,
                                   args.steps)
        if i == 0 and first:
            print("first step, wall (compiles the generated kernels; later processes read "
                  "Inductor's on-disk cache): "
                  + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in first.items()))
        for name in names:
            rows.append(f"| {threads} | {name} | "
                        + " | ".join(ratio_cells(wall, name) + ratio_cells(cpu, name)) + " |")
    print()
    print("| threads | optimizer | wall ms | ratio (wall) | CPU ms | ratio (CPU) |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.passes:
        print("\nCPU time / SGD's step in the same round (median over rounds), the parameters "
              f"of at least {SMALL} elements, caches written over before each:\n")
        print("| threads | step or pass | ratio (CPU) |")
        print("|---|---|---:|")
        for threads in args.threads:
            for name, ratios in passes(threads, args.repeats).items():
                print(f"| {threads} | {name} | {statistics.median(ratios):.2f} |")
    print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
