"""The one configuration schema, shared by the command line, YAML files and search spaces.

Every key of :class:`TrainConfig` is a ``distrib-rda train`` flag (``batch_size`` is
``--batch-size``) and a key of a YAML file given with ``--config`` or inside a ``tune/`` space.
A bad key or value raises :class:`ConfigError`, whose message names the key and what is allowed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from distrib_rda.errors import UserError

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100")
MODELS = ("lenet5", "lenet300", "vgg16", "resnet18", "resnet20")
OPTIMIZERS = ("rda", "sgd", "prox-sgd", "gmp")


class ConfigError(UserError, ValueError):
    """A configuration key or value that is not allowed; the message says which and why."""


class TrainConfig(BaseModel):
    """Everything that defines one training run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    # data
    dataset: str = Field(
        "fashion-mnist",
        description=f"one of {', '.join(DATASETS)}, or imagefolder:PATH",
    )
    data_root: Path | None = Field(None, description="where torchvision-layout datasets live")
    download: bool = Field(False, description="let torchvision download a missing dataset")
    cache_dir: Path = Field(
        Path("~/.cache/distrib-rda"), description="where converted .beton files are kept"
    )
    subset: int | None = Field(None, ge=1, description="train on the first N training images")
    augment: bool | None = Field(
        None, description="crop+flip augmentation; default: on for 32x32 colour data only"
    )
    loader_workers: int = Field(2, ge=1, le=64, description="FFCV loader threads per worker")

    # model
    model: Literal["lenet5", "lenet300", "vgg16", "resnet18", "resnet20"] = "lenet5"
    init_scale: float = Field(
        1.0, gt=0, description="multiplies the default init of conv and linear weights"
    )

    # optimizer
    optimizer: Literal["rda", "sgd", "prox-sgd", "gmp"] = "rda"
    lambda_: float = Field(
        8e-4,
        ge=0,
        validation_alias=AliasChoices("lambda_", "lambda"),
        description="l1 strength on conv and linear weights",
    )
    gamma: float = Field(0.15, gt=0, description="RDA: beta_t = gamma*(t + warmup)^power")
    warmup: float = Field(
        1000.0, ge=0, description="RDA: t_w in beta_t = gamma*(t + t_w)^power; caps the first steps"
    )
    power: float = Field(0.5, ge=0, le=1, description="RDA: p in beta_t = gamma*(t + t_w)^p")
    adaptive: bool = Field(False, description="RDA: diagonal AdaGrad beta_t")
    eps: float = Field(1e-8, gt=0, description="RDA: added to the AdaGrad denominator")
    center: Literal["init", "zero"] = Field("init", description="RDA: prox centre")
    fused: bool = Field(
        False, description="RDA: one compiled kernel per tensor (torch.compile, at the first step)"
    )
    restart: list[int] = Field(default_factory=list, description="RDA: epochs to re-centre at")
    lr: float = Field(0.05, gt=0, description="SGD, prox-SGD, GMP: peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD, prox-SGD, GMP: momentum")
    target_sparsity: float | None = Field(
        None, ge=0, lt=1, description="GMP: the final fraction of zeros (required). RDA: at the "
        "end of the RDA epochs, raise the l1 threshold until this fraction of the conv and linear "
        "weights is zero, then fine-tune (needs finetune_epochs)"
    )
    finetune_epochs: int = Field(
        0, ge=0, description="after `epochs`, train the surviving weights with the mask fixed "
        "(SGD, lr, momentum, cosine) for this many more epochs"
    )

    # run
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1, description="global batch, split over the workers")
    workers: int = Field(2, ge=1, description="DDP workers (one per device)")
    gpu: bool = Field(False, description="one GPU per worker, NCCL")
    sync_every: int = Field(1, ge=1, description="H: all-reduce the dual state every H steps")
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts allowed (-1: forever)")

    # where
    address: str | None = Field(
        None, description="Ray cluster address; default: RAY_ADDRESS, else a local instance"
    )
    experiment: str = Field("distrib-rda", description="MLflow experiment")
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI")
    storage: Path = Field(Path("results"), description="Ray Train storage path for checkpoints")
    name: str | None = Field(None, description="run name; the same name resumes the run")

    @field_validator("lambda_", "gamma", "eps", "init_scale", "lr", "warmup")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value in DATASETS or (value.startswith("imagefolder:") and len(value) > 12):
            return value
        raise ValueError(f"must be one of {', '.join(DATASETS)}, or imagefolder:PATH")

    @field_validator("restart")
    @classmethod
    def _restart_epochs(cls, value: list[int]) -> list[int]:
        if any(epoch < 1 for epoch in value) or sorted(set(value)) != list(value):
            raise ValueError("must be increasing epoch numbers >= 1")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.sync_every > 1 and self.optimizer != "rda":
            raise ValueError("sync_every > 1 (local dual averaging) needs optimizer: rda")
        if self.restart and self.center == "zero":
            raise ValueError("restart re-centres at w; it needs center: init (a zero centre "
                             "with G reset to 0 would collapse the weights)")
        if self.optimizer == "gmp" and self.target_sparsity is None:
            raise ValueError("optimizer gmp needs target_sparsity (--target-sparsity), the final "
                             "fraction of zeros in [0, 1), e.g. 0.9")
        if self.target_sparsity is not None and self.optimizer not in ("gmp", "rda"):
            raise ValueError(f"target_sparsity (--target-sparsity) applies to optimizer gmp "
                             f"or rda, not {self.optimizer}")
        if (self.optimizer == "rda" and self.target_sparsity is not None
                and self.finetune_epochs == 0):
            raise ValueError("target_sparsity with optimizer rda prunes before the fine-tune; "
                             "it needs finetune_epochs >= 1 (--finetune-epochs)")
        if self.batch_size < self.workers:
            raise ValueError(f"batch_size {self.batch_size} is smaller than workers "
                             f"{self.workers}; it is the global batch, split over the workers")
        return self

    @property
    def per_worker_batch_size(self) -> int:
        return max(1, self.batch_size // self.workers)

    @classmethod
    def build(cls, **values: Any) -> TrainConfig:
        """Validate ``values``, raising :class:`ConfigError` with every bad key named."""
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise ConfigError(format_validation_error(error, cls)) from None

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied."""
        return TrainConfig.build(**{**self.model_dump(), **changes})


def flag_name(key: str) -> str:
    """The command-line flag of a config key: ``batch_size`` is ``--batch-size``."""
    return "--lambda" if key in ("lambda_", "lambda") else "--" + key.replace("_", "-")


def format_validation_error(error: ValidationError, schema: type[BaseModel]) -> str:
    """One line per bad key: ``key (--flag): message (got value)``."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if not key:
            lines.append(message)
        elif item["type"] == "extra_forbidden":
            known = ", ".join(sorted(schema.model_fields))
            lines.append(f"{key}: unknown key (known keys: {known})")
        else:
            where = f"{key} ({flag_name(key)})" if key in schema.model_fields or key == "lambda" \
                else key
            lines.append(f"{where}: {message} (got {item.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of config keys, not {type(data).__name__}")
    return data
