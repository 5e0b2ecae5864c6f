"""Datasets as FFCV ``.beton`` files: sources, conversion, a node-local cache and loaders.

- :func:`convert` writes ``DIR/train.beton``, ``test.beton`` and ``meta.json``
  (``distrib-rda data convert``).
- :func:`ensure_converted` finds or creates them in a cache directory, once per node.
- :func:`build_loaders` gives one rank's training and test batches.
- :func:`restore_threads` puts torch's thread count back after FFCV changed it.

ffcv itself is imported on first use, not by ``import distrib_rda.data``.
"""

from distrib_rda.data.cache import ensure_converted
from distrib_rda.data.convert import check_beton, convert
from distrib_rda.data.loaders import BetonLoader, Loaders, build_loaders
from distrib_rda.data.meta import DatasetMeta, DataSourceError
from distrib_rda.data.sources import DATASETS, resolve_source
from distrib_rda.data.threads import restore_threads

__all__ = [
    "DATASETS",
    "BetonLoader",
    "DataSourceError",
    "DatasetMeta",
    "Loaders",
    "build_loaders",
    "check_beton",
    "convert",
    "ensure_converted",
    "resolve_source",
    "restore_threads",
]
