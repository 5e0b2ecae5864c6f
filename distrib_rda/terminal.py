"""What the user's terminal shows: progress from the first second, no library noise that no
user can act on, and no ANSI colour codes where the output is not a terminal.

- :func:`say` prints one progress line (start-up phases) to standard error, at once.
- :func:`quiet_mlflow` turns off MLflow's notes about creating and migrating a sqlite store.
- :func:`prepare_ray` sets, before Ray starts, what keeps its start-up quiet, each at its
  source: token authentication on for a local instance (Ray's own default, said explicitly, so
  Ray does not warn that it chose it); no preemption watcher on a local instance, where no
  node is ever drained (its actor makes Ray's core worker log an error-level line each time a
  worker group starts); every worker's line printed as it is (Ray's deduplication turns two
  trials' epoch lines into one "[repeated 2x across cluster]"); and no colour codes in the
  worker prefixes and Ray's own log lines when standard error is not a terminal.

Each setting gives way to an environment variable the user set.
"""

from __future__ import annotations

import logging
import os
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# MLflow's notes when it creates or upgrades a sqlite store's tables.
MLFLOW_NOISE = ("mlflow.store.db.utils", "alembic.runtime.migration")
# Ray Tune's notes about writing its state and the total run time, after every search.
TUNE_NOISE = ("ray.tune.tune",)


def say(message: str) -> None:
    """One line of progress, on standard error, flushed at once."""
    print(f"distrib-rda: {message}", file=sys.stderr, flush=True)


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def quiet_mlflow() -> None:
    """MLflow's INFO lines about creating and migrating a sqlite store's tables."""
    for name in MLFLOW_NOISE:
        logging.getLogger(name).setLevel(logging.WARNING)


class StripAnsi(logging.Filter):
    """Removes colour codes from a record's message (Ray colours its dashboard link)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1b" in message:
            record.msg, record.args = ANSI.sub("", message), None
        return True


def _local(address: str | None) -> bool:
    return not (address or os.environ.get("RAY_ADDRESS"))


def prepare_ray(address: str | None) -> None:
    """Settings that keep Ray's start-up and worker output readable (module docstring); call
    it before ``ray.init``. A variable the user set is left as it is."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not is_terminal():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if _local(address):
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    import ray  # noqa: F401 - its logging handlers exist once it is imported

    _token_auth(address)

    if not is_terminal():
        for handler in logging.getLogger("ray").handlers:
            if not any(isinstance(f, StripAnsi) for f in handler.filters):
                handler.addFilter(StripAnsi())
    for name in TUNE_NOISE:
        logging.getLogger(name).setLevel(logging.WARNING)


def _token_auth(address: str | None) -> None:
    """Ray 2.60 turns token authentication on for a new local instance and warns that it
    did. The same choice, made here explicitly (``RAY_AUTH_MODE=token``, as Ray itself sets
    it), is made without the warning. Joining a cluster is left to Ray (it does not warn)."""
    if os.environ.get("RAY_AUTH_MODE") is not None or not _local(address):
        return
    from ray._private.authentication import authentication_token_setup as setup

    setup._enable_token_auth()  # sets RAY_AUTH_MODE=token and refreshes Ray's config
