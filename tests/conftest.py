"""Shared fixtures: a private local Ray instance, and one .beton cache for the whole session."""

from __future__ import annotations

import faulthandler
import shutil
import tempfile

import pytest
import ray
import torch

from distrib_rda.training.driver import WORKER_ENV


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """pytest's own faulthandler stops at this point; keep one on until the process exits, so
    that a crash while Ray, gRPC or torch tear down after the last test prints its stack."""
    faulthandler.enable()


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
