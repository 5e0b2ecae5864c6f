"""Convert a dataset into ``train.beton``, ``test.beton`` and ``meta.json``, and check such files.

Every file is first written under a temporary name in the output directory and renamed into
place only when all three are complete (``meta.json`` last), so a failure leaves nothing
half-written and changes nothing that existed. An existing output is overwritten only with
``force=True``.

The ``.beton`` files are written with FFCV's own encoder (``ffcv.writer.handle_sample`` and
``MemoryAllocator``, pinned by ``ffcv==1.0.2``) in this process. FFCV's
``DatasetWriter.from_indexed_dataset`` forks writer processes and waits for a sample counter;
a worker that dies (disk full, say) leaves it waiting forever. The pixels are already in
memory here, so a single writer is as fast, and its errors surface as errors.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import numpy as np

from distrib_rda.data.meta import FILES, DatasetMeta, DataSourceError
from distrib_rda.data.sources import Arrays, resolve_source

FIELD_NAMES = ("image", "label")


def convert(
    dataset: str,
    out_dir: str | Path,
    *,
    data_root: str | Path | None = None,
    download: bool = False,
    force: bool = False,
    image_size: int | None = None,
) -> DatasetMeta:
    """Write ``out_dir/{train.beton,test.beton,meta.json}`` for ``dataset``; return its metadata.

    ``dataset`` is ``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100`` or
    ``imagefolder:PATH`` (see :mod:`distrib_rda.data.sources`); ``image_size`` resizes an
    imagefolder's images to that many pixels square. Raises :class:`DataSourceError` before
    any work if the source is missing or refused (one class, mixed sizes), or the output
    cannot be written, or it exists and ``force`` is false.
    """
    from distrib_rda.preflight import check_directory

    out = Path(out_dir).expanduser()
    check_directory(out, "--out")
    existing = [str(out / name) for name in FILES if (out / name).exists()]
    if existing and not force:
        raise DataSourceError(
            f"{', '.join(existing)} already exist; pass --force to overwrite them, or choose "
            "another --out."
        )
    source = resolve_source(dataset, data_root=data_root, download=download,
                            image_size=image_size)
    source.peek()  # classes and image sizes, from headers: refused before the pixels are read
    arrays = source.load()
    meta = write_dataset(
        arrays, out, dataset=source.dataset, source=source.description + arrays.note
    )
    height, width, channels = meta.shape
    print(f"{out}: {meta.num_train} training and {meta.num_test} test images, "
          f"{height}x{width}x{channels}, {meta.num_classes} classes ({meta.source})")
    return meta


def write_dataset(arrays: Arrays, out: Path, *, dataset: str, source: str) -> DatasetMeta:
    """Write ``arrays`` to ``out`` atomically (temporary names, then renames; meta.json last)."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tag = f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    temporary = {name: out / f".{name}{tag}" for name in FILES}
    try:
        for split in ("train", "test"):
            name = f"{split}.beton"
            images = getattr(arrays, f"{split}_images")
            print(f"writing {out / name} ({len(images)} images)", file=sys.stderr)
            write_beton(temporary[name], images, getattr(arrays, f"{split}_labels"))
        mean, std = channel_stats(arrays.train_images)
        meta = DatasetMeta(
            classes=tuple(arrays.classes),
            num_train=len(arrays.train_labels),
            num_test=len(arrays.test_labels),
            shape=tuple(int(n) for n in arrays.train_images.shape[1:]),  # type: ignore[arg-type]
            mean=mean,
            std=std,
            source=source,
            dataset=dataset,
            file_bytes={
                name: temporary[name].stat().st_size for name in ("train.beton", "test.beton")
            },
        )
        temporary["meta.json"].write_text(meta.to_json())
        for name in FILES:
            os.replace(temporary[name], out / name)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    return meta


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``uint8`` images ``(N, H, W, C)``, in ``[0, 255]`` units.

    Exact, from a 256-bin histogram per channel, so no float copy of the data is made.
    A constant channel gets std 1 (normalization then only centres it).
    """
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for channel in range(images.shape[-1]):
        counts = np.bincount(images[..., channel].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float((counts * values).sum() / total)
        var = float((counts * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(float(np.sqrt(var)) if var > 0 else 1.0)
    return tuple(means), tuple(stds)


class _Samples:
    """(image, label) pairs in the order FFCV's field encoders expect."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def write_beton(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one ``.beton``: ``image`` NDArrayField(uint8, (H, W, C)), ``label`` IntField."""
    from distrib_rda.data.threads import import_ffcv  # torch and ffcv: only when writing

    import_ffcv()
    from ffcv.fields import IntField, NDArrayField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter, handle_sample
    from tqdm import tqdm

    samples = _Samples(images, labels)
    fields = {
        "image": NDArrayField(np.dtype(np.uint8), tuple(samples.images.shape[1:])),
        "label": IntField(),
    }
    sample_bytes = int(np.prod(samples.images.shape[1:]))
    page_size = max(MIN_PAGE_SIZE, 1 << (sample_bytes - 1).bit_length())
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=1)
    writer.num_samples = len(samples)
    writer.prepare()
    try:
        metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
        allocator = MemoryAllocator(str(path), writer.data_region_start, page_size)
        with allocator:
            for index in tqdm(range(len(samples)), desc=path.name.split(".")[1], unit="img",
                              mininterval=0.5):
                handle_sample(samples[index], index, metadata.dtype.names, metadata,
                              allocator, fields)
        del metadata
        writer.finalize(allocator.allocations)
    finally:
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()


def check_beton(path: Path, meta: DatasetMeta, num_samples: int) -> None:
    """Raise :class:`DataSourceError` naming ``path`` unless it is a complete .beton for ``meta``.

    Checks the size recorded in meta.json, FFCV's header, the two fields and their types, the
    sample count, and that every sample's data lies inside the file (FFCV memory-maps the file
    and would crash, not raise, on a pointer past its end). Pixel bytes are not checksummed.
    """
    from distrib_rda.data.threads import import_ffcv  # torch and ffcv: only when reading

    import_ffcv()
    from ffcv.fields import IntField, NDArrayField
    from ffcv.reader import Reader

    fix = f"convert it again: `distrib-rda data convert {meta.dataset or 'DATASET'} --out " \
        f"{path.parent} --force`."
    if not path.is_file():
        raise DataSourceError(f"{path} not found; {fix}")
    size = path.stat().st_size
    expected = meta.file_bytes.get(path.name)
    if expected is not None and size != expected:
        raise DataSourceError(
            f"{path} has {size} bytes, meta.json says {expected}: it is truncated or was "
            f"replaced; {fix}"
        )
    try:
        reader = Reader(str(path))
        handlers = reader.handlers
        image, label = handlers.get("image"), handlers.get("label")
        ptrs = reader.metadata["f0"] if len(reader.metadata) else np.zeros(0, np.uint64)
        table = reader.alloc_table
    except Exception as error:  # a damaged header makes numpy/FFCV raise almost anything
        raise DataSourceError(
            f"{path} is not a readable FFCV .beton ({type(error).__name__}: {error}); {fix}"
        ) from None
    problems = []
    if list(handlers) != list(FIELD_NAMES) or not isinstance(image, NDArrayField) \
            or not isinstance(label, IntField):
        problems.append(f"fields {dict((k, type(v).__name__) for k, v in handlers.items())}")
    elif image.dtype != np.uint8 or tuple(image.shape) != tuple(meta.shape):
        problems.append(f"image field {image.dtype} {tuple(image.shape)}, meta.json {meta.shape}")
    if int(reader.num_samples) != num_samples or len(reader.metadata) != num_samples:
        problems.append(f"{reader.num_samples} samples, meta.json says {num_samples}")
    elif num_samples and (len(table) != num_samples
                          or int(ptrs.max()) + int(np.prod(meta.shape)) > size
                          or int((table["ptr"] + table["size"]).max()) > size):
        problems.append("sample data beyond the end of the file")
    if problems:
        raise DataSourceError(f"{path} is corrupt ({'; '.join(problems)}); {fix}")
