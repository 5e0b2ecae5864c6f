"""A node-local cache of converted datasets, safe for several worker processes at once.

``ensure_converted`` keys a converted directory on what it was made from:

    key = sha256(FORMAT_VERSION, dataset, [(resolved path, size, mtime_ns) of every source file],
                 options such as image_size)

so a changed or moved source, a new file format or another image size gives a new directory,
and the same source gives the same one. A file lock per dataset name serializes download,
conversion and the check of an existing copy, so two workers on one node convert once and
share the result. A process that waits for the lock says so only when the wait is long (a
conversion), not while a sibling worker checks the copy it is about to share.
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

# Seconds a process waits for the cache lock before it says it is waiting.
LOCK_QUIET_SECONDS = 5.0


def cache_key(source: Source) -> str:
    """16 hex digits identifying ``source``'s files and this module's format version."""
    digest = hashlib.sha256(f"{FORMAT_VERSION}\0{source.dataset}".encode())
    for path in source.files:
        stat = path.stat()
        digest.update(f"\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    if source.options:
        digest.update(f"\0{source.options}".encode())
    return digest.hexdigest()[:16]


def cached_dir(source: Source, cache_dir: str | Path) -> Path:
    """Where ``source`` is (or would be) converted in ``cache_dir``; nothing is created."""
    return Path(cache_dir).expanduser() / f"{_slug(source.dataset)}-{cache_key(source)}"


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
    image_size: int | None = None,
) -> Path:
    """The directory in ``cache_dir`` holding ``dataset`` as .beton files, converting if needed.

    Returns a directory with ``train.beton``, ``test.beton`` and ``meta.json`` for
    :func:`~distrib_rda.data.build_loaders`. Raises :class:`DataSourceError` if the source is
    missing (with ``download``, torchvision is asked first). ``image_size`` resizes an
    imagefolder's images to that many pixels square.
    """
    cache = Path(cache_dir).expanduser()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataSourceError(f"--cache-dir {cache}: cannot be created "
                              f"({error.strerror}).") from None
    slug = _slug(dataset)
    lock = FileLock(str(lock_file(cache, dataset)))
    try:
        # A sibling worker holds the lock for the moment it takes to check the copy both use;
        # only a longer wait is another process converting (or downloading) the dataset.
        lock.acquire(timeout=LOCK_QUIET_SECONDS)
    except Timeout:
        print(f"{dataset}: waiting for another process that holds {lock.lock_file} while it "
              f"converts or checks {dataset} in {cache} ...", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        source = resolve_source(dataset, data_root=data_root, download=download,
                                image_size=image_size)
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
