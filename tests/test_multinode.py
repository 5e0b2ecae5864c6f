"""Training on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``) on this machine:
workers placed on different nodes, and a node lost mid-run and replaced."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from distrib_rda.config import TrainConfig
from distrib_rda.training import checkpoint, run_training
from distrib_rda.training.driver import WORKER_ENV


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPUs, so every worker lands on a worker node of 1 CPU."""
    temp_dir = tempfile.mkdtemp(prefix="rdac-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "temp_dir": temp_dir})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": WORKER_ENV})
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def config(tmp_path, beton_cache, tracking_uri, **changes) -> TrainConfig:
    return TrainConfig.build(**{
        "subset": 4096, "batch_size": 128, "epochs": 3, "workers": 2, "loader_workers": 1,
        "cache_dir": beton_cache, "storage": tmp_path / "results", "tracking_uri": tracking_uri,
        "experiment": "multinode", **changes})


def worker_nodes() -> dict[int, str]:
    """pid -> node id of the live Ray Train workers."""
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return {actor.pid: actor.node_id for actor in actors}


def final_state(summary) -> dict:
    return checkpoint.load(summary["checkpoint"])


def test_workers_spread_over_nodes_and_a_lost_node_is_replaced_with_nothing_lost(
        cluster, tmp_path, beton_cache, tracking_uri):
    """A reference run whose two workers land on the two worker nodes, with every epoch in
    MLflow; then the same run again, losing a node after its first checkpoint: a new node
    replaces it, and the run ends with the reference's weights and every epoch once."""
    seen: dict[int, str] = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.update(worker_nodes())
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        reference = run_training(config(tmp_path, beton_cache, tracking_uri, name="reference"))
    finally:
        done.set()
        watcher.join()
    assert set(seen.values()) == {node.node_id for node in cluster[1]}
    client = MlflowClient(tracking_uri)
    for key in ("accuracy", "sparsity", "nonzeros", "train_loss"):
        assert [m.step for m in client.get_metric_history(reference["run_id"], key)] == [1, 2, 3]
    assert client.get_run(reference["run_id"]).info.status == "FINISHED"

    outcome: dict = {}
    faulty = config(tmp_path, beton_cache, tracking_uri, name="faulty", max_failures=2)
    runner = threading.Thread(target=lambda: outcome.update(run_training(faulty)))
    runner.start()
    first_checkpoint = tmp_path / "results" / "faulty"
    deadline = time.time() + 240
    while not list(first_checkpoint.rglob(checkpoint.CHECKPOINT_FILE)):
        assert time.time() < deadline and runner.is_alive(), "no first checkpoint"
        time.sleep(0.2)
    victim_node_id = next(iter(worker_nodes().values()))
    cluster_, nodes = cluster
    victim = next(node for node in nodes if node.node_id == victim_node_id)
    cluster_.remove_node(victim)  # from the main thread, as Cluster requires
    nodes.remove(victim)
    nodes.append(cluster_.add_node(num_cpus=1))
    runner.join(timeout=300)
    assert not runner.is_alive() and outcome, "the run did not finish after losing a node"

    for name, value in final_state(reference)["model"].items():
        torch.testing.assert_close(final_state(outcome)["model"][name], value,
                                   rtol=1e-5, atol=1e-6, msg=name)
    history = client.get_metric_history(outcome["run_id"], "accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]
