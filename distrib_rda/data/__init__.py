"""Datasets as FFCV ``.beton`` files: sources, conversion, a node-local cache and loaders.

- :data:`DATASETS` names every dataset (:mod:`distrib_rda.data.sources`).
- :func:`convert` writes ``DIR/train.beton``, ``test.beton`` and ``meta.json``
  (``distrib-rda data convert``).
- :func:`ensure_converted` finds or creates them in a cache directory, once per node.
- :func:`build_loaders` gives one rank's training and test batches.
- :func:`restore_threads` puts torch's thread count back after FFCV changed it.

Importing this package is cheap: each name is imported on first use (torch and ffcv only by
the loaders), so the config can check dataset names without loading them.
"""

from __future__ import annotations

import importlib
from typing import Any

# The function shares its name with its module. Bound here, once the module is loaded (it
# needs only numpy), so that `from distrib_rda.data import convert` is always the function:
# a submodule imported later would otherwise leave the module under that name.
from distrib_rda.data.convert import convert  # noqa: F401 - re-exported (__all__)

_WHERE = {
    "DATASETS": "sources", "resolve_source": "sources", "check_dataset_name": "sources",
    "ensure_converted": "cache", "check_beton": "convert", "convert": "convert",
    "BetonLoader": "loaders", "Loaders": "loaders", "build_loaders": "loaders",
    "DatasetMeta": "meta", "DataSourceError": "meta", "restore_threads": "threads",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
