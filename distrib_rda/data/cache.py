"""A node-local cache of converted datasets, safe for several worker processes at once.

``ensure_converted`` keys a converted directory on what it was made from:

    key = sha256(FORMAT_VERSION, dataset, [(resolved path, size, mtime_ns) of every source file])

so a changed or moved source, or a new file format, gives a new directory, and the same source
gives the same one. A file lock per dataset name serializes download, conversion and the
check of an existing copy, so two workers on one node convert once and share the result.
The directory is written under a temporary name and renamed when complete. Keep
``cache_dir`` on a local disk: file locks are not reliable on every network file system.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

from filelock import FileLock, Timeout

from distrib_rda.data.convert import check_beton, write_dataset
from distrib_rda.data.meta import FORMAT_VERSION, DatasetMeta, DataSourceError
from distrib_rda.data.sources import Source, resolve_source


def cache_key(source: Source) -> str:
    """16 hex digits identifying ``source``'s files and this module's format version."""
    digest = hashlib.sha256(f"{FORMAT_VERSION}\0{source.dataset}".encode())
    for path in source.files:
        stat = path.stat()
        digest.update(f"\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _slug(dataset: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", dataset).strip("-")[:48] or "dataset"


def lock_file(cache_dir: Path, dataset: str) -> Path:
    """The lock that serializes work on ``dataset`` in ``cache_dir``."""
    return Path(cache_dir).expanduser() / f".{_slug(dataset)}.lock"


def ensure_converted(
    dataset: str,
    *,
    data_root: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path,
) -> Path:
    """The directory in ``cache_dir`` holding ``dataset`` as .beton files, converting if needed.

    Returns a directory with ``train.beton``, ``test.beton`` and ``meta.json`` for
    :func:`~distrib_rda.data.build_loaders`. Raises :class:`DataSourceError` if the source is
    missing (with ``download``, torchvision is asked first).
    """
    cache = Path(cache_dir).expanduser()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataSourceError(f"cache_dir {cache} cannot be created ({error}).") from None
    slug = _slug(dataset)
    lock = FileLock(str(lock_file(cache, dataset)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"{dataset}: waiting for another process converting it in {cache} ...",
              file=sys.stderr)
        lock.acquire()
    try:
        source = resolve_source(dataset, data_root=data_root, download=download)
        target = cache / f"{slug}-{cache_key(source)}"
        if target.exists():
            try:
                meta = DatasetMeta.load(target)
                check_beton(target / "train.beton", meta, meta.num_train)
                check_beton(target / "test.beton", meta, meta.num_test)
                return target
            except DataSourceError as error:
                print(f"{dataset}: rebuilding {target}: {error}", file=sys.stderr)
                shutil.rmtree(target)
        temporary = cache / f".{target.name}.{os.getpid()}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        try:
            arrays = source.load()
            write_dataset(arrays, temporary, dataset=source.dataset,
                          source=source.description + arrays.note)
            os.replace(temporary, target)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        return target
    finally:
        lock.release()
