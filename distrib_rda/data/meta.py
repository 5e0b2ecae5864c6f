"""What a converted dataset directory holds, and the error for a missing or broken data source.

A converted directory ``DIR`` has ``train.beton``, ``test.beton`` and ``meta.json``. The
``.beton`` files have two fields: ``image``, an ``NDArrayField`` of ``uint8`` with shape
``(H, W, C)`` (raw pixels, so they round-trip exactly, for grey ``C = 1`` and colour ``C = 3``
alike), and ``label``, an ``IntField``. ``meta.json`` is written last: a directory without it is
not a dataset.

Normalization statistics are per channel over the training set, in pixel units ``[0, 255]``:

    mean_c = (1/(N·H·W)) Σ_{n,y,x} p[n,y,x,c]
    std_c  = sqrt( (1/(N·H·W)) Σ_{n,y,x} (p[n,y,x,c] − mean_c)² )

and the loaders feed the model ``(p − mean_c) / std_c``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distrib_rda.errors import UserError

# Bump when the .beton layout or meta.json changes; it is part of every cache key.
FORMAT_VERSION = 1
FILES = ("train.beton", "test.beton", "meta.json")
PIXEL_SCALE = "0-255"


class DataSourceError(UserError):
    """A dataset that is missing, incomplete or corrupt; the message names the files and the fix."""


@dataclass(frozen=True)
class DatasetMeta:
    """The contents of ``meta.json``.

    ``shape`` is ``(H, W, C)``. ``mean`` and ``std`` have one entry per channel, in pixel units
    ``[0, 255]`` (see the module docstring). ``source`` says where the pixels came from.
    """

    classes: tuple[str, ...]
    num_train: int
    num_test: int
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    dataset: str = ""
    file_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.shape[2]

    @property
    def model_args(self) -> dict[str, int]:
        """What a model factory is called with: ``in_channels``, ``image_size`` (the height;
        images are square) and ``num_classes``."""
        return {"in_channels": self.shape[2], "image_size": self.shape[0],
                "num_classes": len(self.classes)}

    @property
    def image_size(self) -> int:
        return self.shape[0]

    def to_json(self) -> str:
        data = asdict(self)
        data = {
            "format_version": FORMAT_VERSION,
            "pixel_scale": PIXEL_SCALE,
            **data,
            "classes": list(self.classes),
            "shape": list(self.shape),
            "mean": list(self.mean),
            "std": list(self.std),
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def load(cls, beton_dir: Path) -> DatasetMeta:
        """Read ``beton_dir/meta.json``, raising :class:`DataSourceError` if it is absent or bad."""
        path = Path(beton_dir).expanduser() / "meta.json"
        if not path.is_file():
            raise DataSourceError(
                f"{path} not found: {beton_dir} is not a converted dataset (expected "
                f"{', '.join(FILES)}). Create it with `distrib-rda data convert DATASET --out "
                f"{beton_dir}`."
            )
        try:
            data = json.loads(path.read_text())
            version = data.get("format_version")
            if version != FORMAT_VERSION:
                raise DataSourceError(
                    f"{path} has format_version {version!r}, this version reads "
                    f"{FORMAT_VERSION}: convert the dataset again with --force."
                )
            meta = cls(
                classes=tuple(str(name) for name in data["classes"]),
                num_train=int(data["num_train"]),
                num_test=int(data["num_test"]),
                shape=tuple(int(n) for n in data["shape"]),  # type: ignore[arg-type]
                mean=tuple(float(x) for x in data["mean"]),
                std=tuple(float(x) for x in data["std"]),
                source=str(data["source"]),
                dataset=str(data.get("dataset", "")),
                file_bytes={str(k): int(v) for k, v in data.get("file_bytes", {}).items()},
            )
            if len(meta.shape) != 3 or not len(meta.mean) == len(meta.std) == meta.shape[2]:
                raise ValueError(f"shape {meta.shape} with mean {meta.mean} and std {meta.std}")
            return meta
        except DataSourceError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise DataSourceError(
                f"{path} is corrupt ({type(error).__name__}: {error}); convert the dataset "
                "again with --force."
            ) from None
