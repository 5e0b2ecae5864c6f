"""Checkpoints as data: tensors, numbers and strings, loaded with ``weights_only=True``."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrib_rda.errors import UserError
from distrib_rda.safe_load import torch_load

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded safely."""


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  *numpy_state[2:]),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save(directory: Path, state: dict[str, Any]) -> Path:
    path = Path(directory) / CHECKPOINT_FILE
    torch.save(state, path)
    return path


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint file, or the ``checkpoint.pt`` inside a checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return torch_load(path)
