"""Where the raw datasets live, and how to read them into ``uint8`` arrays.

:func:`resolve_source` finds (and, with ``download=True``, fetches) the files of a dataset and
fails with a :class:`DataSourceError` that names the files, where they were looked for and how
to get them, before any conversion work starts. :meth:`Source.load` reads them into
:class:`Arrays`: images ``(N, H, W, C)`` ``uint8`` and labels ``(N,)`` ``int64``.

Datasets:

- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``), or torchvision's layout
  ``DATA_ROOT/FashionMNIST/raw/`` (checked first when a data root is given).
- ``mnist``: torchvision's layout ``DATA_ROOT/MNIST/raw/``.
- ``cifar10`` and ``cifar100``: torchvision's layout, ``DATA_ROOT/cifar-10-batches-py/`` and
  ``DATA_ROOT/cifar-100-python/`` (the unpacked python-version archives).
- ``imagefolder:PATH``: one folder per class. With ``PATH/train/`` and ``PATH/test/`` (or
  ``PATH/val/``) those are the splits; otherwise the last tenth of each class's files (sorted
  by name; at least one of a class with two or more) is held out for test. Images that are
  all greyscale stay one channel, others become RGB. Images of mixed sizes are refused unless
  an ``image_size`` N is named (``--image-size``): then every image is resized to N x N
  (bilinear), and the conversion says how many were.

Every source can be looked at without reading its pixels (:meth:`Source.peek`: image counts,
classes and shape, from file headers), so that a run is checked before any work; and every
dataset needs at least two classes.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from distrib_rda.data.meta import DataSourceError
from distrib_rda.registry import Registry

IMAGEFOLDER = "imagefolder:"
# name -> locate(name, root, download) -> Source; "imagefolder:PATH" is accepted besides them.
DATASETS: Registry[Callable[[str, Path | None, bool], Source]] = Registry(
    "dataset", extra=IMAGEFOLDER + "PATH")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "labels": "labels",
        "archive": "cifar-10-python.tar.gz",
        "torchvision": "CIFAR10",
        "summary": "32x32 colour images, 10 classes; torchvision's layout",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", "fine_label_names"),
        "labels": "fine_labels",
        "archive": "cifar-100-python.tar.gz",
        "torchvision": "CIFAR100",
        "summary": "32x32 colour images, 100 classes; torchvision's layout",
    },
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
# The image files an ImageFolder tree may hold (torchvision's list).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Arrays:
    """A dataset in memory: images ``(N, H, W, C)`` uint8, labels ``(N,)`` int64."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class Facts:
    """What a dataset is, known without reading its pixels: image counts (``None`` where only
    reading the pixels tells), class names and the image shape ``(H, W, C)`` that conversion
    gives."""

    num_train: int | None
    num_test: int | None
    classes: tuple[str, ...]
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class Source:
    """A located dataset: its files (for cache keys), how to read them, and how to peek at
    them (:class:`Facts` from headers only). ``options`` are what changes the converted
    pixels besides the files (``image_size``): part of the cache key."""

    dataset: str
    description: str
    files: tuple[Path, ...]
    reader: Callable[[], Arrays]
    peeker: Callable[[], Facts]
    options: str = ""

    def load(self) -> Arrays:
        arrays = self.reader()
        _check_arrays(self.dataset, arrays)
        return arrays

    def peek(self) -> Facts:
        """The dataset's :class:`Facts`, checked (two classes at least), without its pixels."""
        facts = self.peeker()
        _check_classes(self.dataset, facts.classes)
        return facts


def resolve_source(
    dataset: str, *, data_root: str | Path | None = None, download: bool = False,
    image_size: int | None = None,
) -> Source:
    """Locate ``dataset``'s files, downloading them with torchvision if ``download`` and missing.

    ``image_size`` (imagefolder only) resizes every image to that many pixels square."""
    root = Path(data_root).expanduser().resolve() if data_root is not None else None
    if dataset.startswith(IMAGEFOLDER) and len(dataset) > len(IMAGEFOLDER):
        return _imagefolder(Path(dataset[len(IMAGEFOLDER):]).expanduser().resolve(),
                            image_size)
    if dataset not in DATASETS:
        raise DataSourceError(f"unknown dataset {dataset!r}: allowed are {DATASETS.allowed()}")
    if image_size is not None:
        raise DataSourceError(f"--image-size {image_size}: applies to imagefolder:PATH "
                              f"datasets only, not {dataset}")
    return DATASETS[dataset](dataset, root, download)


def check_dataset_name(dataset: str) -> str:
    """``dataset`` if it is a registered name or ``imagefolder:PATH``; nothing is read."""
    if dataset in DATASETS or (dataset.startswith(IMAGEFOLDER) and len(dataset) > len(IMAGEFOLDER)):
        return dataset
    raise ValueError(f"must be one of {DATASETS.allowed()}")


# --------------------------------------------------------------------------- MNIST family


def _idx_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The four IDX files in ``folder`` (plain or .gz), and the stems that are missing."""
    found, missing = [], []
    for stem in IDX_STEMS:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                found.append(folder / name)
                break
        else:
            missing.append(stem)
    return found, missing


def _idx_source(dataset: str, folder: Path, files: list[Path], classes, description: str) -> Source:
    def read() -> Arrays:
        train_x, train_y, test_x, test_y = (read_idx(path) for path in files)
        return Arrays(
            _check_idx_images(files[0], train_x), _check_idx_labels(files[1], train_y, train_x),
            _check_idx_images(files[2], test_x), _check_idx_labels(files[3], test_y, test_x),
            tuple(classes),
        )

    def peek() -> Facts:
        train, test = idx_dims(files[0]), idx_dims(files[2])
        for path, dims in ((files[0], train), (files[2], test)):
            if len(dims) != 3:
                raise DataSourceError(f"{path}: expected images (N, H, W), found shape {dims}")
        return Facts(train[0], test[0], tuple(classes), (train[1], train[2], 1))

    return Source(dataset, description, tuple(files), read, peek)


def idx_dims(path: Path) -> tuple[int, ...]:
    """The dimensions in an IDX file's header (``.gz`` or plain), reading only the header."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as stream:
            head = stream.read(4)
            if len(head) < 4 or head[:3] != b"\x00\x00\x08" or not 1 <= head[3] <= 4:
                raise DataSourceError(
                    f"{path} is not an IDX file of unsigned bytes; replace the file.")
            dims = stream.read(4 * head[3])
    except (OSError, EOFError, zlib.error) as error:
        raise DataSourceError(f"{path} cannot be read ({error}); replace the file.") from None
    if len(dims) != 4 * head[3]:
        raise DataSourceError(f"{path} is truncated; replace the file.")
    return struct.unpack(f">{head[3]}I", dims)


def _torchvision_download(dataset: str, class_name: str, root: Path, **kwargs) -> None:
    import torchvision.datasets

    print(f"{dataset}: downloading with torchvision into {root} ...", file=sys.stderr)
    try:
        getattr(torchvision.datasets, class_name)(str(root), download=True, **kwargs)
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, ...
        raise DataSourceError(
            f"{dataset}: --download into {root} failed ({type(error).__name__}: {error}). "
            "Is a network reachable? Otherwise copy the files there by hand (layout below in "
            "the error without --download)."
        ) from None


@DATASETS.register("fashion-mnist", "Zalando's 28x28 grey clothes, 10 classes; Debian's "
                   "dataset-fashion-mnist or torchvision's layout", default=True)
def _fashion_mnist(name: str, root: Path | None, download: bool) -> Source:
    folders = ([root / "FashionMNIST" / "raw"] if root else []) + [DEBIAN_FASHION_MNIST]
    for folder in folders:
        files, missing = _idx_files(folder)
        if not missing:
            kind = "Debian dataset-fashion-mnist" if folder == DEBIAN_FASHION_MNIST else \
                "torchvision layout"
            return _idx_source(name, folder, files, FASHION_CLASSES,
                               f"{name} from {folder} ({kind})")
    if download and root is not None:
        _torchvision_download(name, "FashionMNIST", root)
        return _fashion_mnist(name, root, download=False)
    names = ", ".join(f"{stem}[.gz]" for stem in IDX_STEMS)
    where = " and ".join(str(folder) for folder in folders)
    hint = (
        "Install the Debian package: `apt-get install dataset-fashion-mnist` (it puts them in "
        f"{DEBIAN_FASHION_MNIST}), or give --data-root DIR holding torchvision's layout "
        "DIR/FashionMNIST/raw/, or add --download with --data-root DIR to let torchvision "
        "fetch them there."
    )
    if download:
        hint = "--download needs --data-root DIR (where torchvision puts the files). " + hint
    raise DataSourceError(
        f"{name}: no complete copy found. Looked for {names} in {where}. {hint}"
    )


@DATASETS.register("mnist", "28x28 grey digits, 10 classes; torchvision's layout")
def _mnist(name: str, root: Path | None, download: bool) -> Source:
    names = ", ".join(f"{stem}[.gz]" for stem in IDX_STEMS)
    if root is None:
        raise DataSourceError(
            f"{name} needs --data-root DIR holding torchvision's layout DIR/MNIST/raw/ with "
            f"{names}; add --download to let torchvision fetch them there."
        )
    folder = root / "MNIST" / "raw"
    files, missing = _idx_files(folder)
    if missing and download:
        _torchvision_download(name, "MNIST", root)
        files, missing = _idx_files(folder)
    if missing:
        raise DataSourceError(
            f"{name}: missing {', '.join(missing)} (or .gz) in {folder}. torchvision's layout is "
            f"DATA_ROOT/MNIST/raw/ with {names}; add --download to let torchvision fetch them "
            "into --data-root."
        )
    return _idx_source(name, folder, files, MNIST_CLASSES, f"{name} from {folder}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``.gz`` or plain) into an array of its shape."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as stream:
            data = stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataSourceError(f"{path} cannot be read ({error}); replace the file.") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 4:
        raise DataSourceError(f"{path} is not an IDX file of unsigned bytes; replace the file.")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else ()
    if len(data) != header + int(np.prod(dims, dtype=np.int64)) or not dims:
        raise DataSourceError(
            f"{path} is truncated or padded: its header says {dims} bytes of data, the file "
            f"has {max(0, len(data) - header)}; replace the file."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _check_idx_images(path: Path, images: np.ndarray) -> np.ndarray:
    if images.ndim != 3:
        raise DataSourceError(f"{path}: expected images (N, H, W), found shape {images.shape}")
    return images[..., None]


def _check_idx_labels(path: Path, labels: np.ndarray, images: np.ndarray) -> np.ndarray:
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataSourceError(
            f"{path}: {labels.shape} labels for {len(images)} images; replace the file."
        )
    return labels.astype(np.int64)


# --------------------------------------------------------------------------- CIFAR


def _cifar(dataset: str, root: Path | None, download: bool) -> Source:
    """CIFAR-10 or CIFAR-100 (``CIFAR[dataset]``) in torchvision's layout under ``root``."""
    spec = CIFAR[dataset]
    names = [*spec["train"], *spec["test"], spec["meta"][0]]
    layout = f"DATA_ROOT/{spec['folder']}/ with {', '.join(names)}"
    how = (
        f"add --download to let torchvision fetch them, or unpack {spec['archive']} "
        f"({CIFAR_URL}) into --data-root"
    )
    if root is None:
        raise DataSourceError(f"{dataset} needs --data-root DIR holding torchvision's layout "
                              f"{layout}; {how}.")
    folder = root / spec["folder"]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing and download:
        _torchvision_download(dataset, spec["torchvision"], root)
        missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataSourceError(
            f"{dataset}: missing {', '.join(missing)} in {folder}. torchvision's layout is "
            f"{layout}; {how}."
        )
    files = [folder / name for name in names]

    def read() -> Arrays:
        train = [_read_cifar_batch(folder / name, spec["labels"]) for name in spec["train"]]
        test = [_read_cifar_batch(folder / name, spec["labels"]) for name in spec["test"]]
        meta = _unpickle(folder / spec["meta"][0])
        try:
            classes = tuple(str(name) for name in meta[spec["meta"][1]])
        except (KeyError, TypeError):
            raise DataSourceError(
                f"{folder / spec['meta'][0]} has no {spec['meta'][1]!r}; replace the file."
            ) from None
        return Arrays(
            np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            np.concatenate([x for x, _ in test]), np.concatenate([y for _, y in test]),
            classes,
        )

    def peek() -> Facts:
        meta = _unpickle(folder / spec["meta"][0])
        names = meta.get(spec["meta"][1])
        if not isinstance(names, (list, tuple)):
            raise DataSourceError(
                f"{folder / spec['meta'][0]} has no {spec['meta'][1]!r}; replace the file.")
        # The counts are known once the batches are unpickled, at conversion.
        return Facts(None, None, tuple(str(name) for name in names), (32, 32, 3))

    return Source(dataset, f"{dataset} from {folder}", tuple(files), read, peek)


for _name, _spec in CIFAR.items():
    DATASETS.register(_name, _spec["summary"])(_cifar)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as stream:
            data = pickle.load(stream, encoding="latin1")
    except Exception as error:  # a damaged pickle raises almost anything
        raise DataSourceError(
            f"{path} cannot be read ({type(error).__name__}: {error}); replace the file."
        ) from None
    if not isinstance(data, dict):
        raise DataSourceError(f"{path} is not a CIFAR python-version batch; replace the file.")
    return data


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    data = _unpickle(path)
    try:
        pixels = np.asarray(data["data"], dtype=np.uint8)
        labels = np.asarray(data[label_key], dtype=np.int64)
        images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except (KeyError, ValueError) as error:
        raise DataSourceError(
            f"{path} is not a CIFAR python-version batch ({type(error).__name__}: {error}); "
            "replace the file."
        ) from None
    if len(labels) != len(images):
        raise DataSourceError(f"{path}: {len(labels)} labels for {len(images)} images.")
    return np.ascontiguousarray(images), labels


# --------------------------------------------------------------------------- ImageFolder


LAYOUT = ("one folder per class holding images (PATH/CLASS/*.png), optionally split as "
          "PATH/train/CLASS/... and PATH/test/CLASS/... (or val/)")


def _find_classes(folder: Path) -> list[str]:
    """The class folders of ``folder``, sorted (hidden ones, such as ``.ipynb_checkpoints``,
    are not classes)."""
    try:
        return sorted(entry.name for entry in os.scandir(folder)
                      if entry.is_dir() and not entry.name.startswith("."))
    except OSError as error:
        raise DataSourceError(f"imagefolder: {folder} cannot be read ({error.strerror}). "
                              f"Expected {LAYOUT}.") from None


def _image_files(folder: Path, class_to_idx: dict[str, int]) -> list[tuple[Path, int]]:
    """``(file, label)`` of every image file under each class folder, in torchvision's order
    (sorted walk, sorted names); hidden files are skipped. A class without images is refused."""
    samples, empty = [], []
    for name in sorted(class_to_idx):
        found = [(Path(root) / file, class_to_idx[name])
                 for root, _, files in sorted(os.walk(folder / name, followlinks=True))
                 for file in sorted(files)
                 if not file.startswith(".") and file.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            empty.append(name)
        samples += found
    if empty:
        raise DataSourceError(
            f"imagefolder: no image files in the class folder(s) {', '.join(empty)} of {folder} "
            f"(image files end in {', '.join(IMG_EXTENSIONS)}); add images or remove the "
            "folder(s).")
    return samples


def _imagefolder(path: Path, image_size: int | None = None) -> Source:
    if image_size is not None and not (isinstance(image_size, int) and 4 <= image_size <= 4096):
        raise DataSourceError(f"--image-size {image_size}: must be a whole number of pixels "
                              "from 4 to 4096")
    if not path.is_dir():
        raise DataSourceError(f"imagefolder: {path} is not a directory. Expected {LAYOUT}.")
    test_dir = next((path / name for name in ("test", "val") if (path / name).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        classes = _find_classes(path / "train")
        _check_classes(f"imagefolder:{path / 'train'}", tuple(classes))
        class_to_idx = {name: i for i, name in enumerate(classes)}
        train = _image_files(path / "train", class_to_idx)
        test_classes = _find_classes(test_dir)
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DataSourceError(
                f"imagefolder: {test_dir} has classes {unknown} that {path / 'train'} lacks."
            )
        test = _image_files(test_dir, {name: class_to_idx[name] for name in test_classes})
        split = f"{path / 'train'} and {test_dir}"
    else:
        classes = _find_classes(path)
        _check_classes(f"imagefolder:{path}", tuple(classes))
        class_to_idx = {name: i for i, name in enumerate(classes)}
        train, test = _hold_out(_image_files(path, class_to_idx))
        split = f"{path}, the last tenth of each class's files held out for test"
    if not train or not test:
        raise DataSourceError(
            f"imagefolder: {path} gives {len(train)} training and {len(test)} test images; "
            f"both must be non-empty. Expected {LAYOUT}."
        )
    files = tuple(p for p, _ in train) + tuple(p for p, _ in test)

    def peek() -> Facts:
        grey, (height, width) = _image_shape(path, files, image_size)
        return Facts(len(train), len(test), tuple(classes), (height, width, 1 if grey else 3))

    return Source(f"imagefolder:{path}", f"imagefolder {split}", files,
                  lambda: _read_images(path, train, test, tuple(classes), image_size), peek,
                  options="" if image_size is None else f"image_size={image_size}")


def _hold_out(
    samples: Sequence[tuple[Path, int]],
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Split (file, label) pairs sorted by class and name: of a class's ``n`` files the last
    ``max(1, n // 10)`` go to test, none if ``n == 1``."""
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, test = [], []
    for files in by_class.values():
        held = max(1, len(files) // 10) if len(files) > 1 else 0
        train += files[: len(files) - held]
        test += files[len(files) - held:]
    return train, test


def _open_image(file: Path):
    """``PIL.Image.open(file)`` (the header only: PIL decodes pixels lazily); an unreadable
    file, or one past Pillow's decompression-bomb limit, is a :class:`DataSourceError`."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        # Past MAX_IMAGE_PIXELS Pillow only warns (an error from twice that): refused alike.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(file)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise DataSourceError(
                f"imagefolder: {file} is too large for a training image ({error}); shrink "
                f"it below {Image.MAX_IMAGE_PIXELS:,} pixels or remove it.") from None
        except (OSError, UnidentifiedImageError) as error:
            raise _unreadable(file, error) from None


@lru_cache(maxsize=8)
def _headers(files: tuple[Path, ...],
             stamps: tuple[tuple[int, int], ...]) -> tuple[frozenset[str], dict]:
    """The modes of ``files`` and ``{(width, height): [file, ...]}``, from headers only.
    ``stamps`` (size and mtime of each file) make a changed file a new cache entry."""
    modes, sizes = set(), {}
    for file in files:
        with _open_image(file) as image:
            modes.add(image.mode)
            sizes.setdefault(image.size, []).append(file)
    return frozenset(modes), sizes


def _image_shape(path: Path, files: tuple[Path, ...],
                 image_size: int | None) -> tuple[bool, tuple[int, int]]:
    """``(grey, (height, width))`` of the converted images: all greyscale stays one channel;
    the one size of every file, or ``image_size`` square. Mixed sizes without ``image_size``
    are refused, naming the sizes and a file of each."""
    try:
        stamps = tuple((stat.st_size, stat.st_mtime_ns) for stat in map(os.stat, files))
    except OSError as error:
        raise DataSourceError(f"imagefolder: {error.filename} cannot be read "
                              f"({error.strerror}).") from None
    modes, sizes = _headers(files, stamps)
    grey = modes <= {"L", "1"}
    if image_size is not None:
        return grey, (image_size, image_size)
    if len(sizes) > 1:
        common = sorted(sizes.items(), key=lambda item: -len(item[1]))
        listed = "; ".join(f"{w}x{h}: {len(group)} file(s), e.g. {group[0].name}"
                           for (w, h), group in common[:4])
        more = f"; and {len(common) - 4} more sizes" if len(common) > 4 else ""
        raise DataSourceError(
            f"imagefolder: {path} holds images of {len(sizes)} sizes (width x height: "
            f"{listed}{more}); give --image-size N (the YAML key image_size) to resize every "
            "image to N x N pixels, or make them one size.")
    (width, height), = sizes
    return grey, (height, width)


def _read_images(
    path: Path, train: Sequence[tuple[Path, int]], test: Sequence[tuple[Path, int]],
    classes: tuple[str, ...], image_size: int | None = None,
) -> Arrays:
    from PIL import Image
    from tqdm import tqdm

    samples = [*train, *test]
    grey, (height, width) = _image_shape(path, tuple(file for file, _ in samples), image_size)
    images = np.empty((len(samples), height, width, 1 if grey else 3), dtype=np.uint8)
    resized = 0
    for i, (file, _) in enumerate(tqdm(samples, desc="reading images", unit="img",
                                       mininterval=0.5)):
        with _open_image(file) as image:
            try:
                image = image.convert("L" if grey else "RGB")
                if image.size != (width, height):
                    image = image.resize((width, height), Image.BILINEAR)
                    resized += 1
                images[i] = np.asarray(image).reshape(images.shape[1:])
            except (OSError, ValueError) as error:  # truncated or damaged pixel data
                raise _unreadable(file, error) from None
    labels = np.array([label for _, label in samples], dtype=np.int64)
    note = (f"; {resized} of {len(samples)} images resized to {height}x{width} (--image-size "
            f"{image_size})" if image_size is not None else "")
    n = len(train)
    return Arrays(images[:n], labels[:n], images[n:], labels[n:], classes, note)


def _unreadable(file: Path, error: Exception) -> DataSourceError:
    return DataSourceError(f"imagefolder: {file} is not a readable image ({error}).")


# --------------------------------------------------------------------------- checks


def _check_classes(dataset: str, classes: tuple[str, ...]) -> None:
    """A classifier needs two classes at least: with one, every prediction is right."""
    if len(classes) < 2:
        found = f"one class, {classes[0]!r}" if classes else "no class"
        raise DataSourceError(
            f"{dataset}: {found}; a classifier needs two classes at least"
            + (f" (imagefolder: {LAYOUT})" if dataset.startswith(IMAGEFOLDER) else "") + ".")


def _check_arrays(dataset: str, arrays: Arrays) -> None:
    _check_classes(dataset, arrays.classes)
    for split in ("train", "test"):
        images = getattr(arrays, f"{split}_images")
        labels = getattr(arrays, f"{split}_labels")
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise DataSourceError(
                f"{dataset}: {split} images have shape {images.shape} and dtype {images.dtype}; "
                "expected (N, H, W, 1 or 3) uint8."
            )
        if len(images) == 0 or len(labels) != len(images):
            raise DataSourceError(f"{dataset}: {len(images)} {split} images, {len(labels)} labels.")
        if labels.min() < 0 or labels.max() >= len(arrays.classes):
            raise DataSourceError(
                f"{dataset}: {split} labels span {labels.min()}..{labels.max()}, but there are "
                f"{len(arrays.classes)} classes."
            )
    if arrays.train_images.shape[1:] != arrays.test_images.shape[1:]:
        raise DataSourceError(
            f"{dataset}: train images are {arrays.train_images.shape[1:]}, test images "
            f"{arrays.test_images.shape[1:]}."
        )
