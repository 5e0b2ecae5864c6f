"""FFCV pipeline operations written for this project (importing this module imports ffcv)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from distrib_rda.data.threads import import_ffcv

import_ffcv()

from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402


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
        self.table = (
            (np.arange(256, dtype=np.float64)[:, None] - np.asarray(mean)[None, :])
            / np.asarray(std)[None, :]
        ).astype(np.float32)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)

    def generate_code(self) -> Callable:
        parallel_range = Compiler.get_iterator()
        table = self.table
        pad = self.crop_padding
        flip = self.flip

        def normalize(images, dst):
            n, height, width, channels = images.shape
            for i in parallel_range(n):
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

        normalize.is_parallel = True
        return normalize

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        height, width, channels = previous_state.shape
        shape = (channels, height, width)
        return (
            replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype(np.float32)),
            AllocationQuery(shape, np.dtype(np.float32)),
        )
