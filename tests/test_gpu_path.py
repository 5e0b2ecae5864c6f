"""The GPU path (issue 18, part 3): uint8 batches normalized and augmented on the device,
bf16 autocast, channels_last, the deferred non-finite check and the fused RDA default.

Everything here runs on the CPU except the tests marked ``gpu``, which need CUDA and are
skipped without it (benchmarks/gpu_check.sh runs them on a machine with a GPU).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

from distrib_rda.config import TrainConfig
from distrib_rda.data import build_loaders
from distrib_rda.data.convert import write_dataset
from distrib_rda.data.ops import crop_flip_normalize, lookup_table
from distrib_rda.data.sources import Arrays
from distrib_rda.models import build_model
from distrib_rda.optim import RDA, rda_param_groups
from distrib_rda.optim.parts import OptimizerParts
from distrib_rda.optim.rda import resolve_fused
from distrib_rda.training import checkpoint, run_training
from distrib_rda.training.dual_sync import LocalDualAveraging
from distrib_rda.training.loop import (
    NonFiniteError,
    NonFiniteWatch,
    autocast,
    place_model,
    train_step,
)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA device; benchmarks/gpu_check.sh runs it on a GPU machine")


@pytest.fixture(scope="module")
def rgb_dir():
    """A small generated 32x32 RGB dataset as .beton files (crop and flip apply to it)."""
    rng = np.random.default_rng(0)
    arrays = Arrays(
        rng.integers(0, 256, (640, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, 640).astype(np.int64),
        rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, 100).astype(np.int64),
        tuple(str(i) for i in range(10)),
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rgb"
        write_dataset(arrays, out, dataset="generated-rgb", source="test arrays")
        yield out


def small_parts(model: nn.Module, gamma: float = 1.0,
                **kwargs) -> tuple[OptimizerParts, LocalDualAveraging]:
    parts = OptimizerParts(RDA(rda_param_groups(model, 1e-4), gamma=gamma, warmup=10.0,
                               **kwargs))
    return parts, LocalDualAveraging(parts.optimizer, every=1)


def conv_net(device: str = "cpu", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet20", in_channels=3, image_size=32, num_classes=10).to(device)


def batch(seed: int = 1, n: int = 16, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return images.to(device), labels.to(device)


# ------------------------------------------------------------------------- the loader


def candidates(image: torch.Tensor, table: torch.Tensor, pad: int) -> torch.Tensor:
    """Every crop (offsets 0..2P) and mirror of one uint8 (H, W, C) image, normalized:
    the reference for crop_flip_normalize, written the slow way."""
    height, width, channels = image.shape
    padded = F.pad(image, (0, 0, pad, pad, pad, pad))
    out = []
    for mirror in (False, True):
        source = padded.flip(1) if mirror else padded
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                # mirroring the padded image moves the crop window: x' + dx reads column
                # W + 2P - 1 - (x' + dx) of the unmirrored one
                start = 2 * pad - dx if mirror else dx
                crop = source[dy:dy + height, start:start + width]
                out.append(table.view(256, channels)[crop.long(), torch.arange(channels)])
    return torch.stack(out)


def test_device_op_without_augmentation_is_the_lookup_table():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 7, 6, 3), dtype=torch.uint8, generator=gen)
    table = torch.from_numpy(lookup_table([120.0, 110.5, 90.0], [60.0, 61.0, 62.5]))
    out = crop_flip_normalize(images, table.view(-1), torch.empty(5, 7, 6, 3))
    want = table[images.long(), torch.arange(3)]
    assert torch.equal(out, want)


def test_device_crop_and_flip_draw_the_host_ops_crops():
    """Each output image is one of the (2P + 1)^2 crops, mirrored or not, of its input, and
    the draws cover both mirrors and many offsets."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 8, 8, 3), dtype=torch.uint8, generator=gen)
    table = torch.from_numpy(lookup_table([100.0] * 3, [50.0] * 3)).view(-1)
    out = crop_flip_normalize(images, table, torch.empty(64, 8, 8, 3), crop_padding=2, flip=True,
                              generator=torch.Generator().manual_seed(1))
    chosen = []
    for image, got in zip(images, out, strict=True):
        matches = (candidates(image, table, 2) == got).flatten(1).all(1).nonzero().flatten()
        assert len(matches) >= 1
        chosen.append(int(matches[0]))
    assert {index >= 25 for index in chosen} == {False, True}  # both mirrors drawn
    assert len(set(chosen)) > 20


def test_device_normalization_gives_the_host_batches_in_channels_last(rgb_dir):
    host = build_loaders(rgb_dir, batch_size=64, seed=0, augment=False, num_workers=1,
                         normalize_on="host")
    device = build_loaders(rgb_dir, batch_size=64, seed=0, augment=False, num_workers=1,
                           normalize_on="device")
    for split in ("train", "test"):
        pairs = list(zip(getattr(host, split), getattr(device, split), strict=True))
        assert pairs
        for (x, y), (x2, y2) in pairs:
            assert x.is_contiguous() and x2.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_device_augmentation_crops_and_flips_the_same_images(rgb_dir):
    plain = build_loaders(rgb_dir, batch_size=64, seed=3, augment=False, num_workers=1,
                          normalize_on="device")
    augmented = build_loaders(rgb_dir, batch_size=64, seed=3, augment=True, num_workers=1,
                              normalize_on="device")
    (x, y), (x2, y2) = next(iter(plain.train)), next(iter(augmented.train))
    assert torch.equal(y, y2) and x2.shape == x.shape and not torch.equal(x, x2)
    # A crop moves an image by at most 4 pixels and a flip mirrors it, so each augmented
    # image agrees with its source on the centre after undoing the draw; check one offset set
    # covers it: some (dy, dx, mirror) reproduces the centre 24x24 exactly.
    for source, got in zip(x[:8], x2[:8], strict=True):
        found = False
        for mirror in (False, True):
            image = source.flip(-1) if mirror else source
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    window = image[:, 4 + dy:28 + dy, 4 + dx:28 + dx]
                    found |= torch.equal(window, got[:, 4:28, 4:28])
        assert found


def test_normalize_on_is_checked(rgb_dir):
    from distrib_rda.errors import UserError

    with pytest.raises(UserError, match="normalize_on"):
        build_loaders(rgb_dir, batch_size=8, seed=0, normalize_on="gpu")


# ----------------------------------------------------------------- precision and layout


def test_bf16_step_runs_the_forward_in_bf16_and_keeps_float32_state():
    model = conv_net()
    parts, dual = small_parts(model)
    images, labels = batch()
    with autocast(images.device, "bf16"):
        assert model(images).dtype == torch.bfloat16
    losses = [train_step(model, parts, dual, images, labels, step, precision="bf16")
              for step in (1, 2, 3)]
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    for p in model.parameters():
        assert p.dtype == torch.float32
        state = parts.optimizer.state[p]
        assert state["dual_sum"].dtype == state["center"].dtype == torch.float32
    fp32 = conv_net()
    reference = F.cross_entropy(fp32(images), labels)
    assert losses[0].item() == pytest.approx(reference.item(), rel=0.05)


def test_channels_last_gives_the_loss_of_contiguous():
    """The same net and batches, contiguous and channels_last, over a few RDA steps (small
    ones, so that rounding is not amplified): the losses agree within float32 tolerance, and
    the optimizer state keeps the layout."""
    runs = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = conv_net().to(memory_format=layout)
        parts, dual = small_parts(model, gamma=20.0)
        losses = []
        for step in range(1, 4):
            images, labels = batch(seed=step)
            losses.append(train_step(model, parts, dual, images.to(memory_format=layout),
                                     labels, step).item())
        weight = next(p for p in model.parameters() if p.dim() == 4)
        assert parts.optimizer.state[weight]["dual_sum"].is_contiguous(memory_format=layout)
        runs.append(losses)
    assert runs[0] == pytest.approx(runs[1], rel=1e-4, abs=1e-5)


def test_place_model_leaves_cpu_models_contiguous():
    model = place_model(conv_net(), torch.device("cpu"))
    assert all(p.is_contiguous() for p in model.parameters())


# ----------------------------------------------------------------- the non-finite check


def test_deferred_check_stops_at_its_step_and_names_the_bad_step():
    """Checking every 4th step: a non-finite loss at step 6 goes through steps 6 and 7 and
    stops the run at step 8's check, which names step 6 and a layer."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    parts, dual = small_parts(model)
    watch = NonFiniteWatch(every=4)
    images, labels = batch()
    for step in range(1, 8):
        bad = images.clone().fill_(float("inf")) if step == 6 else images
        train_step(model, parts, dual, bad, labels, step, watch=watch)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 6: (parameter|gradient) "
                                             r".*seen at the check of step 8"):
        train_step(model, parts, dual, images, labels, 8, watch=watch)


def test_check_at_the_epochs_end_names_the_first_bad_step():
    model = nn.Linear(3, 2)
    parts = OptimizerParts(torch.optim.SGD(model.parameters(), lr=0.1))
    dual = LocalDualAveraging(parts.optimizer, every=1)
    watch = NonFiniteWatch(every=100)
    images, labels = torch.ones(4, 3), torch.zeros(4, dtype=torch.long)
    for step, scale in ((1, 1.0), (2, float("nan")), (3, float("inf")), (4, 1.0)):
        train_step(model, parts, dual, images * scale, labels, step, watch=watch)
    with pytest.raises(NonFiniteError, match=r"at step 2: .*check of step 4"):
        watch.check(model, 4)


def test_a_finite_run_passes_every_check():
    model = nn.Linear(3, 2)
    parts = OptimizerParts(torch.optim.SGD(model.parameters(), lr=0.1))
    dual = LocalDualAveraging(parts.optimizer, every=1)
    watch = NonFiniteWatch(every=2)
    for step in range(1, 6):
        train_step(model, parts, dual, torch.randn(4, 3), torch.zeros(4, dtype=torch.long),
                   step, watch=watch)
    watch.check(model, 5)


# ----------------------------------------------------------------- the fused default


def test_fused_default_is_cuda_only_and_explicit_choices_win():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_fused(None, None, cpu) is False
    assert resolve_fused(True, None, cpu) is True
    assert resolve_fused(False, None, cuda) is False
    assert resolve_fused(None, True, cuda) is False
    assert resolve_fused(None, False, cuda) is False


# ----------------------------------------------------------------- end to end


def test_bf16_run_trains_and_is_recorded_end_to_end(ray_local, tmp_path, beton_cache,
                                                     tracking_uri):
    cfg = TrainConfig.build(subset=4096, batch_size=64, epochs=2, workers=1, loader_workers=1,
                            precision="bf16", cache_dir=beton_cache, name="bf16",
                            storage=tmp_path / "results", tracking_uri=tracking_uri,
                            experiment="gpu-path")
    summary = run_training(cfg)
    assert 0.4 < summary["accuracy"] <= 1.0  # 10 classes: chance is 0.1
    run = MlflowClient(tracking_uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["precision"] == "bf16"
    state = checkpoint.load(summary["checkpoint"])
    assert state["config"]["precision"] == "bf16"
    assert all(value.dtype == torch.float32 for value in state["model"].values()
               if value.is_floating_point())
    assert json.dumps(state["config"])  # the config round-trips as JSON


# ----------------------------------------------------------------- on a GPU


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.gpu
@needs_cuda
def test_gpu_loader_normalizes_on_the_device(rgb_dir, augment):
    device = torch.device("cuda", 0)
    on_gpu = build_loaders(rgb_dir, batch_size=64, seed=0, augment=augment, num_workers=1,
                           device=device)
    host = build_loaders(rgb_dir, batch_size=64, seed=0, augment=False, num_workers=1)
    for (x, y), (x2, y2) in zip(on_gpu.test, host.test, strict=True):
        assert x.device == device and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x.cpu(), x2) and torch.equal(y.cpu(), y2)
    images, labels = next(iter(on_gpu.train))
    assert images.device == device and images.dtype == torch.float32
    assert labels.device == device and labels.dtype == torch.int64



@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.gpu
@needs_cuda
def test_gpu_steps_run_fused_channels_last_and_never_sync(precision):
    """On CUDA: the conv net is channels_last, RDA's default is the generated kernel, and once
    compiled, training steps (forward, backward, the non-finite flag, the update) make no
    host sync at all: torch raises at the first one in sync-debug mode "error"."""
    import distrib_rda.optim.rda as rda_module

    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = place_model(build_model("lenet5", in_channels=3, image_size=32, num_classes=10),
                        device)
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters() if p.dim() == 4)
    parts, dual = small_parts(model)
    watch = NonFiniteWatch(every=1000)
    images, labels = batch(n=64, device="cuda")
    images = images.contiguous(memory_format=torch.channels_last)
    for step in (1, 2):  # compiles
        train_step(model, parts, dual, images, labels, step, watch=watch, precision=precision)
    assert rda_module._fused_kernel in rda_module._compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3, 9):
            loss = train_step(model, parts, dual, images, labels, step, watch=watch,
                              precision=precision)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    watch.check(model, 8)
    for p in model.parameters():
        assert parts.optimizer.state[p]["dual_sum"].dtype == torch.float32


@pytest.mark.gpu
@needs_cuda
def test_gpu_fused_default_equals_the_eager_kernels():
    device = torch.device("cuda", 0)
    results = []
    for foreach in (None, True):  # None: the generated kernel on CUDA
        torch.manual_seed(0)
        model = build_model("lenet5", in_channels=3, image_size=32, num_classes=10).to(device)
        optimizer = RDA(rda_param_groups(model, 1e-3), gamma=1.0, warmup=5.0, foreach=foreach)
        for step in range(1, 5):
            images, labels = batch(seed=step, device="cuda")
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for fused, eager in zip(*results, strict=True):
        assert fused.device.type == device.type
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_gpu_deferred_check_names_the_step():
    device = torch.device("cuda", 0)
    model = place_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(),
                                      nn.Linear(4 * 30 * 30, 10)), device)
    parts = OptimizerParts(torch.optim.SGD(model.parameters(), lr=0.1))
    dual = LocalDualAveraging(parts.optimizer, every=1)
    watch = NonFiniteWatch(every=4)
    images, labels = batch(device="cuda")
    for step in range(1, 4):
        bad = images * float("nan") if step == 2 else images
        train_step(model, parts, dual, bad, labels, step, watch=watch)
    with pytest.raises(NonFiniteError, match=r"at step 2: .*check of step 4"):
        train_step(model, parts, dual, images, labels, 4, watch=watch)
