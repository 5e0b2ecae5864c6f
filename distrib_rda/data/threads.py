"""Import FFCV as this project needs it: torch's intra-op thread count kept where the caller
put it, although FFCV changes it, and the numba code FFCV's import compiles kept in numba's
disk cache (:func:`cache_numba_typed_dict`).

FFCV calls ``torch.set_num_threads`` behind the caller's back (``ffcv.pipeline.compiler``):
``import ffcv`` sets it to 1, and every ``Loader(...)``, every ``iter(loader)`` and the
loader's background epoch thread set it to the loader's ``num_workers``. A training loop that
does its matrix products in the main thread would then run them with the loader's thread
count. The trick used here: read ``torch.get_num_threads()`` before each FFCV call and set it
back afterwards, and once more when the first batch of an epoch arrives (by then the epoch
thread has made its call). :class:`~distrib_rda.data.loaders.BetonLoader` does this by itself;
:func:`restore_threads` is for code that calls FFCV directly.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

# torch's thread count before ffcv was first imported (None when someone else imported it first).
_BEFORE_FFCV: int | None = None if "ffcv" in sys.modules else torch.get_num_threads()


def cache_numba_typed_dict() -> None:
    """Let numba keep the typed-dict code that ``import ffcv`` compiles in its on-disk cache.

    ``ffcv.fields.rgb_image`` fills a ``numba.typed.Dict`` at import, which JIT-compiles
    numba's dictionary: about 4 s of CPU in every process that imports FFCV (the driver, each
    Ray worker, each trial's workers). numba compiles those two functions without its cache;
    with it, only the first process on a machine pays."""
    from numba.typed import typeddict

    for name in ("_make_dict", "_setitem"):
        dispatcher = getattr(typeddict, name, None)
        if callable(getattr(dispatcher, "enable_caching", None)):
            dispatcher.enable_caching()


def import_ffcv() -> ModuleType:
    """Import ``ffcv`` and the parts used here, leaving torch's thread count unchanged."""
    global _BEFORE_FFCV
    threads = torch.get_num_threads()
    if "ffcv" not in sys.modules:
        _BEFORE_FFCV = threads
        cache_numba_typed_dict()
    import ffcv
    import ffcv.fields
    import ffcv.fields.decoders
    import ffcv.loader
    import ffcv.pipeline
    import ffcv.transforms  # noqa: F401

    torch.set_num_threads(threads)
    return ffcv


def restore_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count to ``threads``, by default to what it was before FFCV.

    Returns the count now in force. Call it after creating or starting an FFCV ``Loader``
    yourself; :class:`~distrib_rda.data.loaders.BetonLoader` needs no help.
    """
    if threads is None:
        threads = _BEFORE_FFCV if _BEFORE_FFCV is not None else torch.get_num_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
