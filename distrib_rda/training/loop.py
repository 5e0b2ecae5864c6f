"""The training loop that every Ray Train worker runs: one readable loop, DDP in plain sight."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distrib_rda.config import TrainConfig
from distrib_rda.data import build_loaders, ensure_converted
from distrib_rda.models import build_model
from distrib_rda.optim import RDA
from distrib_rda.optim.parts import OptimizerParts
from distrib_rda.sparsity import layer_sparsity, nonzeros, sparsity
from distrib_rda.tracking import preprocessing_of
from distrib_rda.training import checkpoint
from distrib_rda.training.dual_sync import LocalDualAveraging

# The train_loop_config key of a model factory given as a Python callable (distrib_rda.train).
MODEL_FACTORY = "model_factory"
# Ray Train 2.60 logs every ray.train.report() at INFO, with the whole metrics dict, under a
# logger named by its source file: outside "ray.train", so LoggingConfig does not quiet it.
REPORT_LOGGER = "ray/train/v2/_internal/execution/context.py"


def quiet_report_logging() -> None:
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(REPORT_LOGGER):
            logging.getLogger(name).setLevel(logging.WARNING)


class NonFiniteError(FloatingPointError):
    """A NaN or Inf appeared; the message names the step and the layer."""


def first_nonfinite_layer(model: nn.Module) -> str:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            return f"parameter {name}"
        if param.grad is not None and not torch.isfinite(param.grad).all():
            return f"gradient of {name}"
    return "the loss (parameters and gradients are finite)"


# Steps between two reads of the non-finite flag: one host sync per this many steps.
NONFINITE_CHECK_EVERY = 32


class NonFiniteWatch:
    """The first step whose loss was not finite, kept in a tensor on the loss's device, as
    GradScaler keeps ``found_inf``: :meth:`observe` adds no host sync, :meth:`check` reads the
    flag (one sync) and raises :class:`NonFiniteError` naming that step and the first
    parameter or gradient that is not finite at the check. :meth:`check_due` checks at every
    ``every``-th step, before its update; ``every=1`` stops a run before a non-finite step
    updates the weights, a larger one lets up to ``every - 1`` such steps through."""

    def __init__(self, every: int = 1):
        self.every = every
        self.first_bad: torch.Tensor | None = None  # 0 while every loss was finite

    def observe(self, loss: torch.Tensor, step: int) -> None:
        if self.first_bad is None:
            self.first_bad = torch.zeros((), dtype=torch.int64, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad == 0)
        self.first_bad.masked_fill_(bad, step)

    def check_due(self, model: nn.Module, step: int) -> None:
        if step % self.every == 0:
            self.check(model, step)

    def check(self, model: nn.Module, step: int) -> None:
        bad = 0 if self.first_bad is None else int(self.first_bad.item())
        if bad:
            module = model.module if isinstance(model, DistributedDataParallel) else model
            seen = "" if bad == step else f" (seen at the check of step {step})"
            raise NonFiniteError(
                f"non-finite loss at step {bad}: {first_nonfinite_layer(module)}{seen}")


def autocast(device: torch.device, precision: str):
    """The context of the forward pass: bfloat16 autocast for ``precision="bf16"`` (weights,
    gradients and optimizer state stay float32), nothing for ``"fp32"``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def place_model(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` on ``device``; a conv net on CUDA in ``channels_last`` memory order (before
    any optimizer state is made from its parameters), the layout of the batches there."""
    module.to(device)
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in module.modules()):
        module.to(memory_format=torch.channels_last)
    return module


def train_step(model: nn.Module, parts: OptimizerParts, dual: LocalDualAveraging,
               images: torch.Tensor, labels: torch.Tensor, step: int, *,
               watch: NonFiniteWatch | None = None, precision: str = "fp32") -> torch.Tensor:
    """One step: forward (under :func:`autocast`), backward (all-reduced by DDP unless local
    dual averaging), update. ``watch`` flags a non-finite loss without a host sync and raises
    on its check steps; without one, every step is checked before its update."""
    watch = NonFiniteWatch(every=1) if watch is None else watch
    no_sync = model.no_sync() if dual.local and isinstance(model, DistributedDataParallel) \
        else nullcontext()
    with no_sync:
        with autocast(images.device, precision):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    watch.observe(loss, step)
    watch.check_due(model, step)
    parts.step()
    dual.after_step()
    return loss.detach()


@torch.no_grad()
def take_rank0_buffers(module: nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm's running statistics), the ones its
    checkpoint saves. The weights agree across ranks already; the buffers do not, since each
    rank updates them with its own batches after DDP last broadcast them."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


@torch.no_grad()
def evaluate(model: nn.Module, test_loader, device: torch.device) -> tuple[float, float]:
    """Exact accuracy and loss over the whole test set: each rank holds a disjoint part.

    Every rank evaluates the same model, rank 0's (:func:`take_rank0_buffers`): the reported
    accuracy is the accuracy of the model that is saved."""
    take_rank0_buffers(model)
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for images, labels in test_loader:
        logits = model(images)
        totals[0] += (logits.argmax(1) == labels).sum()
        totals[1] += F.cross_entropy(logits, labels, reduction="sum")
        totals[2] += labels.numel()
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train()
    correct, loss_sum, count = totals.tolist()
    return correct / count, loss_sum / count


def epoch_metrics(module: nn.Module, epoch: int, train_loss: float, accuracy: float,
                  test_loss: float, seconds: float, samples: int) -> dict[str, Any]:
    metrics = {
        "epoch": epoch, "train_loss": train_loss, "accuracy": accuracy, "test_loss": test_loss,
        "sparsity": sparsity(module), "nonzeros": nonzeros(module),
        "epoch_seconds": seconds, "samples_per_second": samples / seconds,
    }
    metrics.update({f"sparsity/{name}": value for name, value in layer_sparsity(module).items()})
    return metrics


def first_images(loader, count: int = 2) -> torch.Tensor | None:
    """The first ``count`` images of ``loader`` (normalized, on the CPU, contiguous whatever
    the loader's layout): the input example of the logged MLflow Model."""
    for images, _ in loader:
        return images[:count].detach().to("cpu", memory_format=torch.contiguous_format,
                                          copy=True)
    return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    began = time.perf_counter()
    quiet_report_logging()
    model_factory = config.get(MODEL_FACTORY)  # a Python API user's own callable
    cfg = TrainConfig.build(**{k: v for k, v in config.items() if k != MODEL_FACTORY})
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg.gpu else torch.device("cpu")
    threads = torch.get_num_threads()

    resumed = ray.train.get_checkpoint()
    state = None
    if resumed is not None:
        with resumed.as_directory() as directory:
            state = checkpoint.load(directory)
    start_epoch = state["epoch"] if state else 0
    history: list[dict[str, Any]] = state["history"] if state else []

    loaders_began = time.perf_counter()
    beton_dir = ensure_converted(cfg.dataset, data_root=cfg.data_root, download=cfg.download,
                                 cache_dir=cfg.cache_dir, image_size=cfg.image_size)
    loaders = build_loaders(beton_dir, batch_size=cfg.per_worker_batch_size, seed=cfg.seed,
                            start_epoch=start_epoch, subset=cfg.subset, augment=cfg.augment,
                            num_workers=cfg.loader_workers, device=device)
    torch.set_num_threads(threads)  # FFCV resets it when a loader is made
    loader_seconds = time.perf_counter() - loaders_began

    torch.manual_seed(cfg.seed)
    model_args = loaders.meta.model_args
    module = place_model(build_model(model_factory or cfg.model, **model_args,
                                     init_scale=cfg.init_scale), device)
    if state:
        module.load_state_dict(state["model"])
    # Alone, DDP still all-reduces over a group of one every step: a gloo round trip for nothing.
    model = DistributedDataParallel(module) if world_size > 1 else module

    steps_per_epoch = len(loaders.train)
    total_epochs, own_epochs = cfg.epochs, cfg.optimizer_epochs
    finetune_steps = steps_per_epoch * cfg.finetune_epochs
    if start_epoch > own_epochs:  # resuming inside the fine-tune
        parts = cfg.optim.build_finetune(module, total_steps=finetune_steps)
    else:
        parts = cfg.optim.build(module, total_steps=steps_per_epoch * own_epochs)
    if state:
        parts.load_state_dict(state["optimizer"])
        checkpoint.set_rng_state(state["rng"])
    dual = LocalDualAveraging(parts.optimizer, every=cfg.sync_every)
    watch = NonFiniteWatch(every=NONFINITE_CHECK_EVERY)
    example_began = time.perf_counter()
    example = first_images(loaders.test) if rank == 0 else None  # compiles the test pipeline
    loader_seconds += time.perf_counter() - example_began
    # What this worker group spent before its first step; reported with its first epoch.
    startup = {"setup_seconds": time.perf_counter() - began, "loader_seconds": loader_seconds}

    for epoch in range(start_epoch + 1, total_epochs + 1):
        if epoch in getattr(cfg.optim, "restart", ()):
            parts.optimizer.restart()
        if epoch == own_epochs + 1:
            # The fine-tune starts: the support is fixed from here.
            parts = cfg.optim.build_finetune(module, total_steps=finetune_steps)
            dual = LocalDualAveraging(parts.optimizer, every=1)
        started = time.perf_counter()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
        for batch, (images, labels) in enumerate(loaders.train):
            step = (epoch - 1) * steps_per_epoch + batch + 1
            loss = train_step(model, parts, dual, images, labels, step, watch=watch,
                              precision=cfg.precision)
            loss_sum[0] += loss * labels.numel()
            loss_sum[1] += labels.numel()
        watch.check(model, epoch * steps_per_epoch)  # the epoch's end
        dual.after_step(force=True)  # every rank ends the epoch with the same weights
        parts.settle()
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.all_reduce(loss_sum)
        seconds = time.perf_counter() - started
        evaluated = time.perf_counter()
        accuracy, test_loss = evaluate(module, loaders.test, device)
        metrics = epoch_metrics(module, epoch, loss_sum[0].item() / loss_sum[1].item(),
                                accuracy, test_loss, seconds, int(loss_sum[1].item()))
        metrics["eval_seconds"] = time.perf_counter() - evaluated
        metrics.update(startup)
        startup = {}
        if isinstance(parts.optimizer, RDA):  # the l1 strength: given, or found for a target
            metrics["lambda"] = parts.optimizer.param_groups[0]["lambda_"]
        if epoch > own_epochs:
            before = history[own_epochs - 1]
            metrics["accuracy_before_finetune"] = before["accuracy"]
            metrics["sparsity_before_finetune"] = before["sparsity"]
        if not all(math.isfinite(p.abs().sum().item()) for p in module.parameters()):
            raise NonFiniteError(f"non-finite weights after epoch {epoch}: "
                                 f"{first_nonfinite_layer(module)}")
        history.append(metrics)
        if rank == 0:
            print(format_epoch(metrics, total_epochs), flush=True)
        if epoch % cfg.checkpoint_every == 0 or epoch == total_epochs:
            report_with_checkpoint(metrics, rank, {
                "model": module.state_dict(), "optimizer": parts.state_dict(), "epoch": epoch,
                "rng": checkpoint.rng_state(), "history": history,
                "config": cfg.to_dict(), "model_args": model_args,
                "world_size": world_size, "preprocessing": preprocessing_of(loaders.meta),
                "example": example,
            })
        else:
            ray.train.report(metrics)


def report_with_checkpoint(metrics: dict[str, Any], rank: int, state: dict[str, Any]) -> None:
    """Every rank reports (a barrier); only rank 0 writes the checkpoint, and adds the seconds
    that writing it took to its metrics (``checkpoint_seconds``)."""
    with tempfile.TemporaryDirectory() as directory:
        ray_checkpoint = None
        if rank == 0:
            began = time.perf_counter()
            checkpoint.save(directory, state)
            metrics["checkpoint_seconds"] = time.perf_counter() - began
            ray_checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=ray_checkpoint)


def format_epoch(metrics: dict[str, Any], epochs: int) -> str:
    return (f"epoch {metrics['epoch']:>3}/{epochs}  loss {metrics['train_loss']:.4f}  "
            f"accuracy {metrics['accuracy']:.2%}  sparsity {metrics['sparsity']:.2%}  "
            f"non-zeros {metrics['nonzeros']:,}  {metrics['epoch_seconds']:.1f}s  "
            f"{metrics['samples_per_second']:,.0f} samples/s")
