"""Pre-flight: what a run, a search or a command can check before any work, in about a second.

``train`` and ``tune`` call :func:`check_train` and :func:`check_search` after the config is
validated and before torch, Ray or MLflow are imported, and the driver calls them again (the
Python API's way in). They check, in this order, and refuse with one message that names the
flag, key or file and says what is allowed:

- the places a run writes: ``--storage`` and ``--cache-dir`` are directories or can be created
  (not a file, nothing under a file, a writable parent); a run's directory stays inside
  ``--storage``, and a rerun under the same ``--name`` has the config it was started with;
- the MLflow store: a sqlite URI names a database file (or one to create, in a directory that
  exists), not a directory or another kind of file; a server answers ``/health`` within
  seconds; the experiment is not deleted;
- the Ray cluster of ``--address`` (or ``RAY_ADDRESS``) answers on its port;
- the dataset, from file headers or the converted copy's ``meta.json`` (no pixels read): two
  classes at least, images of one size (or ``--image-size``), square for the models, and
  ``--subset`` and ``--workers`` that fit its training and test images.

Nothing here creates a file or a directory, and nothing imports torch, Ray or MLflow: a
refused command leaves nothing behind. What only a worker can know is the exception.
The output checks of ``export``, ``pareto`` and ``data convert`` are here too
(:func:`check_output_file`, :func:`check_directory`).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from distrib_rda.config import TrainConfig
from distrib_rda.data.meta import DatasetMeta, DataSourceError
from distrib_rda.data.sources import IMAGEFOLDER, Facts, resolve_source
from distrib_rda.errors import UserError
from distrib_rda.locations import SQLITE, resolve_locations, sqlite_file

CONFIG_FILE = "distrib_rda_config.json"  # a run's config, in its directory under --storage
# Keys that may change when a job is resumed; any other change is refused. A finished run
# rerun with --register NAME is registered without training again.
RESUMABLE_KEYS = {"max_failures", "address", "checkpoint_every", "loader_workers", "register"}
SQLITE_MAGIC = b"SQLite format 3\x00"
PROBE_SECONDS = 5.0  # a server or cluster that does not answer in this long is refused


class PreflightError(UserError):
    """Input refused before any work; the message names the flag, key or file."""


# --- places to write ------------------------------------------------------------------------


def check_directory(path: Path | str, flag: str) -> Path:
    """``path`` as a directory that exists or can be created: not a file, nothing under a
    file, and its nearest existing ancestor writable. Nothing is created."""
    path = Path(path).expanduser()
    absolute = Path(os.path.abspath(path))
    for place in (absolute, *absolute.parents):
        try:
            if not place.exists():
                continue
        except OSError as error:
            raise PreflightError(f"{flag} {path}: {place} cannot be read "
                                 f"({error.strerror})") from None
        if not place.is_dir():
            where = "is a file" if place == absolute else f"lies under {place}, which is a file"
            raise PreflightError(f"{flag} {path}: {where}; give a directory")
        if not os.access(place, os.W_OK | os.X_OK):
            what = "is not writable" if place == absolute else \
                f"cannot be created: {place} is not writable"
            raise PreflightError(f"{flag} {path}: {what}; give a directory you can write")
        return path
    return path


def check_output_file(path: Path | str, flag: str = "--out", *, force: bool = False,
                      suffixes: tuple[str, ...] = ()) -> Path:
    """A file that a command may write: not a directory, not an existing file unless
    ``force``, with one of ``suffixes`` (if given), in a writable directory that exists."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise PreflightError(f"{flag} {path}: is a directory; give a file name, such as "
                             f"{path / ('out' + (suffixes[0] if suffixes else ''))}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise PreflightError(f"{flag} {path}: unknown file type {path.suffix or '(none)'!r}; "
                             f"the name must end in one of {', '.join(suffixes)}")
    if path.exists() and not force:
        raise PreflightError(f"{flag} {path}: already exists; pass --force to overwrite it, "
                             "or give another name")
    check_directory(path.parent, flag)
    if not path.parent.expanduser().is_dir():
        raise PreflightError(f"{flag} {path}: directory {path.parent} does not exist; create "
                             "it, or give a file in an existing directory")
    return path


# --- the MLflow store -----------------------------------------------------------------------


def check_store(uri: str, flag: str = "--tracking-uri", *, must_exist: bool = False,
                experiment: str | None = None) -> bool:
    """Check the MLflow store at ``uri`` without creating it; with ``must_exist``, a store
    that is not there is refused (``pareto`` and ``export`` read one). With ``experiment``,
    an experiment of that name that is deleted is refused.

    Returns whether the store could be checked here: True for sqlite files and servers,
    False for other database URIs (``postgresql://`` and the like), which only MLflow reads.
    """
    if uri.startswith(("http://", "https://")):
        _check_server(uri, flag, experiment)
        return True
    database = sqlite_file(uri)
    if database is None:
        if "://" not in uri or uri.startswith("file:"):
            raise PreflightError(f"{flag} {uri}: MLflow 3 needs a database or server URI, such "
                                 "as sqlite:///mlflow.db or http://127.0.0.1:5000")
        return False
    if database.is_dir():
        raise PreflightError(f"{flag} {uri}: {database} is a directory; name the database "
                             f"file, such as {SQLITE}{database / 'mlflow.db'}")
    if not database.exists():
        if must_exist:
            raise PreflightError(f"{flag} {uri}: no MLflow store there ({database} does not "
                                 "exist); give the --tracking-uri the runs were recorded in")
        if not database.parent.is_dir():
            raise PreflightError(f"{flag} {uri}: directory {database.parent} does not exist; "
                                 "create it, or name a database file in an existing directory")
        if not os.access(database.parent, os.W_OK | os.X_OK):
            raise PreflightError(f"{flag} {uri}: directory {database.parent} is not writable")
        return True
    _check_database(uri, flag, database, experiment)
    return True


def _check_database(uri: str, flag: str, database: Path, experiment: str | None) -> None:
    """An existing sqlite file: a database, MLflow's (or empty), with ``experiment`` not
    deleted. Read-only: the file is opened in sqlite's ``mode=ro``."""
    try:
        with open(database, "rb") as file:
            head = file.read(len(SQLITE_MAGIC))
    except OSError as error:
        raise PreflightError(f"{flag} {uri}: {database} cannot be read "
                             f"({error.strerror})") from None
    if not head:
        return  # an empty file: sqlite makes it a new database
    if head != SQLITE_MAGIC:
        raise PreflightError(f"{flag} {uri}: {database} is not an SQLite database; give the "
                             "MLflow store's database file, or a new file name")
    try:
        connection = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            tables = {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "experiments" not in tables:
                if tables - {"alembic_version"}:
                    raise PreflightError(
                        f"{flag} {uri}: {database} is an SQLite database but not an MLflow "
                        f"store (its tables: {', '.join(sorted(tables)[:6])}); give another "
                        "file")
                return
            if experiment is not None:
                row = connection.execute("SELECT lifecycle_stage, experiment_id FROM "
                                         "experiments WHERE name = ?", (experiment,)).fetchone()
                if row is not None and row[0] != "active":
                    raise _deleted(experiment, row[1])
        finally:
            connection.close()
    except sqlite3.Error as error:
        raise PreflightError(f"{flag} {uri}: {database} cannot be read as a database "
                             f"({error})") from None


def _deleted(experiment: str, experiment_id: Any) -> PreflightError:
    return PreflightError(f"--experiment {experiment}: the MLflow experiment is deleted; "
                          f"restore it (mlflow experiments restore --experiment-id "
                          f"{experiment_id}) or choose another name")


def _check_server(uri: str, flag: str, experiment: str | None) -> None:
    """One plain request to ``/health`` (MLflow's client retries for minutes), then the
    experiment by name through the REST API."""
    base = uri.rstrip("/")
    try:
        urllib.request.urlopen(base + "/health", timeout=PROBE_SECONDS).close()
    except (OSError, ValueError) as error:
        raise PreflightError(f"{flag} {uri}: the MLflow tracking server is unreachable "
                             f"({error}); start it, or give another --tracking-uri") from None
    if experiment is None:
        return
    query = urllib.parse.urlencode({"experiment_name": experiment})
    try:
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}",
                                    timeout=PROBE_SECONDS) as response:
            found = json.load(response).get("experiment", {})
    except (OSError, ValueError):
        return  # not there (404), or a server without this API: MLflow decides at the start
    if found.get("lifecycle_stage", "active") != "active":
        raise _deleted(experiment, found.get("experiment_id"))


# --- export and pareto ----------------------------------------------------------------------

# What matplotlib writes without extra software (pgf needs LaTeX; raw and rgba are no images).
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".eps", ".ps", ".jpg", ".jpeg", ".tif",
                 ".tiff", ".webp")


def check_export(source: str, out: Path | str, tracking_uri: str, *,
                 force: bool = False) -> Path:
    """``export SOURCE --out FILE``: the output may be written, and a SOURCE that is no file
    or directory names a run in a store that is there. Returns ``out``."""
    out = check_output_file(out, "--out", force=force)
    path = Path(source).expanduser()
    if path.exists():
        return out
    if "/" in source or os.sep in source or "." in source:
        raise PreflightError(f"{source}: no such checkpoint file or directory")
    try:
        check_store(tracking_uri, must_exist=True)
    except PreflightError as error:
        raise PreflightError(f"{source}: no such file, and no MLflow store to look the run up "
                             f"in: {error}") from None
    return out


def check_pareto(tracking_uri: str, out: Path | str | None, *, force: bool = False) -> bool:
    """``pareto``: the plot may be written (a known image type, not over a file without
    ``--force``) and the store is there; nothing is created. Returns :func:`check_store`'s
    answer: whether the store could be checked here."""
    if out is not None:
        check_output_file(out, "--out", force=force, suffixes=PLOT_SUFFIXES)
    return check_store(tracking_uri, must_exist=True)


# --- the Ray cluster ------------------------------------------------------------------------


def check_address(address: str | None, timeout: float = PROBE_SECONDS) -> None:
    """``address`` (or ``RAY_ADDRESS``) answers on its port. Ray retries an unreachable
    cluster for many minutes; a plain TCP probe answers in seconds."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" or a name Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise PreflightError(f"--address {address}: no Ray cluster answers there ({error}); "
                             "start one with `ray start --head` or cluster/local.sh, or leave "
                             "out --address to run on a local instance") from None


# --- the run's directory --------------------------------------------------------------------


def run_directory(cfg: TrainConfig) -> tuple[Path, str]:
    """``(storage, name)`` of a run: ``--name``, else the model, optimizer and the time."""
    import re

    storage = Path(cfg.storage).expanduser().resolve()
    model = re.sub(r"[^A-Za-z0-9_.+-]+", "-", cfg.model.rpartition(":")[2])  # a plain name
    name = cfg.name or f"{model}-{cfg.optimizer}-{datetime.now():%Y%m%d-%H%M%S}"
    return storage, name


def check_resume(cfg: TrainConfig, directory: Path) -> bool:
    """A run rerun under the same name must have the same config, bar :data:`RESUMABLE_KEYS`.
    Returns whether ``directory`` holds a saved config (a resumed run). Reads only."""
    storage = directory.parent
    if not directory.resolve().is_relative_to(storage.resolve()):
        raise PreflightError(f"--name {directory.name}: the run's directory {directory} would "
                             f"lie outside --storage {storage}; give a plain name")
    if directory.exists() and not directory.is_dir():
        raise PreflightError(f"--name {directory.name}: {directory} is a file, not a run's "
                             "directory; pick another --name")
    saved_file = directory / CONFIG_FILE
    if not saved_file.exists():
        return False
    try:
        saved = json.loads(saved_file.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError) as error:
        raise PreflightError(f"--name {directory.name}: {saved_file} cannot be read as the "
                             f"run's config ({error}); pick a new --name") from None
    current = cfg.to_dict()
    changed = sorted(key for key in current
                     if key not in RESUMABLE_KEYS and saved.get(key) != current[key])
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {current[key]!r}" for key in changed)
        raise PreflightError(f"--name {directory.name}: resuming with a different config "
                             f"({details}); pick a new --name to start a new run")
    return True


# --- the dataset ----------------------------------------------------------------------------


def dataset_facts(cfg: TrainConfig, dataset: str | None = None) -> Facts | None:
    """What the dataset is, without reading its pixels: from the converted copy's
    ``meta.json`` when the cache has one, else from the source's headers. None when the
    source is missing and ``download`` will fetch it (checked once it is there)."""
    from distrib_rda.data.cache import cached_dir

    dataset = dataset or cfg.dataset
    try:
        source = resolve_source(dataset, data_root=cfg.data_root, download=False,
                                image_size=cfg.image_size)
    except DataSourceError:
        if cfg.download and not dataset.startswith(IMAGEFOLDER):
            return None
        raise
    converted = cached_dir(source, cfg.cache_dir)
    if (converted / "meta.json").is_file():
        try:
            return facts_of(DatasetMeta.load(converted))
        except DataSourceError:
            pass  # a broken copy is rebuilt at conversion; the source says what it holds
    return source.peek()


def facts_of(meta: DatasetMeta) -> Facts:
    return Facts(meta.num_train, meta.num_test, tuple(meta.classes), tuple(meta.shape))


def check_data(cfg: TrainConfig, facts: Facts | None, dataset: str | None = None) -> None:
    """``cfg`` fits the dataset: ``--subset`` at most its training images and at least one
    per worker, a test image per worker, and square images (the models take square input)."""
    if facts is None:
        return
    dataset = dataset or cfg.dataset
    if len(facts.classes) < 2:
        raise PreflightError(f"{dataset}: {len(facts.classes)} class; a classifier needs two "
                             "classes at least")
    height, width, _ = facts.shape
    if height != width:
        hint = "give --image-size N to resize them to N x N" if \
            dataset.startswith(IMAGEFOLDER) else "the models take square images"
        raise PreflightError(f"{dataset}: images are {width}x{height} (width x height), not "
                             f"square; {hint}")
    if facts.num_train is not None and cfg.subset is not None and cfg.subset > facts.num_train:
        raise PreflightError(f"--subset {cfg.subset}: {dataset} has {facts.num_train:,} "
                             f"training images; give --subset {facts.num_train} or fewer")
    train = cfg.subset if cfg.subset is not None else facts.num_train
    if train is not None and train < cfg.workers:
        flag = f"--subset {cfg.subset}" if cfg.subset is not None else dataset
        raise PreflightError(f"{flag}: {train} training image(s) for --workers {cfg.workers}; "
                             "each worker needs one at least")
    if facts.num_test is not None and facts.num_test < cfg.workers:
        raise PreflightError(f"--workers {cfg.workers}: {dataset} has {facts.num_test} test "
                             "image(s), and each worker evaluates its own part; use as many "
                             "workers as test images at most")


# --- the whole of a run or a search ---------------------------------------------------------


@dataclass
class TrainPlan:
    """A run checked before any work: the config with its places made absolute and its name
    set, its directory, whether it resumes, whether the store was checked here."""

    cfg: TrainConfig
    directory: Path
    resumed: bool
    store_checked: bool


def check_places(cfg: TrainConfig) -> None:
    """``--storage``, ``--cache-dir`` and ``--data-root``."""
    check_directory(cfg.storage, "--storage")
    check_directory(cfg.cache_dir, "--cache-dir")
    if cfg.data_root is not None:
        root = Path(cfg.data_root).expanduser()
        if cfg.download:
            check_directory(root, "--data-root")
        elif root.exists() and not root.is_dir():
            raise PreflightError(f"--data-root {root}: is a file; give the directory that "
                                 "holds the datasets")


def check_train(cfg: TrainConfig) -> TrainPlan:
    """Everything about a ``train`` run that can be checked before any work (module
    docstring). Creates nothing."""
    cfg = resolve_locations(cfg)
    storage, name = run_directory(cfg)
    cfg = cfg.replace(name=name)
    check_places(cfg)
    directory = storage / name
    resumed = check_resume(cfg, directory)
    store_checked = check_store(cfg.tracking_uri, experiment=cfg.experiment)
    check_address(cfg.address)
    check_data(cfg, dataset_facts(cfg))
    return TrainPlan(cfg, directory, resumed, store_checked)


def check_search(spec, *, resume: bool = False) -> bool:
    """Everything about a ``tune`` search that can be checked before any work: the search's
    directory, the places, the store, the cluster, and every dataset against the values the
    trials can take of ``subset`` and ``workers``. Returns whether the store was checked
    here. ``spec.base`` must have its places resolved (:func:`resolve_locations`)."""
    from distrib_rda.search.space import SearchSpec

    assert isinstance(spec, SearchSpec)
    cfg = spec.base
    search_dir = Path(cfg.storage) / spec.name
    state_file = search_dir / "search.json"
    check_places(cfg)
    if search_dir.exists() and not resume:
        raise PreflightError(f"{search_dir}: a search named '{spec.name}' is already there; "
                             "add --resume to continue it, or --name NEW to start another")
    if resume and not state_file.is_file():
        raise PreflightError(f"--resume: no search '{spec.name}' to resume ({state_file} does "
                             "not exist); leave out --resume to start it")
    store_checked = check_store(cfg.tracking_uri, experiment=cfg.experiment,
                                must_exist=resume and cfg.tracking_uri.startswith(SQLITE))
    check_address(cfg.address)
    datasets = spec.space["dataset"].values if "dataset" in spec.space else [cfg.dataset]
    variants = [{}]
    for key in ("subset", "workers", "image_size"):
        if key in spec.space:
            variants = [{**variant, key: value} for variant in variants
                        for value in spec.space[key].values]
    for dataset in datasets:
        for variant in variants:
            trial = cfg.replace(dataset=dataset, **variant)
            check_data(trial, dataset_facts(trial), dataset)
    return store_checked


__all__ = ["CONFIG_FILE", "PLOT_SUFFIXES", "PreflightError", "TrainPlan", "check_address",
           "check_data", "check_directory", "check_export", "check_output_file", "check_pareto",
           "check_resume", "check_search", "check_store", "check_train", "dataset_facts",
           "run_directory"]
