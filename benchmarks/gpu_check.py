"""The measuring parts of benchmarks/gpu_check.sh, one subcommand per section of its table.

Each section runs in its own process (the shell script gives each a time limit) and writes its
rows as JSON as they come; ``table`` prints them all, and a row for each section that failed
or ran out of time. The sections:

- ``optimizer``: the step time of RDA's default path (the generated kernel on CUDA) against
  ``SGD(momentum=0.9, fused=True)``, and of adaptive RDA against ``Adam(fused=True)``, on the
  parameters of torchvision's resnet18 (benchmarks/optimizer_step.py's harness, 10 steps per
  timed sample between two synchronizes, round-robin, median of the paired ratios).
- ``loader``: images/s of the FFCV training loader to the GPU, batch 512, crop + flip: uint8
  to the device and normalized there (the default on CUDA) against the host-side normalization
  followed by a float32 copy, epochs in turn, after one warm-up epoch each.
- ``train``: samples/s of one Ray Train worker training the CIFAR ResNet-18 with RDA (the
  product's defaults) on 25,000 of the images, float32 and then bf16, the median of the epochs
  after the first (the first compiles RDA's kernel and JITs FFCV's decoders).

The data of ``loader`` and ``train``: 50,000 + 10,000 generated 32x32 RGB images written in
torchvision's CIFAR-10 layout under ``--data`` and converted by the product itself.

    python benchmarks/gpu_check.py optimizer|loader|train --out FILE.json [--data DIR]
        [--cache DIR] [--device cuda] [--images 50000]
    python benchmarks/gpu_check.py table DIR

``--device cpu`` with a small ``--images`` runs the same code on the CPU (a smoke test of this
script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

BATCH = 512
LOADER_THREADS = max(1, min(8, os.cpu_count() or 1))


def write_generated_cifar(root: Path, train: int = 50_000) -> Path:
    """``train`` random images (and a fifth as many for test) with random labels, in
    torchvision's ``cifar-10-batches-py`` layout."""
    folder = root / "cifar-10-batches-py"
    if (folder / "batches.meta").is_file():
        return root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_batch = train // 5
    for name, count in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)),
                        ("test_batch", per_batch)]:
        batch = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, count).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


def optimizer_rows(device: str) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).parent))
    import optimizer_step as bench

    names = bench.select(["RDA (default path)", "RDA(adaptive=True) (default path)"])
    wall, _, first = bench.measure(1, repeats=30, warmup=3, device=device, names=names, steps=10)
    rows = []
    for name, base in (("RDA (default path)", bench.SGD_FUSED),
                       ("RDA(adaptive=True) (default path)", bench.ADAM_FUSED)):
        ratio = statistics.median(a / b for a, b in zip(wall[name], wall[base], strict=True))
        compiled = f"; first step {first[name]:.1f} s (compiles)" if name in first else \
            "; eager kernels: fused=None did not pick the generated one here"
        rows.append({"check": f"{name} step / {base}, resnet18 params",
                     "result": f"{ratio:.2f}x",
                     "detail": f"{statistics.median(wall[name]) * 1e3:.3f} ms vs "
                               f"{statistics.median(wall[base]) * 1e3:.3f} ms{compiled}"})
    return rows


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def loader_rows(device: str, data: Path, cache: Path, images: int) -> list[dict]:
    from distrib_rda.data import build_loaders, ensure_converted

    beton_dir = ensure_converted("cifar10", data_root=write_generated_cifar(data, images),
                                 cache_dir=cache)
    loaders = {
        where: build_loaders(beton_dir, batch_size=BATCH, seed=0, augment=True,
                             num_workers=LOADER_THREADS, device=device, normalize_on=where).train
        for where in ("device", "host")
    }
    seconds = {where: 0.0 for where in loaders}
    seen = {where: 0 for where in loaders}
    for epoch in range(3):  # the first one warms up (numba's JIT, CUDA's allocator)
        for where, loader in loaders.items():
            synchronize(device)
            start = time.perf_counter()
            count = 0
            for _, labels in loader:
                count += len(labels)
            synchronize(device)
            if epoch:
                seconds[where] += time.perf_counter() - start
                seen[where] += count
    rate = {where: seen[where] / seconds[where] for where in loaders}
    return [{"check": "FFCV -> GPU loader, uint8 + crop/flip/normalize on the GPU",
             "result": f"{rate['device']:,.0f} images/s",
             "detail": f"host normalize + float32 copy: {rate['host']:,.0f} images/s "
                       f"({rate['device'] / rate['host']:.2f}x); batch {BATCH}, "
                       f"{LOADER_THREADS} FFCV threads"}]


def train_rows(device: str, data: Path, cache: Path, out: Path, images: int) -> list[dict]:
    from mlflow.tracking import MlflowClient

    from distrib_rda.config import TrainConfig
    from distrib_rda.training import run_training

    tracking_uri = f"sqlite:///{out.parent / 'mlflow.db'}"
    write_generated_cifar(data, images)
    rates: dict[str, float] = {}
    rows = []
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig.build(
            dataset="cifar10", data_root=data, cache_dir=cache, model="resnet18",
            gpu=torch.device(device).type == "cuda",
            workers=1, epochs=3, finetune_epochs=0, batch_size=BATCH, subset=images // 2,
            loader_workers=LOADER_THREADS, precision=precision, name=f"resnet18-{precision}",
            storage=out.parent / "results", tracking_uri=tracking_uri, experiment="gpu-check")
        summary = run_training(cfg)
        history = MlflowClient(tracking_uri).get_metric_history(summary["run_id"],
                                                                "samples_per_second")
        later = [m.value for m in sorted(history, key=lambda m: m.step)[1:]]
        rates[precision] = statistics.median(later)
        versus = "" if precision == "fp32" else f", {rates['bf16'] / rates['fp32']:.2f}x fp32"
        rows.append({"check": f"train resnet18 {precision}, 1 worker, 32x32 generated",
                     "result": f"{rates[precision]:,.0f} samples/s",
                     "detail": f"median of epochs 2-3 of {images // 2:,} images, batch {BATCH}, "
                               f"RDA defaults{versus}"})
        out.write_text(json.dumps(rows))  # the fp32 row stays if bf16 runs out of time
    return rows


def table(directory: Path) -> None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"GPU check: {name}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print()
    print("| check | result | detail |")
    print("|---|---|---|")
    sections = [("tests", None), ("optimizer", "RDA steps against torch's fused kernels"),
                ("loader", "FFCV -> GPU loader"), ("train", "resnet18 training, fp32 and bf16")]
    for section, what in sections:
        rc_file, limit_file = directory / f"{section}.rc", directory / f"{section}.limit"
        rc = int(rc_file.read_text()) if rc_file.exists() else None
        limit = limit_file.read_text().strip() if limit_file.exists() else "?"
        log = directory / f"{section}.log"
        if section == "tests":
            print(f"| tests marked gpu | {pytest_summary(log, rc, limit)} | "
                  f"pytest -m gpu (log: {log.name}) |")
            continue
        rows_file = directory / f"{section}.json"
        if rows_file.exists():
            for row in json.loads(rows_file.read_text()):
                print(f"| {row['check']} | {row['result']} | {row['detail']} |")
        if rc != 0:
            why = "not run" if rc is None else (f"timed out after {limit} s" if rc in (124, 137)
                                                else f"failed (exit {rc})")
            error = last_line(log, "rror")
            print(f"| {what} | {why} | log: {log.name}{'; ' + error if error else ''} |")


def pytest_summary(log: Path, rc: int | None, limit: str) -> str:
    if rc in (124, 137):
        return f"timed out after {limit} s"
    line = last_line(log)
    return line.strip("= ") if line else f"no output (exit {rc})"


def last_line(path: Path, containing: str = "") -> str:
    """The last non-blank line of ``path`` that contains ``containing``, table-safe."""
    if not path.exists():
        return ""
    lines = [line for line in path.read_text(errors="replace").splitlines()
             if line.strip() and containing in line]
    return lines[-1].replace("|", "/")[:160] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["optimizer", "loader", "train", "table"])
    parser.add_argument("directory", nargs="?", type=Path, help="table: the results directory")
    parser.add_argument("--out", type=Path, help="where the section writes its rows (JSON)")
    parser.add_argument("--data", type=Path, help="where the generated CIFAR layout goes")
    parser.add_argument("--cache", type=Path, help="the converted-dataset cache")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=50_000, help="generated training images")
    args = parser.parse_args()
    if args.section == "table":
        table(args.directory)
        return
    if args.section == "optimizer":
        rows = optimizer_rows(args.device)
    elif args.section == "loader":
        rows = loader_rows(args.device, args.data, args.cache, args.images)
    else:
        rows = train_rows(args.device, args.data, args.cache, args.out, args.images)
    args.out.write_text(json.dumps(rows))
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
