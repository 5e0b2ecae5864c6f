"""Images per second: this project's FFCV loader against torch's DataLoader doing the same job.

Two jobs, each ending in normalized float32 NCHW batches and int64 labels, batch 256,
shuffled, last partial batch dropped:

1. Fashion-MNIST train set (60,000 28x28 grey images), no augmentation.
2. 50,000 generated 32x32 RGB images with random crop (padding 4) + horizontal flip.

FFCV side: ``distrib_rda.data.build_loaders`` over .beton files (``num_workers`` threads).
DataLoader side: torchvision's own recipe, as ``torchvision.datasets.FashionMNIST`` and
``CIFAR10`` do it: uint8 arrays in memory, one ``PIL.Image.fromarray`` per sample, then
``transforms.Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(),
Normalize(mean, std)])`` (job 1 without the first two), ``num_workers`` worker processes,
``persistent_workers=True``, ``prefetch_factor=4``, started with ``spawn`` (forking a process
that runs FFCV's numba/TBB threads is unsafe; the start is outside the timing anyway).

Threads, pinned alike: the main process runs torch with ``--workers`` intra-op threads for
both; FFCV decodes with ``--workers`` threads; each DataLoader worker process runs one torch
thread (PyTorch's default in workers). So each side has ``--workers`` cores of loading.

Timing: one untimed warm-up epoch each (FFCV's JIT compilation, the DataLoader's worker
start), then ``--epochs`` timed epochs of each, taken in turns (one FFCV epoch, one DataLoader
epoch, ...) so that a busy machine slows both alike; images/s = images / summed epoch time.
The loop only iterates the batches: this measures the loaders, not a model. Also printed:
images per CPU-second (this process's threads plus the DataLoader's worker processes, from
/proc), which a machine shared with other jobs distorts less than wall time.

    .venv/bin/python benchmarks/loader.py [--epochs 3] [--batch-size 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from distrib_rda.data import build_loaders, ensure_converted
from distrib_rda.data.convert import write_dataset
from distrib_rda.data.meta import DatasetMeta
from distrib_rda.data.sources import Arrays, resolve_source


class InMemoryImages(torch.utils.data.Dataset):
    """torchvision's FashionMNIST/CIFAR10 ``__getitem__``: a PIL image per sample, transformed."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images = images[..., 0] if images.shape[-1] == 1 else images
        self.mode = "L" if images.shape[-1] == 1 else "RGB"
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode=self.mode)
        return self.transform(image), int(self.labels[index])


def dataloader(arrays: Arrays, meta: DatasetMeta, *, augment: bool, batch_size: int,
               workers: int) -> torch.utils.data.DataLoader:
    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] \
        if augment else []
    steps += [
        transforms.ToTensor(),
        transforms.Normalize([m / 255 for m in meta.mean], [s / 255 for s in meta.std]),
    ]
    dataset = InMemoryImages(arrays.train_images, arrays.train_labels, transforms.Compose(steps))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        persistent_workers=True, prefetch_factor=4, multiprocessing_context="spawn",
    )


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time (user + system) used so far by this process, all threads, and by ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(os.times()[:2])
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def worker_pids(loader: Iterable) -> list[int]:
    """The DataLoader's persistent worker processes (none for FFCV: its workers are threads)."""
    iterator = getattr(loader, "_iterator", None)
    return [worker.pid for worker in getattr(iterator, "_workers", [])]


def epoch(loader: Iterable) -> tuple[float, float, int, tuple[int, ...]]:
    """Wall and CPU seconds of iterating one epoch; the images seen; the batch shape."""
    pids = worker_pids(loader)
    seen, shape = 0, ()
    cpu, start = cpu_seconds(pids), time.perf_counter()
    for images, labels in loader:
        seen += len(labels)
        shape = tuple(images.shape)
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
    return time.perf_counter() - start, cpu_seconds(pids) - cpu, seen, shape


def race(loaders: dict[str, Iterable], epochs: int) -> dict[str, tuple[float, float]]:
    """(images per wall second, images per CPU second) of each loader.

    One warm-up epoch each, then ``epochs`` timed epochs taken round-robin, one epoch of each
    per round, so that machine noise hits all of them alike.
    """
    shapes = {name: epoch(loader)[3] for name, loader in loaders.items()}
    assert len(set(shapes.values())) == 1, shapes
    totals = {name: np.zeros(3) for name in loaders}
    for _ in range(epochs):
        for name, loader in loaders.items():
            wall, cpu, seen, _ = epoch(loader)
            totals[name] += (wall, cpu, seen)
    return {name: (seen / wall, seen / cpu) for name, (wall, cpu, seen) in totals.items()}


def generated_rgb(count: int = 50_000, test: int = 1_000) -> Arrays:
    rng = np.random.default_rng(0)
    return Arrays(
        rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, count).astype(np.int64),
        rng.integers(0, 256, (test, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, test).astype(np.int64),
        tuple(str(i) for i in range(10)),
    )


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, load average {load}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-dir", default="~/.cache/distrib-rda")
    args = parser.parse_args()
    torch.set_num_threads(args.workers)
    print(f"machine: {machine()}")
    print(f"batch {args.batch_size}, {args.workers} loader threads (FFCV) / worker processes "
          f"(DataLoader), {args.workers} torch threads in the main process, "
          f"{args.epochs} timed epochs after 1 warm-up\n")

    with tempfile.TemporaryDirectory() as tmp:
        fashion_dir = ensure_converted("fashion-mnist", cache_dir=args.cache_dir)
        rgb_dir = Path(tmp) / "rgb"
        rgb = generated_rgb()
        write_dataset(rgb, rgb_dir, dataset="generated-rgb", source="benchmark arrays")
        jobs = [
            ("Fashion-MNIST train, 60k 28x28x1", fashion_dir,
             resolve_source("fashion-mnist").load(), False),
            ("generated 50k 32x32x3, crop+flip", rgb_dir, rgb, True),
        ]
        print(f"{'job':34} {'FFCV img/s':>11} {'DataLoader':>11} {'ratio':>6}   "
              f"{'FFCV img/CPU-s':>14} {'DataLoader':>11} {'ratio':>6}")
        for name, beton_dir, arrays, augment in jobs:
            ffcv = build_loaders(beton_dir, batch_size=args.batch_size, seed=0,
                                 augment=augment, num_workers=args.workers)
            torch_loader = dataloader(arrays, ffcv.meta, augment=augment,
                                      batch_size=args.batch_size, workers=args.workers)
            rates = race({"ffcv": ffcv.train, "torch": torch_loader}, args.epochs)
            del torch_loader
            (fast, fast_cpu), (slow, slow_cpu) = rates["ffcv"], rates["torch"]
            print(f"{name:34} {fast:11,.0f} {slow:11,.0f} {fast / slow:5.1f}x   "
                  f"{fast_cpu:14,.0f} {slow_cpu:11,.0f} {fast_cpu / slow_cpu:5.1f}x", flush=True)

if __name__ == "__main__":
    main()
