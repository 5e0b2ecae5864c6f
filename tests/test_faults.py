"""Faults injected into real runs: a worker killed by SIGKILL from outside, a tracking store that
cannot be reached, and numerical blow-ups."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from distrib_rda.cli import main
from distrib_rda.config import TrainConfig
from distrib_rda.optim.parts import OptimizerParts
from distrib_rda.training import checkpoint, run_training
from distrib_rda.training.driver import TrainingError
from distrib_rda.training.dual_sync import LocalDualAveraging
from distrib_rda.training.loop import NonFiniteError, train_step


def config(tmp_path, beton_cache, tracking_uri, **changes) -> TrainConfig:
    return TrainConfig.build(**{
        "subset": 8192, "batch_size": 128, "epochs": 3, "workers": 2, "loader_workers": 1,
        "cache_dir": beton_cache, "storage": tmp_path / "results", "tracking_uri": tracking_uri,
        "experiment": "faults", **changes})


def worker_pids() -> list[int]:
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [actor.pid for actor in actors]


def test_worker_killed_mid_epoch_resumes_the_same_trajectory(ray_local, tmp_path, beton_cache,
                                                             tracking_uri):
    reference = run_training(config(tmp_path, beton_cache, tracking_uri, name="reference"))

    killed: list[int] = []
    run_dir = tmp_path / "results" / "faulty"

    def kill_one_worker_in_epoch_two():
        while not list(run_dir.rglob(checkpoint.CHECKPOINT_FILE)):
            time.sleep(0.05)
        time.sleep(0.5)  # into epoch 2, which takes a few seconds
        pid = worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_one_worker_in_epoch_two, daemon=True)
    killer.start()
    faulty = run_training(config(tmp_path, beton_cache, tracking_uri, name="faulty",
                                 max_failures=2))
    killer.join(timeout=5)
    assert killed, "no worker was killed"

    got, want = checkpoint.load(faulty["checkpoint"]), checkpoint.load(reference["checkpoint"])
    for name, value in want["model"].items():
        torch.testing.assert_close(got["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    client = MlflowClient(tracking_uri)
    for key in ("accuracy", "sparsity", "train_loss", "epoch_seconds"):
        steps = [m.step for m in client.get_metric_history(faulty["run_id"], key)]
        assert sorted(steps) == [1, 2, 3], (key, steps)  # no gap, no duplicate


def test_unreachable_tracking_server_fails_before_training(tmp_path, capsys):
    assert main(["train", "--tracking-uri", "http://127.0.0.1:9", "--storage",
                 str(tmp_path / "results")]) == 2
    error = capsys.readouterr().err
    assert "--tracking-uri http://127.0.0.1:9" in error and "unreachable" in error
    assert not (tmp_path / "results").exists()


def test_nan_stops_the_run_naming_step_and_layer(ray_local, tmp_path, beton_cache,
                                                 tracking_uri):
    exploding = config(tmp_path, beton_cache, tracking_uri, name="blowup", epochs=1, workers=1,
                       optimizer="sgd", lr=1e12)
    with pytest.raises(TrainingError, match=r"non-finite loss at step \d+: (parameter|gradient)"):
        run_training(exploding)
    assert not list((tmp_path / "results" / "blowup").rglob(checkpoint.CHECKPOINT_FILE))
    run = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("faults").experiment_id])[0]
    assert run.info.status == "FAILED"


def test_a_nonfinite_step_never_updates_the_weights():
    model = torch.nn.Linear(3, 2)
    parts = OptimizerParts(torch.optim.SGD(model.parameters(), lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    images = torch.full((4, 3), float("inf"))
    with pytest.raises(NonFiniteError, match="step 7"):
        train_step(model, parts, LocalDualAveraging(parts.optimizer, every=1), images,
                   torch.zeros(4, dtype=torch.long), step=7)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_mlflow_server(store: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
         "--artifacts-destination", str(store / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
            time.sleep(0.5)


def stop_mlflow_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def test_tracking_server_lost_mid_run_loses_no_metric(ray_local, tmp_path, beton_cache):
    """The server dies after epoch 1 and comes back after epoch 3: the run goes on, and MLflow
    ends with every epoch exactly once (the controller retries what it could not log)."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    run_dir = tmp_path / "results" / "outage"
    checkpoints = lambda: len(list(run_dir.rglob(checkpoint.CHECKPOINT_FILE)))  # noqa: E731
    events: list[str] = []

    def outage():
        nonlocal server
        while checkpoints() < 1:
            time.sleep(0.05)
        stop_mlflow_server(server)
        events.append("down")
        while checkpoints() < 2:  # Ray keeps 2 checkpoints, so the count stops at 2
            time.sleep(0.05)
        server = start_mlflow_server(tmp_path, port)
        events.append("up")

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        summary = run_training(config(tmp_path, beton_cache, uri, name="outage", epochs=5,
                                      workers=1, subset=4096))
        thread.join(timeout=120)
        assert events == ["down", "up"]
        client = MlflowClient(uri)
        for key in ("accuracy", "sparsity", "epoch_seconds"):
            steps = [m.step for m in client.get_metric_history(summary["run_id"], key)]
            assert sorted(steps) == [1, 2, 3, 4, 5], (key, steps)
        assert client.get_run(summary["run_id"]).info.status == "FINISHED"
    finally:
        stop_mlflow_server(server)
