"""Screening RDA variants on Fashion-MNIST in one process, one thread, no Ray.

A quick harness for trying an idea before it goes through ``benchmarks/frontier.py``: the whole
training set in memory (normalized by its mean and standard deviation), batch 128, the product's
own model and optimizer builders (``build_model``, ``TrainConfig.optim.build`` and
``build_finetune``), test accuracy on all 10k test images. Each variant is a set of
``distrib-rda train`` keys (``epochs`` is the whole run; RDA's last ``finetune_epochs``, half
by default, train the mask it found), plus, for the ideas that were tried and dropped from the
product, a ``variant`` key that only this script knows:

- ``variant=reweighted``: reweighted l1 (Candès, Wakin & Boyd 2008) to the target: the weights
  are ranked by ``|u| * (|w_prev| + eps)``, with ``w_prev`` the weights at the end of the last
  epoch and ``eps`` their mean magnitude, i.e. a per-weight strength ``lambda_i ∝ 1/(|w_i| +
  eps)``, refreshed every epoch; soft or hard as ``threshold`` says.
- ``variant=lambda-ramp``: a fixed ``lambda_`` reached on the cubic ``ramp``: ``lambda_t =
  lambda * ramp(t)``; the sparsity is what it gives.
- ``variant=cut``: the one-shot cut of earlier versions: RDA at a small ``lambda_``, whose
  iterate is cut to ``cut`` (a fraction) by global magnitude before the fine-tune.

Printed per variant and seed: accuracy and sparsity at the end, before the fine-tune, and the
per-layer sparsity; then per variant the mean accuracy ± its standard deviation over the seeds.

    .venv/bin/python benchmarks/rda_variants.py --parallel 2 \\
        "optimizer=gmp target_sparsity=0.98 epochs=20" \\
        "optimizer=rda target_sparsity=0.98 epochs=20" --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
import yaml

from distrib_rda.config import TrainConfig
from distrib_rda.data.sources import resolve_source
from distrib_rda.models import build_model
from distrib_rda.optim import RDA, cubic_sparsity, magnitude_masks, prunable_weights
from distrib_rda.optim.rda import rda as rda_step
from distrib_rda.sparsity import layer_sparsity, sparsity

BATCH = 128
VARIANTS = ("reweighted", "lambda-ramp", "cut")


def load_data(dataset: str):
    arrays = resolve_source(dataset).load()

    def tensor(images):
        return torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255

    x_train, x_test = tensor(arrays.train_images), tensor(arrays.test_images)
    mean, std = x_train.mean(), x_train.std()
    return ((x_train - mean) / std, torch.tensor(arrays.train_labels),
            (x_test - mean) / std, torch.tensor(arrays.test_labels))


def parse_variant(text: str) -> dict:
    """``"key=value key=value"`` with YAML values (``1e-3``, ``true``, ``[0.1, 0.6]``)."""
    pairs = (item.split("=", 1) for item in text.split())
    return {key: yaml.safe_load(value) for key, value in pairs}


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    model.eval()
    correct = sum(int((model(images[i:i + 2000]).argmax(1) == labels[i:i + 2000]).sum())
                  for i in range(0, len(images), 2000))
    model.train()
    return correct / len(images)


class ReweightedRDA(RDA):
    """RDA to a target whose selection ranks ``|u| * r`` with per-weight ``r = |w_prev| + eps``
    (``refresh`` sets ``r``): the threshold on ``|u|`` of weight ``i`` is ``tau / r_i``."""

    scale: list[torch.Tensor] | None = None

    @torch.no_grad()
    def refresh(self) -> None:
        weights = self.param_groups[0]["params"]
        eps = torch.cat([w.abs().flatten() for w in weights]).mean()
        self.scale = [w.abs() + eps for w in weights]

    def _step_group(self, group, with_grads):
        if group["target_sparsity"] is None or self.scale is None:
            return super()._step_group(group, with_grads)
        args = self._init_group(group, with_grads=with_grads)
        rda_step(**{**args, "lambda_": 0.0})
        t = args["state_steps"][0].item()
        start, end = group["ramp"]
        target = cubic_sparsity(t, start, end, group["target_sparsity"])
        scores = [p.abs() * r for p, r in zip(args["params"], self.scale, strict=True)]
        k = round(target * sum(s.numel() for s in scores))
        if k == 0:
            return
        tau = float(torch.cat([s.flatten() for s in scores]).kthvalue(k).values)
        for p, r in zip(args["params"], self.scale, strict=True):
            if group["threshold"] == "hard":
                p.mul_(p.abs() * r > tau)
            else:
                p.copy_(torch.sign(p) * (p.abs() - tau / r).clamp(min=0))


class LambdaRampRDA(RDA):
    """RDA at a fixed lambda reached on the cubic ramp: ``lambda_t = lambda * ramp(t)``."""

    final: float = 0.0
    ramp: tuple[int, int] = (0, 1)

    def step(self, closure=None):
        group = self.param_groups[0]
        t = int(self.state[group["params"][0]]["step"]) + 1
        group["lambda_"] = self.final * cubic_sparsity(t, *self.ramp, 1.0)
        return super().step(closure)


def build(cfg: TrainConfig, variant: str | None, model, total_steps: int):
    parts = cfg.optim.build(model, total_steps)
    if variant == "reweighted":
        parts.optimizer.__class__ = ReweightedRDA
    elif variant == "lambda-ramp":
        parts.optimizer.__class__ = LambdaRampRDA
        parts.optimizer.final = cfg.optim.lambda_
        parts.optimizer.ramp = tuple(int(f * total_steps) for f in cfg.optim.ramp)
    return parts


def run(variant: dict, seed: int, dataset: str) -> dict:
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_data(dataset)
    values = dict(variant)
    kind, cut = values.pop("variant", None), values.pop("cut", None)
    cfg = TrainConfig.build(**values, seed=seed, dataset=dataset)
    steps_per_epoch = len(x_train) // BATCH
    torch.manual_seed(seed)
    model = build_model(cfg.model, in_channels=x_train.shape[1], image_size=x_train.shape[2],
                        num_classes=int(y_train.max()) + 1, init_scale=cfg.init_scale)
    parts = build(cfg, kind, model, cfg.optimizer_epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    started, before_finetune = time.perf_counter(), None
    for epoch in range(1, cfg.epochs + 1):
        if epoch == cfg.optimizer_epochs + 1:
            before_finetune = (accuracy(model, x_test, y_test), sparsity(model))
            if kind == "cut":
                weights = [w for _, w in prunable_weights(model)]
                with torch.no_grad():
                    for weight, keep in zip(weights, magnitude_masks(weights, cut), strict=True):
                        weight.mul_(keep)
            parts = cfg.optim.build_finetune(model, cfg.finetune_epochs * steps_per_epoch)
        elif 1 < epoch <= cfg.optimizer_epochs and kind == "reweighted":
            parts.optimizer.refresh()
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(steps_per_epoch):
            batch = perm[i * BATCH:(i + 1) * BATCH]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            parts.optimizer.zero_grad()
            loss.backward()
            parts.step()
        if epoch <= cfg.optimizer_epochs:
            parts.settle()
        if not torch.isfinite(loss):
            break
    return {"variant": variant, "seed": seed, "accuracy": accuracy(model, x_test, y_test),
            "sparsity": sparsity(model), "before_finetune": before_finetune,
            "layers": {name: round(s, 3) for name, s in layer_sparsity(model).items()},
            "seconds": round(time.perf_counter() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+",
                        help='e.g. "optimizer=rda target_sparsity=0.98 epochs=20"')
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (processes)")
    args = parser.parse_args()
    variants = [parse_variant(text) for text in args.variants]
    for variant in variants:  # a bad key fails here, before any training
        values = dict(variant)
        if values.pop("variant", None) not in (None, *VARIANTS):
            raise SystemExit(f"variant must be one of {', '.join(VARIANTS)}")
        values.pop("cut", None)
        TrainConfig.build(**values)
    jobs = [(variant, seed) for variant in variants for seed in args.seeds]
    print("| variant | seed | accuracy | sparsity | before fine-tune | per-layer sparsity | s |")
    print("| --- | ---: | ---: | ---: | --- | --- | ---: |")
    accuracies: dict[str, list[float]] = {}
    with ProcessPoolExecutor(args.parallel) as pool:
        for r in pool.map(run, *zip(*jobs, strict=True), [args.dataset] * len(jobs)):
            before = ("-" if r["before_finetune"] is None
                      else "{:.2%} at {:.2%}".format(*r["before_finetune"]))
            layers = " ".join(f"{k} {v:.0%}" for k, v in r["layers"].items())
            text = " ".join(f"{k}={v}" for k, v in r["variant"].items())
            print(f"| {text} | {r['seed']} | {r['accuracy']:.2%} | {r['sparsity']:.2%} | "
                  f"{before} | {layers} | {r['seconds']} |", flush=True)
            accuracies.setdefault(text, []).append(r["accuracy"])
    print("\n| variant | accuracy, mean ± sd over seeds | n |\n| --- | ---: | ---: |")
    for text, values in accuracies.items():
        spread = f" ± {statistics.stdev(values):.2%}" if len(values) > 1 else ""
        print(f"| {text} | {statistics.mean(values):.2%}{spread} | {len(values)} |")


if __name__ == "__main__":
    main()
