"""MLflow-native records of real runs: the experiment kind, params and tags, the dataset input,
the model as an MLflow Model (loaded back with ``mlflow.pytorch.load_model``), the Model
Registry, the sparse export beside it, artifacts beside the sqlite store, and where a Ray job
may write.

One real 2-worker training (Ray Train, FFCV, a real sqlite store) is shared by the tests that
read its records; it is started from a directory that is deleted before they read it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from distrib_rda import tracking
from distrib_rda.cli import main
from distrib_rda.config import TrainConfig
from distrib_rda.export import export_sparse, load_sparse, load_sparse_model, read_export
from distrib_rda.models import build_model
from distrib_rda.training import checkpoint, run_training

REPO = Path(__file__).resolve().parents[1]
PLACEMENT = ("address", "storage", "cache_dir", "tracking_uri", "loader_workers",
             "checkpoint_every", "max_failures", "name", "experiment", "register")


def final_checkpoint(results: Path, name: str) -> Path:
    return sorted((results / name).rglob(checkpoint.CHECKPOINT_FILE))[-1].parent


def checkpoint_model(state: dict) -> nn.Module:
    model = build_model(state["config"]["model"], **state["model_args"])
    model.load_state_dict(state["model"])
    return model.eval()


@pytest.fixture(scope="module")
def trained(ray_local, beton_cache, tmp_path_factory):
    """A real run, trained from directory ``b`` into an experiment that a command run from
    directory ``a`` created; ``a`` is deleted before any test reads the run."""
    root = tmp_path_factory.mktemp("records")
    store, a, b = root / "store", root / "a", root / "b"
    for directory in (store, a, b):
        directory.mkdir()
    uri = f"sqlite:///{store}/mlflow.db"
    here = Path.cwd()
    try:
        os.chdir(a)
        tracking.start_run(TrainConfig.build(experiment="records", tracking_uri=uri),
                           run_key="created-from-a", run_name="creator")
        os.chdir(b)
        summary = run_training(TrainConfig.build(
            subset=4096, batch_size=64, epochs=2, workers=2, loader_workers=1,
            cache_dir=beton_cache, storage=root / "results", tracking_uri=uri,
            experiment="records", name="rec", register="lenet5-sparse"))
    finally:
        os.chdir(here)
    written_in_a_and_b = sorted(p.name for p in [*a.iterdir(), *b.iterdir()])
    shutil.rmtree(a)
    return SimpleNamespace(root=root, store=store, uri=uri, summary=summary,
                           run_id=summary["run_id"], written=written_in_a_and_b,
                           checkpoint=final_checkpoint(root / "results", "rec"))


def test_artifacts_live_beside_the_store_not_where_commands_ran(trained, tmp_path):
    assert trained.written == [], "nothing (no mlruns/) is written where the commands ran"
    client = MlflowClient(trained.uri)
    run = client.get_run(trained.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    beside = (trained.store / "mlflow-artifacts").as_uri()
    assert experiment.artifact_location.startswith(beside)
    assert run.info.artifact_uri.startswith(beside)

    # the directory the experiment was created from is gone: the run still exports
    report = export_sparse(trained.run_id, tmp_path / "out.pt", tracking_uri=trained.uri)
    assert report["weight_nonzeros"] == trained.summary["nonzeros"]
    state = checkpoint.load(trained.checkpoint)
    dense, config = load_sparse(tmp_path / "out.pt")
    assert dense.keys() == state["model"].keys()
    assert all(torch.equal(dense[key], value) for key, value in state["model"].items())
    assert config["model"] == "lenet5" and config["gamma"] == state["config"]["gamma"]


def test_logged_model_loads_and_predicts_as_the_checkpoint(trained):
    mlflow.set_tracking_uri(trained.uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{trained.run_id}/model")
    state = checkpoint.load(trained.checkpoint)
    model = checkpoint_model(state)
    images = torch.cat([state["example"], torch.randn(5, 1, 28, 28)])  # any batch size
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))

    info = mlflow.models.get_model_info(f"runs:/{trained.run_id}/model")
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 28, 28]
    prep = info.metadata["preprocessing"]
    assert prep["input_shape"] == [1, 28, 28] and prep["classes"][0] == "T-shirt/top"
    assert prep["mean"] == state["preprocessing"]["mean"] and 0 < prep["std"][0] < 255
    client = MlflowClient(trained.uri)
    experiment = client.get_run(trained.run_id).info.experiment_id
    (logged,) = client.search_logged_models(
        [experiment], filter_string=f"source_run_id = '{trained.run_id}'")
    assert logged.artifact_location.startswith((trained.store / "mlflow-artifacts").as_uri())


def test_run_holds_params_tags_dataset_and_kind(trained):
    client = MlflowClient(trained.uri)
    run = client.get_run(trained.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    params, tags = run.data.params, run.data.tags
    assert not set(PLACEMENT) & set(params), sorted(params)
    assert params["model"] == "lenet5" and params["gamma"] == "0.15" and params["workers"] == "2"
    assert tags["distrib_rda.storage"] == str(trained.root / "results")
    assert tags["distrib_rda.loader_workers"] == "1"
    assert tags["distrib_rda.model_format"] == "pt2"

    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"fashion-mnist/train", "fashion-mnist/test"}
    train = inputs["fashion-mnist/train"]
    assert [(t.key, t.value) for t in train.tags] == [("mlflow.data.context", "training")]
    assert '"/usr/share/datasets/fashion-mnist"' in train.dataset.source
    assert re.fullmatch(r"[0-9a-f]{16}", train.dataset.digest)
    assert train.dataset.digest != inputs["fashion-mnist/test"].dataset.digest

    assert {a.path for a in client.list_artifacts(trained.run_id, "sparse")} == {
        "sparse/model-sparse.pt", "sparse/export.json"}
    metrics = run.data.metrics
    assert metrics["sparse_file_bytes"] < metrics["dense_file_bytes"]
    assert metrics["compression_ratio"] == pytest.approx(
        metrics["dense_file_bytes"] / metrics["sparse_file_bytes"])


def test_register_adds_one_version_with_its_numbers(trained):
    """--register adds a version; the lifecycle's last step run again on the finished run, as a
    rerun of the command does, adds no second version and no second logged model."""
    import ray.train

    assert trained.summary["registered"] == "lenet5-sparse/1"
    cfg = TrainConfig.build(experiment="records", tracking_uri=trained.uri, workers=2)
    run = tracking.TrackedRun(cfg, trained.run_id)
    final = ray.train.Checkpoint.from_directory(str(trained.checkpoint))
    summary, _ = run.finish(final, started=time.time(), register="lenet5-sparse")
    assert summary["registered"] == "lenet5-sparse/1"
    client = MlflowClient(trained.uri)
    (version,) = client.search_model_versions("name = 'lenet5-sparse'")
    assert version.run_id == trained.run_id
    assert version.tags["nonzeros"] == str(trained.summary["nonzeros"])
    assert float(version.tags["sparsity"]) == pytest.approx(trained.summary["sparsity"])
    assert float(version.tags["accuracy"]) == pytest.approx(trained.summary["accuracy"])
    experiment = client.get_run(trained.run_id).info.experiment_id
    models = client.search_logged_models([experiment],
                                         filter_string=f"source_run_id = '{trained.run_id}'")
    assert len(models) == 1
    assert client.get_run(trained.run_id).info.status == "FINISHED"

    mlflow.set_tracking_uri(trained.uri)
    registered = mlflow.pytorch.load_model("models:/lenet5-sparse/1")
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(registered(images),
                           checkpoint_model(checkpoint.load(trained.checkpoint))(images))


def readme_snippet() -> str:
    """The README's Python block that predicts a raw image from an export, as printed."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (snippet,) = [block for block in blocks if "load_sparse_model" in block]
    return snippet


def test_readme_snippet_predicts_a_raw_image_as_training_did(trained, tmp_path, beton_cache):
    from distrib_rda.data import build_loaders, ensure_converted, resolve_source

    export_sparse(trained.run_id, tmp_path / "model-sparse.pt", tracking_uri=trained.uri)
    data = read_export(tmp_path / "model-sparse.pt")
    assert not any("/" in str(value) for value in data["config"].values()), data["config"]
    arrays = resolve_source("fashion-mnist").load()
    beton_dir = ensure_converted("fashion-mnist", cache_dir=beton_cache)
    loaders = build_loaders(beton_dir, batch_size=16, seed=0, num_workers=1)
    normalized = next(iter(loaders.test))[0]  # the first 16 test images, as training saw them
    model = load_sparse_model(tmp_path / "model-sparse.pt")
    with torch.no_grad():
        expected = model(normalized).argmax(1)
    classes = data["preprocessing"]["classes"]
    for index in range(4):
        Image.fromarray(arrays.test_images[index, :, :, 0]).save(tmp_path / "image.png")
        printed = subprocess.run([sys.executable, "-c", readme_snippet()], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
        assert printed.returncode == 0, printed.stderr[-3000:]
        assert printed.stdout.strip() == classes[int(expected[index])]


# --- without Ray: the store, the model format, and where a Ray job may write ----------------


def test_experiment_kind_is_set_on_new_and_old_experiments(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    old = client.create_experiment("old", artifact_location=(tmp_path / "old").as_uri())
    tracking.start_run(TrainConfig.build(experiment="old", tracking_uri=uri), run_key="x")
    tracking.start_run(TrainConfig.build(experiment="new", tracking_uri=uri), run_key="y")
    for name in ("old", "new"):
        tags = client.get_experiment_by_name(name).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development", name
    assert client.get_experiment(old).artifact_location == (tmp_path / "old").as_uri()
    assert client.get_experiment_by_name("new").artifact_location == (
        tmp_path / "mlflow-artifacts" / "new").as_uri()


class Residual(nn.Module):
    """A model of a user's own: BatchNorm, a skip connection, a reshape by the batch size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))) + x
        return self.fc(y.reshape(x.shape[0], -1))


class DataDependent(Residual):
    """Control flow on a tensor's value: torch.export cannot trace it."""

    def forward(self, x):
        if x.mean() > 0:
            x = -x
        return super().forward(x)


@pytest.mark.parametrize("module_class, fmt", [(Residual, "pt2"), (DataDependent, "pickle")])
def test_a_users_own_module_logs_as_an_mlflow_model(tmp_path, monkeypatch, capsys,
                                                    module_class, fmt):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(TrainConfig.build(experiment="own", tracking_uri=uri),
                                run_key="own")
    torch.manual_seed(0)
    module = module_class()
    module.train()(torch.randn(8, 1, 28, 28))  # BatchNorm statistics of its own
    module.eval()
    tracking.log_pytorch_model(uri, run_id, module, torch.randn(1, 1, 28, 28),
                               preprocessing={"classes": list("abcdefghij")})
    assert MlflowClient(uri).get_run(run_id).data.tags["distrib_rda.model_format"] == fmt
    if fmt == "pickle":
        assert "torch.export cannot trace the model" in capsys.readouterr().err
        monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    for batch in (1, 3, 16):
        images = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(loaded(images), module(images)), batch


def test_params_are_what_defines_the_run():
    params = tracking.run_params(TrainConfig.build(storage="/somewhere", workers=3))
    assert not set(PLACEMENT) & set(params)
    assert params["workers"] == "3" and params["model"] == "lenet5"


@pytest.mark.parametrize("command", [["train"], ["tune", "SPACE"]])
def test_a_ray_job_without_lasting_locations_is_refused(tmp_path, monkeypatch, capsys, command):
    """As the driver of `ray job submit --working-dir .`: the working directory is Ray's
    temporary copy, so the default sqlite:///mlflow.db and results/ would be lost."""
    space = tmp_path / "space.yaml"
    space.write_text("config: {epochs: 1}\nspace:\n  gamma: {uniform: [0.1, 1.0]}\n")
    command = [str(space) if part == "SPACE" else part for part in command]
    job_dir = tmp_path / "working_dir_files"
    job_dir.mkdir()
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DISTRIB_RDA_STORAGE", raising=False)
    assert main(command) == 2
    error = capsys.readouterr().err
    assert "--tracking-uri" in error and "--storage" in error and "Traceback" not in error
    assert len(error.strip().splitlines()) == 1
    assert main([*command, "--storage", "results"]) == 2  # relative: inside the copy too
    assert "--storage results" in capsys.readouterr().err
    assert not any(job_dir.iterdir())


def test_a_ray_job_takes_its_locations_from_the_cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("DISTRIB_RDA_STORAGE", "/mnt/shared/results")
    cfg = tracking.resolve_locations(TrainConfig.build())
    assert cfg.tracking_uri == "http://mlflow.example:5000"
    assert cfg.storage == Path("/mnt/shared/results")
    explicit = tracking.resolve_locations(TrainConfig.build(
        tracking_uri=f"sqlite:///{tmp_path.parent}/x.db", storage=tmp_path.parent / "r"))
    assert explicit.tracking_uri == f"sqlite:///{tmp_path.parent}/x.db"
    assert not any(tmp_path.iterdir())


def test_outside_a_ray_job_relative_defaults_stay_where_the_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DISTRIB_RDA_STORAGE", raising=False)
    cfg = tracking.resolve_locations(TrainConfig.build())
    assert cfg.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert cfg.storage == tmp_path.resolve() / "results"


def test_an_export_holds_its_preprocessing_and_no_local_path(tmp_path):
    model = build_model("lenet5", in_channels=1, image_size=28, num_classes=10)
    prep = {"input_shape": [1, 28, 28], "mean": [72.9], "std": [90.0], "classes": ["a"] * 10}
    torch.save({"model": model.state_dict(), "model_args": {"in_channels": 1, "image_size": 28,
                                                             "num_classes": 10},
                "preprocessing": prep,
                "config": {**TrainConfig.build(storage=tmp_path / "r", data_root=tmp_path,
                                               cache_dir=tmp_path / "c").model_dump(mode="json"),
                           "dataset": f"imagefolder:{tmp_path}/flowers"}},
               tmp_path / "checkpoint.pt")
    export_sparse(tmp_path / "checkpoint.pt", tmp_path / "out.pt")
    data = read_export(tmp_path / "out.pt")
    assert data["preprocessing"] == prep
    assert str(tmp_path) not in repr(data["config"])
    assert data["config"]["dataset"] == "imagefolder:flowers"
    # an export is itself a source: exported again, the same tensors
    export_sparse(tmp_path / "out.pt", tmp_path / "again.pt")
    assert all(torch.equal(a, b) for a, b in zip(load_sparse(tmp_path / "out.pt")[0].values(),
                                                 load_sparse(tmp_path / "again.pt")[0].values(),
                                                 strict=True))
    assert load_sparse_model(tmp_path / "again.pt").training is False
    assert np.isclose(read_export(tmp_path / "again.pt")["preprocessing"]["std"][0], 90.0)


def test_failure_cause_reads_rays_structured_errors():
    """Ray Train V2 gives each failed rank's own exception; the lowest rank's is named."""
    from ray.train import ControllerError, WorkerGroupError

    from distrib_rda.training.loop import NonFiniteError

    error = WorkerGroupError("rank 1 failed\nTraceback ...", {
        1: NonFiniteError("non-finite loss at step 3: parameter fc1.weight"),
        0: NonFiniteError("non-finite loss at step 3: gradient of conv1.weight\nmore")})
    assert tracking.failure_cause(error) == (
        "rank 0: NonFiniteError: non-finite loss at step 3: gradient of conv1.weight")
    assert tracking.failure_cause(ControllerError(RuntimeError("placement group gone"))) == (
        "the Train controller: RuntimeError: placement group gone")
