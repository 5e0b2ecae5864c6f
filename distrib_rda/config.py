"""The one configuration schema, shared by the command line, YAML files, search spaces and the
Python API.

A config is written flat, as flags and YAML keys: ``batch_size`` is ``--batch-size``, and the
keys of the chosen optimizer sit beside the others (``optimizer: rda``, ``target_sparsity:
0.95``). :class:`TrainConfig` keeps those optimizer keys in their own section,
``cfg.optim`` (:mod:`distrib_rda.optimizers`), so a key of another optimizer is refused, naming
the optimizers it belongs to, and a run records only what applies to it
(:meth:`TrainConfig.params`). Model, dataset and optimizer names come from their registries.

A bad key or value raises :class:`ConfigError`, whose message names the key and what is allowed.
Importing this module is cheap (no torch, Ray or MLflow), so a typo is refused at once.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from distrib_rda.data.sources import DATASETS, IMAGEFOLDER, check_dataset_name
from distrib_rda.errors import UserError
from distrib_rda.models import MODELS, check_spec
from distrib_rda.optimizers import OPTIMIZERS, Integer, Number, OptimizerSettings, Switch

DEFAULT_OPTIMIZER = OPTIMIZERS.default
# Keys that say where and how a run ran, not what it is: tags or nothing in MLflow, and free to
# change when a run is resumed.
PLACEMENT_KEYS = ("address", "storage", "cache_dir", "tracking_uri", "data_root", "download",
                  "loader_workers", "checkpoint_every", "max_failures", "name", "experiment",
                  "register")
ALIASES = {"lambda": "lambda_"}
# Two ways to set one thing: RDA's l1 strength is given, or found for a target sparsity.
EXCLUSIVE = {"lambda_": "target_sparsity", "target_sparsity": "lambda_"}
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# The key `register` (--register NAME) has the name of ABCMeta.register, which no config uses.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class ConfigError(UserError, ValueError):
    """A configuration key or value that is not allowed; the message says which and why."""


def _plain_name(value: str | None) -> str | None:
    if value is not None and (not _PLAIN_NAME.match(value) or ".." in value):
        raise ValueError("must be a plain name: letters, digits and . _ + -, starting with a "
                         "letter or digit; no '/', no '..', not empty")
    return value


PlainName = Annotated[str | None, Field(max_length=200)]


class TrainConfig(BaseModel):
    """Everything that defines one training run, and where it runs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
    dataset: str = Field(DATASETS.default, description=f"one of {DATASETS.allowed()}")
    data_root: Path | None = Field(None, description="where torchvision-layout datasets live")
    download: Switch = Field(False, description="let torchvision download a missing dataset")
    cache_dir: Path = Field(Path("~/.cache/distrib-rda"),
                            description="where converted .beton files are kept")
    subset: Integer | None = Field(None, ge=1, description="train on the first N training images")
    image_size: Integer | None = Field(
        None, ge=4, le=4096, description="imagefolder: resize every image to N x N pixels; "
        "without it, images of mixed sizes are refused")
    augment: Switch | None = Field(
        None, description="crop+flip augmentation; default: on for 32x32 colour data only")
    loader_workers: Integer = Field(2, ge=1, le=64, description="FFCV loader threads per worker")

    # model
    model: str = Field(MODELS.default, description=f"one of {MODELS.allowed()}")
    init_scale: Number = Field(
        1.0, gt=0, le=1000, description="multiplies the default init of conv and linear weights")

    # optimizer: the name here, its keys in `optim`
    optimizer: str = Field(DEFAULT_OPTIMIZER, description=f"one of {OPTIMIZERS.allowed()}; "
                           "its own keys are marked [name] below")
    optim: SerializeAsAny[OptimizerSettings] = Field(
        default_factory=lambda: OPTIMIZERS[DEFAULT_OPTIMIZER](), exclude=True)

    # run
    epochs: Integer = Field(10, ge=1, le=10_000,
                            description="epochs of the run (RDA's fine-tune included)")
    batch_size: Integer = Field(128, ge=1, le=1 << 20,
                                description="global batch, split over the workers")
    workers: Integer = Field(2, ge=1, le=4096, description="DDP workers (one per device)")
    gpu: Switch = Field(False, description="one GPU per worker, NCCL")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: forward and backward under autocast; weights, gradients and "
        "the optimizer state stay float32")
    sync_every: Integer = Field(1, ge=1, le=1_000_000,
                                description="H: all-reduce the dual state every H steps")
    seed: Integer = Field(0, ge=0, lt=2**32)
    checkpoint_every: Integer = Field(1, ge=1, le=10_000, description="epochs between checkpoints")
    max_failures: Integer = Field(0, ge=-1, le=1_000_000,
                                  description="worker-group restarts allowed (-1: forever)")

    # where
    address: str | None = Field(
        None, description="Ray cluster address; default: RAY_ADDRESS, else a local instance")
    experiment: str = Field("distrib-rda", min_length=1, max_length=200,
                            description="MLflow experiment")
    tracking_uri: str = Field("sqlite:///mlflow.db", min_length=1,
                              description="MLflow tracking URI")
    storage: Path = Field(Path("results"), description="Ray Train storage path for checkpoints")
    name: PlainName = Field(None, description="run name; the same name resumes the run")
    register: PlainName = Field(
        None, description="add the final model to the MLflow Model Registry under this name")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        return check_dataset_name(value)

    @field_validator("model")
    @classmethod
    def _model_spec(cls, value: str) -> str:
        try:
            return check_spec(value)
        except UserError as error:
            raise ValueError(str(error).split(": ", 1)[-1]) from None

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError(f"must be one of {OPTIMIZERS.allowed()}")
        return value

    @field_validator("name", "register")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        return _plain_name(value)

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, value: str) -> str:
        if not value.strip() or "/" in value or any(ord(c) < 32 for c in value):
            raise ValueError("must be a non-empty name without '/' or control characters")
        return value

    @model_validator(mode="before")
    @classmethod
    def _section(cls, data: Any) -> Any:
        """Flat keys in, the optimizer's keys moved into ``optim`` (see :meth:`build`)."""
        if not isinstance(data, dict) or isinstance(data.get("optim"), OptimizerSettings):
            return data
        common, section, refused = split_keys(data)
        if refused:
            raise ValueError("; ".join(refused))
        name = common.get("optimizer", DEFAULT_OPTIMIZER)
        if name in OPTIMIZERS:
            common["optim"] = OPTIMIZERS[name].model_validate(section)
        return common

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if type(self.optim) is not OPTIMIZERS[self.optimizer]:
            raise ValueError(f"optim holds the settings of another optimizer than "
                             f"{self.optimizer}")
        if self.finetune_epochs >= self.epochs:
            raise ValueError(f"finetune_epochs (--finetune-epochs) {self.finetune_epochs} must "
                             f"be less than epochs (--epochs) {self.epochs}: the fine-tune is "
                             "the last part of the run")
        if any(epoch > self.optimizer_epochs for epoch in getattr(self.optim, "restart", ())):
            raise ValueError(f"restart epochs must be within the {self.optimizer_epochs} epochs "
                             "of the optimizer (not in the fine-tune)")
        if self.image_size is not None and not self.dataset.startswith(IMAGEFOLDER):
            raise ValueError(f"image_size (--image-size) applies to imagefolder:PATH datasets "
                             f"only, not {self.dataset}")
        if self.sync_every > 1 and not self.optim.dual_averaging:
            raise ValueError("sync_every > 1 (local dual averaging) needs optimizer: rda")
        if self.batch_size < self.workers:
            raise ValueError(f"batch_size {self.batch_size} is smaller than workers "
                             f"{self.workers}; it is the global batch, split over the workers")
        return self

    @property
    def per_worker_batch_size(self) -> int:
        return max(1, self.batch_size // self.workers)

    @property
    def finetune_epochs(self) -> int:
        """The last epochs of the run, spent on fixed-mask training (RDA's fine-tune; half the
        epochs unless set; 0 for the other optimizers)."""
        value = getattr(self.optim, "finetune_epochs", 0)
        return self.epochs // 2 if value is None else value

    @property
    def optimizer_epochs(self) -> int:
        """The first epochs of the run, spent on the optimizer itself."""
        return self.epochs - self.finetune_epochs

    @classmethod
    def build(cls, **values: Any) -> TrainConfig:
        """Validate flat ``values``, raising :class:`ConfigError` with every bad key named."""
        common, section, problems = split_keys(values)
        name = common.get("optimizer", DEFAULT_OPTIMIZER)
        optim = None
        if isinstance(name, str) and name in OPTIMIZERS:
            try:
                optim = OPTIMIZERS[name].model_validate(section)
            except ValidationError as error:
                problems += format_errors(error)
        try:
            if optim is not None and not problems:
                return cls.model_validate({**common, "optim": optim})
            # Name every problem at once: the other keys are checked beside a stand-in section.
            stand_in = OPTIMIZERS[DEFAULT_OPTIMIZER]()
            cls.model_validate({**common, "optimizer": DEFAULT_OPTIMIZER, "optim": stand_in})
        except ValidationError as error:
            problems += format_errors(error)
        if optim is None and not (isinstance(name, str) and name in OPTIMIZERS):
            problems.insert(0, f"optimizer (--optimizer): must be one of {OPTIMIZERS.allowed()} "
                               f"(got {name!r})")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """The flat config, JSON-compatible: what :meth:`build` takes back."""
        values = self.model_dump(mode="json")
        position = list(values).index("optimizer") + 1
        items = list(values.items())
        section = self.optim.model_dump(mode="json")
        return dict(items[:position] + list(section.items()) + items[position:])

    def params(self) -> dict[str, str]:
        """What defines the run, as MLflow params: every key but :data:`PLACEMENT_KEYS`, the
        optimizer's own keys only, and no key left unset (RDA to a target records no
        ``lambda_``; with a ``lambda_``, no target)."""
        return {key: json.dumps(value) if isinstance(value, (list, dict)) else str(value)
                for key, value in self.to_dict().items()
                if key not in PLACEMENT_KEYS and value is not None}

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied (flat keys). Changing the optimizer drops
        the old optimizer's keys; giving ``lambda_`` drops the target sparsity, and the other
        way round."""
        values = self.to_dict()
        if "optimizer" in changes and changes["optimizer"] != self.optimizer:
            values = {key: value for key, value in values.items()
                      if key not in type(self.optim).model_fields}
        changes = {ALIASES.get(key, key): value for key, value in changes.items()}
        for key, other in EXCLUSIVE.items():  # setting one way clears the other
            if changes.get(key) is not None and other not in changes and other in values:
                values[other] = None
        return TrainConfig.build(**{**values, **changes})


def optimizer_keys() -> dict[str, list[str]]:
    """Every optimizer key, with the optimizers it belongs to, in registration order."""
    owners: dict[str, list[str]] = {}
    for name in OPTIMIZERS:
        for key in OPTIMIZERS[name].model_fields:
            owners.setdefault(key, []).append(name)
    return owners


def config_fields() -> dict[str, list[tuple[str | None, FieldInfo]]]:
    """Every flat key: the common ones with ``(None, field)``, each optimizer key with one
    ``(optimizer, field)`` per optimizer that has it. For flags, help and search spaces."""
    fields: dict[str, list[tuple[str | None, FieldInfo]]] = {}
    for key, field in TrainConfig.model_fields.items():
        if key == "optimizer":
            fields[key] = [(None, field)]
            for name in OPTIMIZERS:
                for section_key, section_field in OPTIMIZERS[name].model_fields.items():
                    fields.setdefault(section_key, []).append((name, section_field))
        elif key != "optim":
            fields[key] = [(None, field)]
    return fields


def split_keys(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Flat values as ``(common keys, the chosen optimizer's keys, problems)``: a key of another
    optimizer is a problem that names the optimizers it belongs to."""
    values = dict(values)
    problems: list[str] = []
    for alias, key in ALIASES.items():
        if alias in values:
            if key in values:
                problems.append(f"{key} ({flag_name(key)}): given twice, as {alias} and {key}; "
                                "they are one key")
            values[key] = values.pop(alias)
    name = values.get("optimizer", DEFAULT_OPTIMIZER)
    mine = OPTIMIZERS[name].model_fields if isinstance(name, str) and name in OPTIMIZERS else {}
    owners = optimizer_keys()
    common, section = {}, {}
    for key, value in values.items():
        if key in mine:
            section[key] = value
        elif key in owners and key not in TrainConfig.model_fields:
            if mine:
                problems.append(f"{key} ({flag_name(key)}): applies to optimizer "
                                f"{', '.join(owners[key])}, not {name}")
        else:
            common[key] = value
    return common, section, problems


def flag_name(key: str) -> str:
    """The command-line flag of a config key: ``batch_size`` is ``--batch-size``."""
    return "--lambda" if key in ("lambda_", "lambda") else "--" + key.replace("_", "-")


def format_errors(error: ValidationError) -> list[str]:
    """One line per bad key: ``key (--flag): message (got value)``."""
    known = set(config_fields())
    lines = []
    for item in error.errors():
        parts = [str(part) for part in item["loc"] if not isinstance(part, int)]
        key = parts[0] if parts else ""
        message = item["msg"].removeprefix("Value error, ")
        if not key:
            lines.append(message)
        elif item["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (known keys: {', '.join(sorted(known))})")
        elif item["type"] == "missing":
            lines.append(f"{key} ({flag_name(key)}): required, it has no default")
        else:
            where = f"{key} ({flag_name(key)})" if key in known else key
            lines.append(f"{where}: {message} (got {item.get('input')!r})")
    return lines


def format_validation_error(error: ValidationError, schema: type[BaseModel]) -> str:
    """``error`` as the one message of :class:`ConfigError` (for schemas other than
    :class:`TrainConfig`, such as a search-space file)."""
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
            lines.append(f"{key}: {message} (got {item.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives one key twice."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (lines {seen[key]} and "
                f"{key_node.start_mark.line + 1}); give it once", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_mapping)


def load_yaml(path: Path | str, *, what: str = "config file") -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file: missing, unreadable, binary,
    malformed, a duplicate key, or not a mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a {what}")
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a YAML {what} is UTF-8 text)") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of config keys, not {type(data).__name__}")
    return data


def as_config(config: TrainConfig | dict[str, Any] | str | Path | None = None,
              **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a config, a dict of flat keys or a YAML file, with
    ``overrides`` applied: the Python API's way in."""
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, TrainConfig):
        values = config.to_dict()
    elif isinstance(config, dict):
        values = dict(config)
    elif isinstance(config, (str, Path)):
        values = load_yaml(config)
    else:
        raise ConfigError(f"config must be a TrainConfig, a dict or a YAML path, not "
                          f"{type(config).__name__}")
    return TrainConfig.build(**{**values, **overrides})


__all__ = ["ConfigError", "TrainConfig", "as_config", "config_fields", "flag_name",
           "format_validation_error", "load_yaml", "optimizer_keys", "split_keys"]
