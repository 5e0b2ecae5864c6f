"""Where a run's records go: its MLflow store and its checkpoint storage, made absolute.

``MLFLOW_TRACKING_URI`` and ``DISTRIB_RDA_STORAGE`` replace the defaults of ``--tracking-uri``
and ``--storage``. Inside a Ray job (``ray job submit``), whose working directory is Ray's
temporary copy that is deleted with the cluster, a relative path is refused before any work.
Importing this module is cheap (no MLflow, Ray or torch): the pre-flight checks use it.
"""

from __future__ import annotations

import os
from pathlib import Path

from distrib_rda.config import TrainConfig
from distrib_rda.errors import UserError

STORAGE_ENV = "DISTRIB_RDA_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the job's driver
DEFAULT_TRACKING_URI: str = TrainConfig.model_fields["tracking_uri"].default
DEFAULT_STORAGE: Path = TrainConfig.model_fields["storage"].default


SQLITE = "sqlite:///"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, absolute (a relative one against the working
    directory, a ``?query`` left out), else None."""
    if not uri.startswith(SQLITE):
        return None
    return Path(os.path.abspath(Path(uri[len(SQLITE):].split("?", 1)[0]).expanduser()))


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute (:func:`sqlite_file`), so every process
    writes the same file."""
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        return SQLITE + str(sqlite_file(uri))
    return uri


def default_tracking_uri(uri: str) -> str:
    """``uri``, or ``MLFLOW_TRACKING_URI`` where ``uri`` is the built-in default."""
    if uri == DEFAULT_TRACKING_URI and os.environ.get(TRACKING_ENV):
        return os.environ[TRACKING_ENV]
    return uri


def ray_job_directory() -> Path | None:
    """The working directory of this process if it is a Ray job's driver, else None.

    ``ray job submit`` runs the entrypoint in a copy of ``--working-dir`` inside Ray's session
    folder, which Ray deletes with the cluster.
    """
    return Path.cwd() if RAY_JOB_ENV in os.environ else None


def resolve_locations(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its MLflow store and checkpoint storage made absolute, before any work.

    The defaults give way to ``MLFLOW_TRACKING_URI`` and ``DISTRIB_RDA_STORAGE``. Inside a Ray
    job a path relative to the working directory would be lost with the cluster: refused.
    """
    uri = default_tracking_uri(cfg.tracking_uri)
    storage = Path(cfg.storage)
    if storage == DEFAULT_STORAGE and os.environ.get(STORAGE_ENV):
        storage = Path(os.environ[STORAGE_ENV])
    storage = storage.expanduser()
    job_dir = ray_job_directory()
    if job_dir is not None:
        lost = []
        database = sqlite_file(uri)
        if database is not None and _inside(database, job_dir):
            lost.append(f"--tracking-uri {uri} (or {TRACKING_ENV})")
        if _inside(storage, job_dir):
            lost.append(f"--storage {storage} (or {STORAGE_ENV})")
        if lost:
            raise UserError(
                f"inside a Ray job, whose working directory {job_dir} is Ray's temporary copy "
                f"that is deleted with the cluster, give {' and '.join(lost)} as a server URI or "
                "an absolute path every node sees; cluster/local.sh, the cloud configs and the "
                "KubeRay manifests set both variables for their jobs")
    return cfg.replace(tracking_uri=resolve_tracking_uri(uri), storage=storage.resolve())


def _inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` (relative ones against the working directory) lies in ``directory``."""
    return (Path.cwd() / path.expanduser()).resolve().is_relative_to(directory.resolve())
