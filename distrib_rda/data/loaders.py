"""FFCV loaders over a converted dataset directory: one rank's training and test batches.

Each batch is ``(images, labels)`` on ``device``: ``images`` float32 ``(N, C, H, W)``,
``(p − mean_c) / std_c`` with the training-set statistics of ``meta.json`` (pixels ``p`` in
``[0, 255]``); ``labels`` int64 ``(N,)``. Where the work happens (``normalize_on``):

- ``"host"`` (the default for a CPU ``device``): FFCV's threads crop, flip and normalize on the
  CPU in one numba pass (:class:`~distrib_rda.data.ops.NormalizeToCHW`); ``images`` are
  contiguous.
- ``"device"`` (the default for a CUDA ``device``): uint8 images are copied to the device and
  cropped, flipped and normalized there (:class:`~distrib_rda.data.ops.NormalizeOnDevice`,
  the same values); ``images`` are ``channels_last``, the layout the model takes on CUDA.

The batches live in buffers that FFCV reuses a few batches later: clone what you keep
beyond the current step (``images.clone()``, ``loss.item()`` is fine).

Training order: ``OrderOption.RANDOM`` with ``seed``; epoch ``e`` is shuffled with
``seed + e`` alone, or, under an initialized ``torch.distributed`` process group, by a
``DistributedSampler(seed=seed)`` at epoch ``e``: every rank must pass the same ``seed``, and
each rank draws ``ceil(N / world)`` samples, the shards padded to equal length as PyTorch
pads them. ``QUASI_RANDOM`` is not used: FFCV has not implemented it for ``distributed=True``.
Create the loaders after the process group exists. ``start_epoch`` sets ``next_epoch``, so a
resumed run sees the same order as an uninterrupted one.

Test order: rank ``r`` of ``w`` reads samples ``r, r + w, r + 2w, ...`` in order, with no
padding and no dropped batch, so the ranks together see every test image exactly once.
(FFCV's own ``distributed=True`` pads uneven shards with duplicates, which would count some
images twice.)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from distrib_rda.data.convert import check_beton
from distrib_rda.data.meta import DatasetMeta
from distrib_rda.data.threads import import_ffcv
from distrib_rda.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]
CPU = torch.device("cpu")


class BetonLoader:
    """One rank's view of a ``.beton`` file; iterate for one epoch of ``(images, labels)``.

    Wraps an ``ffcv.loader.Loader`` (``.ffcv``, ``None`` when this rank has no samples) and
    puts torch's thread count back after FFCV changes it (see :mod:`distrib_rda.data.threads`).
    """

    def __init__(self, loader: Any, *, num_samples: int, batch_size: int):
        self.ffcv = loader
        self.num_samples = num_samples
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.ffcv) if self.ffcv is not None else 0

    @property
    def next_epoch(self) -> int:
        return self.ffcv.next_epoch if self.ffcv is not None else 0

    @next_epoch.setter
    def next_epoch(self, epoch: int) -> None:
        if self.ffcv is not None:
            self.ffcv.next_epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        if self.ffcv is None:
            return
        threads = torch.get_num_threads()
        epoch = iter(self.ffcv)
        torch.set_num_threads(threads)
        try:
            first = True
            for batch in epoch:
                if first:  # the epoch thread has set the count by the time it delivers
                    torch.set_num_threads(threads)
                    first = False
                yield batch
        finally:
            epoch.close()
            torch.set_num_threads(threads)


class Loaders(NamedTuple):
    train: BetonLoader
    test: BetonLoader
    meta: DatasetMeta


def build_loaders(
    beton_dir: str | Path,
    *,
    batch_size: int,
    seed: int,
    start_epoch: int = 0,
    subset: int | None = None,
    augment: bool | None = None,
    num_workers: int = 2,
    device: torch.device | str = CPU,
    normalize_on: str | None = None,
) -> Loaders:
    """Training and test loaders for this rank over ``beton_dir`` (see the module docstring).

    ``batch_size`` is per rank. ``subset=N`` trains on the first ``N`` training images.
    ``augment=None`` means random crop (padding 4) + horizontal flip for 32x32 colour data and
    nothing otherwise; ``True``/``False`` force it. ``num_workers`` is FFCV's thread count,
    capped at numba's ``NUMBA_NUM_THREADS`` (the machine's cores by default).
    The training loader drops the last partial batch unless a rank has less than one batch.
    ``normalize_on`` is ``"host"`` or ``"device"`` (see the module docstring); ``None`` picks
    ``"device"`` for CUDA and ``"host"`` otherwise. With ``"device"`` the crop and flip draw
    from a generator seeded with ``seed`` and the rank.
    """
    ffcv = import_ffcv()
    beton_dir = Path(beton_dir).expanduser()
    meta = DatasetMeta.load(beton_dir)
    train_file, test_file = beton_dir / "train.beton", beton_dir / "test.beton"
    check_beton(train_file, meta, meta.num_train)
    check_beton(test_file, meta, meta.num_test)
    for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 1),
                             ("start_epoch", start_epoch, 0)):
        if int(value) != value or value < low:
            raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    if subset is not None and not 1 <= subset <= meta.num_train:
        raise UserError(
            f"subset must be between 1 and the {meta.num_train} training images of "
            f"{beton_dir}, got {subset}"
        )
    num_workers = _thread_limit(num_workers)
    device = torch.device(device)
    if normalize_on is None:
        normalize_on = "device" if device.type == "cuda" else "host"
    if normalize_on not in ("host", "device"):
        raise UserError(f"normalize_on must be 'host' or 'device', got {normalize_on!r}")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if augment is None:
        augment = tuple(meta.shape) == (32, 32, 3)
    num_train = meta.num_train if subset is None else subset
    train_indices = np.arange(num_train, dtype=np.uint64)
    test_indices = np.arange(rank, meta.num_test, world, dtype=np.uint64)
    per_rank = math.ceil(num_train / world)

    order = ffcv.loader.OrderOption
    threads = torch.get_num_threads()
    try:
        train = ffcv.loader.Loader(
            str(train_file), batch_size=batch_size, num_workers=num_workers,
            order=order.RANDOM, distributed=distributed, seed=seed, indices=train_indices,
            drop_last=per_rank >= batch_size,
            pipelines=_pipelines(meta, augment=augment, device=device, on=normalize_on,
                                 seed=_augment_seed(seed, rank)),
        )
        train.next_epoch = start_epoch
        test = None
        if len(test_indices):
            test = ffcv.loader.Loader(
                str(test_file), batch_size=batch_size, num_workers=num_workers,
                order=order.SEQUENTIAL, distributed=False, indices=test_indices,
                drop_last=False,
                pipelines=_pipelines(meta, augment=False, device=device, on=normalize_on),
            )
    finally:
        torch.set_num_threads(threads)
    train_samples = len(train) * batch_size if train.drop_last else per_rank
    return Loaders(
        BetonLoader(train, num_samples=train_samples, batch_size=batch_size),
        BetonLoader(test, num_samples=len(test_indices), batch_size=batch_size),
        meta,
    )


def _thread_limit(num_workers: int) -> int:
    """``num_workers``, capped at numba's thread pool size (more makes FFCV's numba fail)."""
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    if num_workers > limit:
        print(f"distrib-rda: {num_workers} loader threads asked for, numba allows {limit} on "
              f"this machine (NUMBA_NUM_THREADS): using {limit}", file=sys.stderr)
    return min(num_workers, limit)


def _augment_seed(seed: int, rank: int) -> int:
    """One seed per (run seed, rank), so that ranks crop and flip their images independently."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _pipelines(meta: DatasetMeta, *, augment: bool, device: torch.device, on: str,
               seed: int = 0) -> dict[str, list]:
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    from distrib_rda.data.ops import NormalizeOnDevice, NormalizeToCHW

    crop = {"crop_padding": 4 if augment else 0, "flip": augment}
    to_device = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
    if on == "host":
        image: list = [NDArrayDecoder(), NormalizeToCHW(meta.mean, meta.std, **crop), ToTensor(),
                       *to_device]
    else:
        image = [NDArrayDecoder(), ToTensor(), *to_device,
                 NormalizeOnDevice(meta.mean, meta.std, **crop, seed=seed)]
    label: list = [IntDecoder(), ToTensor(), *to_device, Squeeze(1)]
    return {"image": image, "label": label}
