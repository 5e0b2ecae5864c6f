"""FFCV pipeline operations written for this project (importing this module imports ffcv).

Two ways to turn uint8 images into the normalized float32 batches a model takes, with the same
values:

- :class:`NormalizeToCHW`, on the CPU: a numba pass before the batch leaves FFCV (the path
  for CPU training).
- :class:`NormalizeOnDevice`, after ``ToDevice``: uint8 crosses to the GPU (a quarter of the
  float32 bytes) and the crop, the flip and the normalization run there, as torch ops on
  FFCV's CUDA stream (the path for GPU training).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numba
import numpy as np
import torch
import torch.nn.functional as F

from distrib_rda.data.threads import import_ffcv

import_ffcv()

from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402


def lookup_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``table[v, c] = (v - mean_c) / std_c`` for ``v`` in 0..255, computed in float64 and
    stored as float32: both normalizing operations read their values from it."""
    return ((np.arange(256, dtype=np.float64)[:, None] - np.asarray(mean)[None, :])
            / np.asarray(std)[None, :]).astype(np.float32)


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=True, error_model="numpy")
def normalize_to_chw(images: np.ndarray, dst: np.ndarray, table: np.ndarray, pad: int,
                     flip: bool) -> np.ndarray:
    """The kernel of :class:`NormalizeToCHW`, in parallel over the batch on numba's threads
    (FFCV sets their number to the loader's ``num_workers``). It is compiled once per machine
    and kept in numba's on-disk cache: FFCV's pipelines are generated code that numba cannot
    cache, and compiling this loop took about a second in every loader of every worker."""
    n, height, width, channels = images.shape
    for i in numba.prange(n):
        dy = np.random.randint(0, 2 * pad + 1) if pad else 0
        dx = np.random.randint(0, 2 * pad + 1) if pad else 0
        mirror = flip and np.random.random() < 0.5
        for y in range(height):
            sy = y + dy - pad
            for x in range(width):
                sx = (width - 1 - x if mirror else x) + dx - pad
                inside = 0 <= sy < height and 0 <= sx < width
                for c in range(channels):
                    value = images[i, sy, sx, c] if inside else 0
                    dst[i, c, y, x] = table[value, c]
    return dst[:n]


class NormalizeToCHW(Operation):
    """uint8 ``(N, H, W, C)`` to float32 ``(N, C, H, W)``, optionally randomly cropped and flipped.

    Without augmentation, ``out[n, c, y, x] = t_c(p[n, y, x, c])`` with the lookup table
    ``t_c(v) = (v − mean_c) / std_c``. With ``crop_padding = P``, each image draws offsets
    ``dy, dx`` uniformly in ``[0, 2P]`` and is read as if zero-padded by ``P`` on every side,
    ``q[y, x] = p[y + dy − P, x + dx − P]`` (0 outside the image); with ``flip``, each image
    is mirrored, ``x → W − 1 − x``, with probability 1/2. That is torchvision's
    ``RandomCrop(size, padding=P)`` followed by ``RandomHorizontalFlip()``, fused into the one
    pass that normalizes, in parallel over the batch.

    FFCV's ``NormalizeImage`` assumes three channels and leaves channels-last strides, and its
    ``RandomTranslate``/``RandomHorizontalFlip`` take two more passes and about ten seconds of
    JIT compilation; this serves grey and colour, yields contiguous NCHW and compiles in one.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, crop_padding: int = 0,
                 flip: bool = False):
        super().__init__()
        self.table = lookup_table(mean, std)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)

    def generate_code(self) -> Callable:
        table, pad, flip = self.table, self.crop_padding, self.flip

        def normalize(images, dst):
            return normalize_to_chw(images, dst, table, pad, flip)

        return normalize

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        height, width, channels = previous_state.shape
        shape = (channels, height, width)
        return (
            replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype(np.float32)),
            AllocationQuery(shape, np.dtype(np.float32)),
        )


def crop_flip_normalize(images: torch.Tensor, table: torch.Tensor, out: torch.Tensor, *,
                        crop_padding: int = 0, flip: bool = False,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``out[n, y, x, c] = table[q[n, y, x, c] * C + c]``, in torch ops on ``images``' device.

    ``images``: uint8 ``(N, H, W, C)``; ``table``: float32 ``(256 * C,)``, the flattened
    :func:`lookup_table`; ``out``: float32 ``(N, H, W, C)``, written and returned. ``q`` is
    ``images``, or with ``crop_padding = P`` and ``flip`` the crop and mirror of
    :class:`NormalizeToCHW`: per image, ``dy, dx`` uniform in ``[0, 2P]`` and a mirror with
    probability 1/2, ``q[y, x] = p[y + dy - P, x' + dx - P]`` with ``x' = W - 1 - x`` when
    mirrored, and 0 outside the image. The draws come from ``generator`` (on the device).
    """
    n, height, width, channels = images.shape
    device = images.device
    if crop_padding or flip:
        rows = torch.arange(height, device=device).expand(n, height)
        cols = torch.arange(width, device=device).expand(n, width)
        if flip:
            mirror = torch.rand(n, 1, generator=generator, device=device) < 0.5
            cols = torch.where(mirror, width - 1 - cols, cols)
        if crop_padding:
            span = 2 * crop_padding + 1
            rows = rows + torch.randint(0, span, (n, 1), generator=generator, device=device)
            cols = cols + torch.randint(0, span, (n, 1), generator=generator, device=device)
            pad = crop_padding
            images = F.pad(images, (0, 0, pad, pad, pad, pad))  # pixel value 0 around
        batch = torch.arange(n, device=device)[:, None, None]
        images = images[batch, rows[:, :, None], cols[:, None, :]]
    index = images.long() * channels + torch.arange(channels, device=device)
    torch.index_select(table, 0, index.view(-1), out=out.view(-1))
    return out


class NormalizeOnDevice(Operation):
    """uint8 ``(N, H, W, C)`` on a torch device (place it after ``ToDevice``) to float32
    ``(N, C, H, W)`` in ``channels_last`` memory order, the values of :class:`NormalizeToCHW`
    (the same table), cropped and flipped as it does (:func:`crop_flip_normalize`).

    The draws come from a ``torch.Generator`` on the device seeded with ``seed`` when the
    first batch arrives, so a run is repeatable from its start; a resumed run draws anew (as
    the CPU path does). The output is a ``channels_last`` view of an ``(N, H, W, C)`` buffer:
    what convolutions on CUDA read fastest.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, crop_padding: int = 0,
                 flip: bool = False, seed: int = 0):
        super().__init__()
        self.table = lookup_table(mean, std)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.seed = int(seed)

    def generate_code(self) -> Callable:
        table = torch.from_numpy(self.table.reshape(-1))
        crop_padding, flip, seed = self.crop_padding, self.flip, self.seed
        on_device: dict[torch.device, tuple[torch.Tensor, torch.Generator]] = {}

        def normalize(images, dst):
            device = images.device
            if device not in on_device:
                generator = torch.Generator(device=device)
                generator.manual_seed(seed)
                on_device[device] = (table.to(device), generator)
            lookup, generator = on_device[device]
            out = crop_flip_normalize(images, lookup, dst[: images.shape[0]],
                                      crop_padding=crop_padding, flip=flip, generator=generator)
            return out.permute(0, 3, 1, 2)

        return normalize

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        height, width, channels = previous_state.shape
        return (
            replace(previous_state, jit_mode=False, shape=(channels, height, width),
                    dtype=torch.float32),
            AllocationQuery((height, width, channels), torch.float32,
                            device=previous_state.device),
        )
