"""Screening RDA variants on lenet5 / Fashion-MNIST in one process, one thread, no Ray.

A quick harness for trying an idea before it goes through ``benchmarks/frontier.py``: the whole
training set in memory (normalized by its mean and standard deviation), batch 128, the product's
own model, optimizer and fine-tune builders (``build_model``, ``build_optimizer``,
``build_finetune``), test accuracy on all 10k test images. Each variant is a set of
``distrib-rda train`` keys; ``epochs`` counts the RDA epochs and ``finetune_epochs`` come after
them. Printed per variant: accuracy and sparsity at the end, before the fine-tune, and the
per-layer sparsity.

    .venv/bin/python benchmarks/rda_variants.py --parallel 2 \\
        "optimizer=sgd epochs=10" \\
        "optimizer=rda lambda_=0 gamma=0.3 warmup=300 epochs=10" \\
        "optimizer=rda lambda_=1.1e-3 gamma=0.15 warmup=1000 epochs=10 finetune_epochs=10"
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
import yaml

from distrib_rda.config import TrainConfig
from distrib_rda.data.sources import resolve_source
from distrib_rda.models import build_model
from distrib_rda.sparsity import layer_sparsity, sparsity
from distrib_rda.training.optimizers import build_finetune, build_optimizer

BATCH = 128


def load_data():
    arrays = resolve_source("fashion-mnist").load()

    def tensor(images):
        return torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255

    x_train, x_test = tensor(arrays.train_images), tensor(arrays.test_images)
    mean, std = x_train.mean(), x_train.std()
    return ((x_train - mean) / std, torch.tensor(arrays.train_labels),
            (x_test - mean) / std, torch.tensor(arrays.test_labels))


def parse_variant(text: str) -> dict:
    """``"key=value key=value"`` with YAML values (``1e-3``, ``true``, ``[2]``)."""
    pairs = (item.split("=", 1) for item in text.split())
    return {key: yaml.safe_load(value) for key, value in pairs}


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    return (model(images).argmax(1) == labels).float().mean().item()


def run(variant: dict, seed: int) -> dict:
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_data()
    cfg = TrainConfig.build(**variant, seed=seed)
    steps_per_epoch = len(x_train) // BATCH
    torch.manual_seed(seed)
    model = build_model(cfg.model, in_channels=1, image_size=28, num_classes=10,
                        init_scale=cfg.init_scale)
    parts = build_optimizer(cfg, model, total_steps=cfg.epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    started, before_finetune = time.perf_counter(), None
    for epoch in range(1, cfg.epochs + cfg.finetune_epochs + 1):
        if epoch == cfg.epochs + 1:
            before_finetune = (accuracy(model, x_test, y_test), sparsity(model))
            parts = build_finetune(cfg, model, total_steps=cfg.finetune_epochs * steps_per_epoch)
        if epoch in cfg.restart:
            parts.optimizer.restart()
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(steps_per_epoch):
            batch = perm[i * BATCH:(i + 1) * BATCH]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            parts.optimizer.zero_grad()
            loss.backward()
            parts.step()
        if not torch.isfinite(loss):
            break
    return {"variant": variant, "seed": seed, "accuracy": accuracy(model, x_test, y_test),
            "sparsity": sparsity(model), "before_finetune": before_finetune,
            "layers": {name: round(s, 3) for name, s in layer_sparsity(model).items()},
            "seconds": round(time.perf_counter() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help='e.g. "optimizer=rda lambda_=5e-4 epochs=10"')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=1, help="variants at once (processes)")
    args = parser.parse_args()
    variants = [parse_variant(text) for text in args.variants]
    for variant in variants:
        TrainConfig.build(**variant)  # a bad key fails here, before any training
    print("| variant | accuracy | sparsity | before fine-tune | per-layer sparsity | s |")
    print("| --- | ---: | ---: | --- | --- | ---: |")
    with ProcessPoolExecutor(args.parallel) as pool:
        for r in pool.map(run, variants, [args.seed] * len(variants)):
            before = ("-" if r["before_finetune"] is None
                      else "{:.2%} at {:.2%}".format(*r["before_finetune"]))
            layers = " ".join(f"{k} {v:.0%}" for k, v in r["layers"].items())
            text = " ".join(f"{k}={v}" for k, v in r["variant"].items())
            print(f"| {text} | {r['accuracy']:.2%} | {r['sparsity']:.2%} | {before} | {layers} "
                  f"| {r['seconds']} |", flush=True)


if __name__ == "__main__":
    main()
