"""Loading torch files as data only: ``torch.load(weights_only=True)``, with errors that name
the file and say whether it held pickled code or was damaged."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from distrib_rda.errors import UserError


class UnsafeFileError(UserError):
    """A torch file that holds pickled code, or cannot be read."""


def torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file."""
    try:
        with warnings.catch_warnings():  # a pickle's protocol is no news: it is refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found or is_pickle(path):  # else: bytes that are no pickle at all, a damaged file
            what = f" ({found.group(1)})" if found else ""
            raise UnsafeFileError(
                f"{path}: refused: it holds pickled code or objects{what}, not plain tensor "
                "data; checkpoints must load with torch.load(weights_only=True)") from None
        damage = error
    except Exception as error:  # torch.load raises many types on damaged files
        damage = error
    detail = str(damage).split(". ")[0].splitlines()[0] if str(damage) else ""
    raise UnsafeFileError(f"{path}: not a readable torch file (corrupt or truncated?): "
                      + type(damage).__name__ + (f": {detail}" if detail else ""))


def is_pickle(path: Path) -> bool:
    """Whether ``path`` starts like a pickle stream (protocol 2 and later: the PROTO opcode)."""
    with open(path, "rb") as file:
        return file.read(1) == b"\x80"
