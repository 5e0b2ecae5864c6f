"""Search-space files: ``tune/<experiment>.yaml``, validated before any trial starts.

A file has four sections::

    config:      # the fixed training config, the keys of ``distrib-rda train`` (TrainConfig)
      model: lenet5
      epochs: 3
    space:       # a distribution per searched config key
      lambda_: {loguniform: [1.0e-5, 2.0e-3]}   # log-uniform on [lo, hi], 0 < lo < hi
      gamma:   {uniform: [0.1, 1.0]}            # uniform on [lo, hi], lo < hi
      adaptive: {choice: [false, true]}         # one of the values, sampled
      restart: {choice: [[], [2]]}              # (lists too: restart epochs)
      # {grid: [...]}: every value, once each, with algorithm grid (every key a grid)
    objectives:  # exactly two metrics of the last epoch, each maximized or minimized
      - {metric: accuracy, mode: max}
      - {metric: sparsity, mode: max}
    search:      # how trials are picked and run
      algorithm: optuna   # optuna (multi-objective TPE or NSGA-II), random, or grid
      sampler: tpe        # optuna's sampler: tpe, or nsga2 for long searches
      trials: 8
      max_concurrent: 2   # trials (whole Train runs) at once
      seed: 0
      start:              # optional: configurations to try first, every searched key each
        - {lambda_: 1.0e-4, gamma: 0.3, adaptive: false, restart: []}

Both ends of each range and every listed value are checked against :class:`TrainConfig`
(whose bounds are intervals), so a trial never fails on a value the schema refuses. Errors
name the file, the key and the reason.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distrib_rda.config import (
    ALIASES,
    ConfigError,
    TrainConfig,
    config_fields,
    format_validation_error,
    load_yaml,
)

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
# Metrics every epoch reports (rank 0), usable as objectives.
METRICS = ("accuracy", "sparsity", "train_loss", "test_loss", "nonzeros",
           "samples_per_second", "epoch_seconds")
# Keys that say where a search runs and records; one search has one of each.
NOT_SEARCHABLE = ("address", "experiment", "tracking_uri", "storage", "name", "cache_dir",
                  "data_root", "download", "max_failures", "checkpoint_every")
DEFAULT_TRIALS = 8


class Distribution(BaseModel):
    """One of ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{choice: [...]}``,
    ``{grid: [...]}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["loguniform", "uniform", "choice", "grid"]
    values: list[Any]

    @model_validator(mode="before")
    @classmethod
    def _from_mapping(cls, data: Any) -> Any:
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError(f"must be a mapping with one of {', '.join(DISTRIBUTIONS)}, "
                             "such as {loguniform: [1.0e-5, 1.0e-3]}")
        (kind, values), = data.items()
        if kind not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {kind!r} "
                             f"(known: {', '.join(DISTRIBUTIONS)})")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{kind}: needs a non-empty list of values")
        if kind in ("loguniform", "uniform"):
            if len(values) != 2 or not all(_is_number(v) for v in values):
                raise ValueError(f"{kind}: needs two numbers [lo, hi], got {values!r}")
            lo, hi = (float(v) for v in values)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{kind}: bounds must be finite, got {values!r}")
            if lo >= hi:
                raise ValueError(f"{kind}: needs lo < hi, got [{lo:g}, {hi:g}]")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: needs 0 < lo, got lo = {lo:g}")
            values = [lo, hi]
        return {"kind": kind, "values": values}

    @property
    def encoded(self) -> bool:
        """Lists (``restart``) are passed to Tune and Optuna as JSON strings such as "[2]"."""
        return any(isinstance(value, (list, dict)) for value in self.values)

    def tune_domain(self):
        """The Ray Tune domain: ``tune.loguniform``, ``tune.uniform``, ``choice`` or
        ``grid_search``."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        options = [json.dumps(v) for v in self.values] if self.encoded else list(self.values)
        return tune.choice(options) if self.kind == "choice" else tune.grid_search(options)

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded and isinstance(value, str) else value

    def encode(self, value: Any) -> Any:
        return json.dumps(value) if self.encoded else value

    def contains(self, value: Any) -> bool:
        """Whether the distribution can produce ``value`` (bools are not numbers here)."""
        if self.kind in ("loguniform", "uniform"):
            return _is_number(value) and self.values[0] <= value <= self.values[1]
        return any(value == option and isinstance(value, bool) == isinstance(option, bool)
                   for option in self.values)

    def describe(self) -> str:
        return f"{self.kind} {self.values}"


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Literal[METRICS] = Field(description="a metric every epoch reports")  # type: ignore[valid-type]
    mode: Literal["max", "min"] = "max"


def _default_objectives() -> list[Objective]:
    return [Objective(metric="accuracy", mode="max"), Objective(metric="sparsity", mode="max")]


class SearchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["optuna", "random", "grid"] = "optuna"
    sampler: Literal["tpe", "nsga2"] = Field(
        "tpe", description="optuna only: multi-objective TPE, or NSGA-II for long searches")
    trials: int | None = Field(None, ge=1, description="default: 8; grid: its size")
    max_concurrent: int = Field(1, ge=1, description="trials (Train runs) at once")
    seed: int | None = Field(0, ge=0, description="sampler seed; null: random")
    start: list[dict[str, Any]] = Field(
        default_factory=list,
        description="configurations tried first (a value for every searched key), then sampling")


class SpaceFile(BaseModel):
    """The file as written; :func:`load_space` checks it against :class:`TrainConfig`."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Distribution]
    objectives: list[Objective] = Field(default_factory=_default_objectives)
    search: SearchSettings = Field(default_factory=SearchSettings)

    @model_validator(mode="after")
    def _two_objectives(self) -> SpaceFile:
        metrics = [objective.metric for objective in self.objectives]
        if len(metrics) != 2 or len(set(metrics)) != 2:
            raise ValueError(f"objectives: needs two different metrics (a Pareto front of "
                             f"two), got {metrics}")
        return self


@dataclass
class SearchSpec:
    """A validated search: the fixed config, the distributions, objectives and settings."""

    path: Path
    base: TrainConfig
    space: dict[str, Distribution]
    objectives: list[Objective]
    search: SearchSettings

    @property
    def name(self) -> str:
        """The search's name: ``--name``, else the file's stem."""
        return self.base.name or self.path.stem

    @property
    def trials(self) -> int:
        if self.search.algorithm == "grid":
            return self.grid_size
        return self.search.trials or DEFAULT_TRIALS

    @property
    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.space.values() if d.kind == "grid")

    @property
    def metrics(self) -> list[str]:
        return [objective.metric for objective in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [objective.mode for objective in self.objectives]

    def param_space(self) -> dict[str, Any]:
        return {key: dist.tune_domain() for key, dist in self.space.items()}

    def start_points(self) -> list[dict[str, Any]]:
        """``search.start`` as Tune's ``points_to_evaluate``."""
        return [{key: self.space[key].encode(value) for key, value in point.items()}
                for point in self.search.start]

    def decode(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Tune's sampled values back to config values."""
        return {key: self.space[key].decode(value) for key, value in sampled.items()
                if key in self.space}

    def trial_config(self, sampled: dict[str, Any]) -> TrainConfig:
        return self.base.replace(**self.decode(sampled))

    def as_dict(self) -> dict[str, Any]:
        """What a resumed search must match."""
        return {
            "config": self.base.to_dict(),
            "space": {key: {d.kind: d.values} for key, d in self.space.items()},
            "objectives": [o.model_dump() for o in self.objectives],
            "algorithm": self.search.algorithm, "sampler": self.search.sampler,
            "seed": self.search.seed, "start": self.search.start,
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_float_field(key: str) -> bool:
    annotation = config_fields()[key][0][1].annotation
    return annotation is float or float in typing.get_args(annotation)


def load_space(path: Path | str, *, overrides: dict[str, Any] | None = None,
               trials: int | None = None, max_concurrent: int | None = None) -> SearchSpec:
    """Read and validate a space file. ``overrides`` (command-line flags) fix config keys:
    a searched key given as a flag is taken out of the space.

    Raises :class:`ConfigError` naming the file, the key and the reason.
    """
    path = Path(path)
    data = load_yaml(path)
    try:
        parsed = SpaceFile.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{path}: " + format_validation_error(error, SpaceFile)
                          .replace("invalid configuration", "invalid search space")) from None
    overrides = dict(overrides or {})
    try:
        base = TrainConfig.build(**{**parsed.config, **overrides})
    except ConfigError as error:
        raise ConfigError(f"{path}: config: {error}") from None

    space: dict[str, Distribution] = {}
    for raw_key, dist in parsed.space.items():
        key = ALIASES.get(raw_key, raw_key)
        where = f"{path}: space.{raw_key}"
        if key not in config_fields():
            known = ", ".join(sorted(set(config_fields()) - set(NOT_SEARCHABLE)))
            raise ConfigError(f"{where}: unknown config key (searchable keys: {known})")
        if key in NOT_SEARCHABLE:
            raise ConfigError(f"{where}: cannot be searched, it is the same for every trial "
                              "of a search; set it under config: or as a flag")
        if key in space:
            raise ConfigError(f"{where}: given twice (lambda and lambda_ are one key)")
        if key in overrides:
            continue  # the flag fixes it
        if dist.kind in ("loguniform", "uniform") and not _is_float_field(key):
            raise ConfigError(f"{where}: {dist.kind} draws real numbers, but {key} is not a "
                              "real number; use choice or grid")
        space[key] = dist
    for key, dist in space.items():
        # each value beside the other searched keys' first values: a searched lambda_ clears
        # the base's target, so a searched adaptive=True is allowed with it
        others = {other: d.values[0] for other, d in space.items() if other != key}
        for value in dist.values:
            try:
                base.replace(**{**others, key: value})
            except ConfigError as error:
                reason = str(error).split("\n", 1)[-1].strip()
                raise ConfigError(f"{path}: space.{key}: value {value!r} is refused by the "
                                  f"training config: {reason}") from None
    if not space:
        raise ConfigError(f"{path}: space: nothing left to search "
                          f"(every key is fixed by config flags: {', '.join(overrides)})")

    settings = parsed.search.model_copy()
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise ConfigError(f"--max-concurrent {max_concurrent}: must be at least 1")
        settings.max_concurrent = max_concurrent
    _check_algorithm(path, settings, space)
    if trials is not None:
        if trials < 1:
            raise ConfigError(f"--trials {trials}: must be at least 1")
        if settings.algorithm == "grid" and trials != _grid_size(space):
            raise ConfigError(f"--trials {trials}: a grid search runs each of its "
                              f"{_grid_size(space)} combinations once; leave --trials out")
        settings.trials = trials
    settings.start = _start_points(path, settings, space, overrides)
    return SearchSpec(path=path, base=base, space=space, objectives=list(parsed.objectives),
                      search=settings)


def _grid_size(space: dict[str, Distribution]) -> int:
    return math.prod(len(d.values) for d in space.values() if d.kind == "grid")


def _check_algorithm(path: Path, settings: SearchSettings,
                     space: dict[str, Distribution]) -> None:
    algorithm = settings.algorithm
    for key, dist in space.items():
        if algorithm == "grid" and dist.kind != "grid":
            raise ConfigError(f"{path}: space.{key}: search.algorithm grid takes only "
                              f"{{grid: [...]}} distributions, got {dist.kind}; use "
                              "algorithm random or optuna to sample it")
        if algorithm != "grid" and dist.kind == "grid":
            raise ConfigError(f"{path}: space.{key}: grid needs search.algorithm grid; with "
                              f"{algorithm}, use {{choice: [...]}}")
    if algorithm == "grid" and settings.trials is not None and settings.trials != _grid_size(space):
        raise ConfigError(f"{path}: search.trials: a grid search runs each of its "
                          f"{_grid_size(space)} combinations once; got trials: "
                          f"{settings.trials}; leave it out")


def _start_points(path: Path, settings: SearchSettings, space: dict[str, Distribution],
                  overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """``search.start`` with aliases resolved, keys fixed by flags dropped, and every value
    checked against its distribution."""
    if settings.start and settings.algorithm == "grid":
        raise ConfigError(f"{path}: search.start: a grid search runs its grid; start points "
                          "go with algorithm optuna or random")
    trials = settings.trials or DEFAULT_TRIALS
    if len(settings.start) > trials:
        raise ConfigError(f"{path}: search.start: {len(settings.start)} start points but only "
                          f"{trials} trials; raise trials or drop points")
    points = []
    for n, raw in enumerate(settings.start):
        where = f"{path}: search.start[{n}]"
        point = {ALIASES.get(key, key): value for key, value in raw.items()}
        point = {key: value for key, value in point.items() if key not in overrides}
        unknown = sorted(set(point) - set(space))
        missing = sorted(set(space) - set(point))
        if unknown:
            raise ConfigError(f"{where}: {', '.join(unknown)} not searched "
                              f"(searched keys: {', '.join(space)})")
        if missing:
            raise ConfigError(f"{where}: needs a value for every searched key; missing "
                              f"{', '.join(missing)}")
        for key, value in point.items():
            if not space[key].contains(value):
                raise ConfigError(f"{where}.{key}: {value!r} is outside "
                                  f"{space[key].describe()}")
        points.append({key: point[key] for key in space})
    return points
