"""cluster/: launcher configs and KubeRay manifests that Ray and KubeRay accept, and a real
multi-node Ray cluster on this machine (cluster/local.sh) that runs `distrib-rda train` jobs.

The end-to-end test starts a head and two worker nodes with token authentication and an MLflow
server, submits a short training run with `ray job submit` without --tracking-uri or --storage,
and checks that the run's two Train workers ran on the two worker nodes, that MLflow holds the
run, that `local.sh stop` leaves no process behind, and that the run, its model and its
checkpoint are still there once the cluster is gone. Every Ray call goes through a subprocess
with the cluster's token, so this test process never joins the cluster nor changes its own Ray
settings.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import mlflow.pytorch
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray.autoscaler._private.util import prepare_config, validate_config

from distrib_rda.cli import build_parser
from distrib_rda.models import build_model
from distrib_rda.training import checkpoint

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LOCAL_SH = CLUSTER / "local.sh"
BIN = Path(sys.executable).parent  # the virtualenv's ray and distrib-rda
RAY_VERSION = ray.__version__
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]


# --- cluster launcher configs -------------------------------------------------------------


def prepared(name: str) -> dict:
    """The config as `ray up` sees it before contacting the cloud: defaults merged, validated."""
    config = yaml.safe_load((CLUSTER / name).read_text())
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_validation(name):
    config = prepared(name)
    assert config["cluster_name"] == "distrib-rda"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "training work must go to the GPU workers"
    workers = [node_type for name, node_type in config["available_node_types"].items()
               if name != config["head_node_type"]]
    assert workers and all(t["max_workers"] >= 1 for t in workers)
    for node_type in workers:  # spot / preemptible workers
        node = node_type["node_config"]
        spot = node.get("InstanceMarketOptions", {}).get("MarketType") == "spot" or (
            node.get("scheduling", {}).get("provisioningModel") == "SPOT")
        assert spot, node
    images = [config["docker"]["image"], config["docker"]["head_image"]]
    assert all(image.startswith(f"rayproject/ray:{RAY_VERSION}-py311-") for image in images)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_keeps_ray_private_and_authenticated(name):
    config = prepared(name)
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    for commands in (head_start, worker_start):
        assert "export RAY_AUTH_MODE=token" in commands
        assert "MLFLOW_TRACKING_PASSWORD" in commands
        # every job's default store and storage: the head's MLflow and the shared file system
        assert "MLFLOW_TRACKING_URI=http://ray-head:5000" in commands
        assert "DISTRIB_RDA_STORAGE=/mnt/shared/" in commands
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "cluster/head-mlflow.sh" in head_start
    # The project and its Debian packages are installed on every node.
    assert any("scripts/setup.sh" in command for command in config["setup_commands"])
    assert any("mlflow[auth]" in command for command in config["head_setup_commands"])
    text = (CLUSTER / name).read_text().lower()
    for secret in ("aws_secret_access_key", "aws_access_key_id", "private_key", "password:"):
        assert secret not in text


def test_launcher_validation_rejects_a_misspelled_key():
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["available_node_types"]["head"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


# --- KubeRay manifests --------------------------------------------------------------------


def manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if doc]


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token", "secretName": "distrib-rda-ray-token"}
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0"
    if spec.get("enableInTreeAutoscaling"):  # the autoscaler sidecar talks to the K8s API
        assert head["template"]["spec"].get("automountServiceAccountToken", True)
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams"} <= group.keys()
        (worker,) = group["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1
    for container in containers(spec):
        tag = container["image"].rsplit(":", 1)[1]
        assert re.fullmatch(rf"ray{re.escape(RAY_VERSION)}-py311-(cpu|gpu)", tag), tag
        env = {item["name"]: item for item in container["env"]}
        password = env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert password == {"name": "distrib-rda-ray-token", "key": "auth_token"}
        assert env["MLFLOW_TRACKING_URI"]["value"] == "http://distrib-rda-mlflow:5000"
        assert env["DISTRIB_RDA_STORAGE"]["value"].startswith("/mnt/shared/")
        mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
        assert "/mnt/shared" in mounts, "Ray Train needs storage that every node sees"


def test_kuberay_raycluster_manifest():
    (cluster,) = manifests("raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    check_ray_cluster_spec(cluster["spec"])


def test_kuberay_rayjob_runs_the_search():
    (job,) = manifests("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"])
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:2] == ["distrib-rda", "tune"]
    space = Path(command[2])
    assert space.name == "cifar10_resnet18.yaml" and (REPO / "tune" / space.name).is_file()
    # The job supervisor sets RAY_ADDRESS for the driver; the flags are the CLI's own.
    assert "--address" not in command
    args = build_parser().parse_args(command[1:])
    assert args.tracking_uri == "http://distrib-rda-mlflow:5000"


def test_kuberay_manifests_expose_nothing_and_commit_no_secret():
    docs = [doc for name in ("raycluster.yaml", "rayjob.yaml", "mlflow.yaml")
            for doc in manifests(name)]
    kinds = {doc["kind"] for doc in docs}
    assert "Ingress" not in kinds and "Secret" not in kinds
    for doc in docs:
        if doc["kind"] == "Service":
            assert doc["spec"]["type"] == "ClusterIP"
        if doc["kind"] in ("RayCluster", "RayJob"):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    (mlflow,) = [doc for doc in docs if doc["kind"] == "Deployment"]
    server = mlflow["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name=basic-auth" in server["args"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"rayproject/ray:{RAY_VERSION}-py311-gpu" in dockerfile


# --- a local multi-node cluster -----------------------------------------------------------


def run(args: list, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def ray_json(args: list, env: dict) -> list[dict]:
    result = run([BIN / "ray", *args, "--format", "json"], env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def processes_of(state: Path, ray_tmp: Path) -> list[str]:
    """Live processes that carry the cluster's marker or name its Ray temp dir."""
    marker = f"DISTRIB_RDA_LOCAL_CLUSTER={state}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in environ or str(ray_tmp) in cmdline:
            found.append(f"{proc.name}: {cmdline[:150]}")
    return found


@pytest.fixture
def local_cluster():
    """A state dir for cluster/local.sh; whatever happens, nothing of the cluster outlives it."""
    state = Path(tempfile.mkdtemp(prefix="rda-cluster-", dir="/tmp"))
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RAY_", "MLFLOW_TRACKING_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(state / "auth_token"), PYTHONUNBUFFERED="1")
    yield state, env
    ray_tmp = (state / "ray").resolve()
    run([LOCAL_SH, "stop", "--state-dir", state], env, timeout=120)
    for line in processes_of(state, ray_tmp):  # a safety net; the test asserts none is left
        os.kill(int(line.split(":")[0]), 9)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)


@pytest.mark.timeout(900)
def test_local_cluster_runs_a_training_job_across_nodes(local_cluster, beton_cache, tmp_path):
    state, env = local_cluster
    started = time.monotonic()
    start = run([LOCAL_SH, "start", "--workers", 2, "--state-dir", state], env, timeout=300)
    assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
    seconds = {"start": time.monotonic() - started}
    addresses = dict(line.split("=", 1) for line in (state / "addresses").read_text().split())
    dashboard, mlflow_uri = addresses["dashboard"], addresses["mlflow"]
    ray_tmp = (state / "ray").resolve()
    assert dashboard.startswith("http://127.0.0.1:") and mlflow_uri.startswith("http://127.0.0.1:")
    assert (state / "auth_token").stat().st_mode & 0o077 == 0, "the token is readable by others"

    # Token authentication is on: a client without the token is turned away.
    anonymous = {**env, "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none"),
                 "HOME": str(tmp_path)}
    refused = run([BIN / "ray", "job", "list", "--address", dashboard], anonymous, timeout=120)
    assert refused.returncode != 0 and "Unauthorized" in refused.stdout + refused.stderr

    # No --tracking-uri, no --storage: the job runs in Ray's temporary copy of this directory,
    # and takes the cluster's MLflow server and storage from its environment.
    submission = "cluster-e2e"
    job = run([BIN / "ray", "job", "submit", "--address", dashboard, "--submission-id", submission,
               "--working-dir", ".", "--",
               "distrib-rda", "train", "--workers", 2, "--epochs", 1, "--subset", 1024,
               "--batch-size", 128, "--loader-workers", 1, "--json",
               "--experiment", "cluster-e2e", "--name", "e2e", "--cache-dir", beton_cache],
              env, timeout=600)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-5000:]
    seconds["job"] = time.monotonic() - started - sum(seconds.values())
    summary = json.loads([line for line in job.stdout.splitlines()
                          if line.startswith("{") and '"run_id"' in line][-1])
    assert summary["epochs"] == 1 and 0.0 <= summary["sparsity"] <= 1.0 and summary["nonzeros"] > 0
    assert f"checkpoint {state / 'results' / 'e2e'}" in job.stdout
    assert f"at {mlflow_uri}" in job.stdout and "working_dir_files" not in job.stdout

    # The two Train workers of this job ran on the two worker nodes, not on the head.
    (this_job,) = [j for j in ray_json(["list", "jobs", "--address", dashboard], env)
                   if j["submission_id"] == submission]
    assert this_job["status"] == "SUCCEEDED"
    actors = ray_json(["list", "actors", "--address", dashboard, "--detail", "--limit", 1000,
                       "--filter", "class_name=RayTrainWorker"], env)
    workers = [actor for actor in actors if actor["job_id"] == this_job["job_id"]]
    nodes = {node["node_id"]: node
             for node in ray_json(["list", "nodes", "--address", dashboard], env)}
    assert len(nodes) == 3 and sum(node["is_head_node"] for node in nodes.values()) == 1
    worker_nodes = {actor["node_id"] for actor in workers}
    assert len(workers) == 2 and len(worker_nodes) == 2, workers
    assert not any(nodes[node_id]["is_head_node"] for node_id in worker_nodes)

    # MLflow, through the server on the head, holds the finished run and its epoch metrics.
    client = MlflowClient(tracking_uri=mlflow_uri)
    mlflow_run = client.get_run(summary["run_id"])
    assert mlflow_run.info.status == "FINISHED"
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "cluster-e2e"
    assert mlflow_run.data.params["workers"] == "2"
    history = client.get_metric_history(summary["run_id"], "sparsity")
    assert [metric.step for metric in history] == [1]
    assert history[0].value == pytest.approx(summary["sparsity"])

    # `stop` ends every process the cluster started, job drivers and Ray workers included.
    stopping = time.monotonic()
    stop = run([LOCAL_SH, "stop", "--state-dir", state], env, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert processes_of(state, ray_tmp) == []
    seconds["stop"] = time.monotonic() - stopping

    # Nothing is lost with the cluster: the server's store, the model it logged, and the
    # checkpoint are on disk in the state dir, read here without any server.
    client = MlflowClient(tracking_uri=f"sqlite:///{state}/mlflow.db")
    kept = client.get_run(summary["run_id"])
    assert kept.info.status == "FINISHED" and kept.info.run_name == "e2e"
    assert [m.step for m in client.get_metric_history(summary["run_id"], "accuracy")] == [1]
    (logged,) = client.search_logged_models([kept.info.experiment_id],
                                            filter_string=f"source_run_id = '{summary['run_id']}'")
    (model_dir,) = {path.parent for path in (state / "mlartifacts").rglob("MLmodel")
                    if logged.model_id in str(path)}
    assert list((state / "mlartifacts").rglob("model-sparse.pt"))
    (final,) = sorted((state / "results" / "e2e").rglob(checkpoint.CHECKPOINT_FILE))[-1:]
    saved = checkpoint.load(final)
    model = build_model("lenet5", **saved["model_args"])
    model.load_state_dict(saved["model"])
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(mlflow.pytorch.load_model(str(model_dir))(images),
                           model.eval()(images))
    print("local cluster, seconds:", {key: round(value) for key, value in seconds.items()},
          f"total {time.monotonic() - started:.0f}")
