"""Shared fixtures: a private local Ray instance, and one .beton cache for the whole session."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest
import ray
import torch

from distrib_rda.training.driver import WORKER_ENV

EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """After a test session, leave with pytest's exit status once everything is reported,
    skipping the interpreter's and the native libraries' teardown.

    Twice in recent full runs every test passed and the process then died of SIGSEGV on its way
    out, with a faulthandler on to the end printing nothing, so outside Python code: the
    native teardown of what the tests load in this process (Ray's core worker and gRPC, gloo,
    numba's thread pools) racing with those libraries' threads. The fixtures have already shut
    Ray and the process groups down; nothing is left to clean.
    """
    if EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[EXIT_STATUS])


@pytest.fixture
def one_thread():
    """Small tensors: intra-op threads only add contention when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def beton_cache(tmp_path_factory):
    """Converted datasets, shared by every test that trains, so each converts once."""
    return tmp_path_factory.mktemp("beton-cache")


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray instance with 2 CPUs, in a private temp dir (short: socket paths)."""
    temp_dir = tempfile.mkdtemp(prefix="rda-", dir="/tmp")
    # The dashboard serves the state API that fault tests use to find worker processes.
    ray.init(num_cpus=2, include_dashboard=True, _temp_dir=temp_dir,
             runtime_env={"env_vars": WORKER_ENV})
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A real MLflow sqlite store of the test's own."""
    return f"sqlite:///{tmp_path}/mlflow.db"
