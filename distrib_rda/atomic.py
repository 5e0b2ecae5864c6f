"""Outputs written whole or not at all, and never over a file without ``--force``.

Every command that writes a file (``export``, ``pareto``, a search's plot) writes it through
:func:`atomic_output`: under a temporary name beside the target, then renamed into place, so
an interrupted or failed write leaves neither a partial file nor a changed one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distrib_rda.errors import UserError


class OutputError(UserError):
    """An output that must not be written (it exists), or cannot be (an OS error)."""


@contextmanager
def atomic_output(out: Path | str, *, force: bool, flag: str = "--out") -> Iterator[Path]:
    """A temporary path beside ``out`` to write; on success it becomes ``out`` at once
    (a rename, or a hard link without ``force``, which never replaces a file that appeared
    meanwhile). A failure leaves neither file, nor a directory made for it; an OS error
    names ``flag``."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp{out.suffix}")
    made = [parent for parent in (out.parent, *out.parent.parents) if not parent.exists()]
    done = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if force:
            os.replace(tmp, out)
        else:
            os.link(tmp, out)  # fails if ``out`` appeared meanwhile
        done = True
    except FileExistsError:
        raise OutputError(f"{flag} {out}: already exists; pass --force to overwrite it") from None
    except OSError as error:
        raise OutputError(f"{flag} {out}: cannot be written ({error.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
        if not done:
            for directory in made:  # innermost first
                try:
                    directory.rmdir()
                except OSError:
                    break
