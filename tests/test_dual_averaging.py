"""All-reduced dual averages with 2 real Ray Train workers (DESIGN.md §3).

Each worker runs the product's own `train_step` on its half of fixed batches and saves its dual
state after every step; the test compares ranks, and compares them with one process fed the
concatenated batches.
"""

from __future__ import annotations

import sys

import pytest
import ray.cloudpickle
import ray.train
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch.nn.parallel import DistributedDataParallel

from distrib_rda.models import build_model
from distrib_rda.optim import RDA, rda_param_groups
from distrib_rda.optim.parts import OptimizerParts
from distrib_rda.training.dual_sync import LocalDualAveraging
from distrib_rda.training.loop import train_step

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEPS = 8
GLOBAL_BATCH = 16


def fixed_batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=generator),
             torch.randint(0, 10, (GLOBAL_BATCH,), generator=generator)) for _ in range(STEPS)]


def make_parts(adaptive: bool):
    torch.manual_seed(0)
    model = build_model("lenet5", in_channels=1, image_size=28, num_classes=10)
    optimizer = RDA(rda_param_groups(model, 1e-3), gamma=0.5, adaptive=adaptive)
    return model, OptimizerParts(optimizer)


def dual_state(optimizer) -> list[torch.Tensor]:
    return [tensor.clone() for tensor in optimizer.dual_state_tensors()]


def worker_loop(config):
    rank, world = dist.get_rank(), dist.get_world_size()
    model, parts = make_parts(config["adaptive"])
    ddp = DistributedDataParallel(model)
    dual = LocalDualAveraging(parts.optimizer, every=config["sync_every"])
    states = []
    for step, (images, labels) in enumerate(fixed_batches(), start=1):
        shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        train_step(ddp, parts, dual, images[shard], labels[shard], step)
        states.append({"dual": dual_state(parts.optimizer),
                       "weights": [p.detach().clone() for p in model.parameters()],
                       "synced": dual.steps_since_sync == 0})
    torch.save({"states": states, "all_reduces": dual.all_reduces},
               f"{config['out']}/rank{rank}.pt")
    ray.train.report({"done": 1})


def run_workers(tmp_path, sync_every: int, adaptive: bool = False):
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"sync_every": sync_every, "adaptive": adaptive, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="dual"),
    )
    trainer.fit()
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


@pytest.mark.parametrize("adaptive", [False, True])
def test_sync_every_step_equals_one_process_on_the_concatenated_batch(ray_local, tmp_path,
                                                                       adaptive):
    ranks = run_workers(tmp_path, sync_every=1, adaptive=adaptive)
    model, parts = make_parts(adaptive)
    dual = LocalDualAveraging(parts.optimizer, every=1)
    for step, (images, labels) in enumerate(fixed_batches(), start=1):
        train_step(model, parts, dual, images, labels, step)
        reference = dual_state(parts.optimizer)
        for rank in ranks:
            state = rank["states"][step - 1]
            for got, want in zip(state["dual"], reference, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for got0, got1 in zip(ranks[0]["states"][step - 1]["dual"],
                              ranks[1]["states"][step - 1]["dual"], strict=True):
            assert torch.equal(got0, got1)
    assert ranks[0]["all_reduces"] == 0  # H = 1: DDP all-reduces gradients, not dual state


def test_local_dual_averaging_all_reduces_every_h_steps(ray_local, tmp_path):
    every = 4
    ranks = run_workers(tmp_path, sync_every=every)
    assert [rank["all_reduces"] for rank in ranks] == [STEPS // every] * 2
    for step in range(STEPS):
        first, second = ranks[0]["states"][step], ranks[1]["states"][step]
        identical = all(torch.equal(a, b) for a, b in zip(first["dual"], second["dual"],
                                                          strict=True))
        weights_identical = all(torch.equal(a, b) for a, b in zip(
            first["weights"], second["weights"], strict=True))
        if (step + 1) % every == 0:
            assert first["synced"] and identical and weights_identical, f"step {step + 1}"
        else:  # between syncs each rank follows its own data
            assert not first["synced"] and not identical, f"step {step + 1}"
