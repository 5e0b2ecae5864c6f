"""End-to-end training on real Ray Train, real FFCV files of Fashion-MNIST and real MLflow."""

from __future__ import annotations

import json

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient

from distrib_rda.cli import main
from distrib_rda.config import TrainConfig
from distrib_rda.export import load_sparse
from distrib_rda.models import build_model
from distrib_rda.training import checkpoint, run_training


def train_args(tmp_path, beton_cache, tracking_uri, *extra: str) -> list[str]:
    return [
        "train", "--subset", "4096", "--batch-size", "64", "--epochs", "2",
        "--cache-dir", str(beton_cache), "--storage", str(tmp_path / "results"),
        "--tracking-uri", tracking_uri, "--experiment", "test", "--loader-workers", "1",
        *extra,
    ]


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_two_workers_end_to_end(ray_local, tmp_path, beton_cache, tracking_uri, capsys):
    """The defaults on two workers: one RDA epoch whose threshold ramps to 95% (lambda found,
    not given), then one epoch of fixed-mask fine-tune. Both epochs end at exactly
    round(0.95 N) zeros, and MLflow holds the lambda RDA found and the accuracy before the
    fine-tune."""
    assert main(train_args(tmp_path, beton_cache, tracking_uri,
                           "--workers", "2", "--name", "e2e", "--json")) == 0
    result = last_json_line(capsys.readouterr().out)
    assert set(result) == {"run_id", "accuracy", "sparsity", "nonzeros", "epochs", "seconds"}
    assert result["epochs"] == 2
    assert 0.4 < result["accuracy"] <= 1.0  # 10 classes: chance is 0.1

    client = MlflowClient(tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    # RDA to the default target: the sparsity is named, the l1 strength found
    assert run.data.params["target_sparsity"] == "0.95" and run.data.params["workers"] == "2"
    assert "lambda_" not in run.data.params
    n = 61_470  # lenet5's conv and linear weights on 28x28x1
    assert result["nonzeros"] == n - round(0.95 * n)
    by_epoch = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "sparsity")}
    exact = pytest.approx(round(0.95 * n) / n)
    assert by_epoch == {1: exact, 2: exact}
    found = client.get_metric_history(run.info.run_id, "lambda")
    assert [m.step for m in found] == [1] and found[0].value > 0
    assert run.data.metrics["sparsity_before_finetune"] == pytest.approx(by_epoch[1])
    assert {run.data.tags[key] for key in ("dataset", "model", "optimizer")} == {
        "fashion-mnist", "lenet5", "rda"}
    for key in ("train_loss", "accuracy", "sparsity", "nonzeros", "epoch_seconds",
                "samples_per_second", "sparsity/conv1"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert run.data.metrics["accuracy"] == pytest.approx(result["accuracy"])

    sparse_file = client.download_artifacts(run.info.run_id, "sparse/model-sparse.pt",
                                            str(tmp_path))
    saved, _ = load_sparse(sparse_file)
    weights = [v for k, v in saved.items() if k.endswith("weight") and v.dim() > 1]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(result["sparsity"])
    assert "conv1" in json.loads(open(client.download_artifacts(
        run.info.run_id, "layer_sparsity.json", str(tmp_path))).read())


def test_a_finished_run_holds_its_state_resumes_as_itself_and_refuses_a_new_config(
        ray_local, tmp_path, beton_cache, tracking_uri, capsys):
    """One finished run, three promises: its final checkpoint holds the whole state (the
    AdaGrad form, so every optimizer buffer); the same command again reuses it without
    training again; the same --name with another config is refused, nothing changed."""
    args = train_args(tmp_path, beton_cache, tracking_uri, "--workers", "1", "--epochs", "1",
                      "--name", "state", "--adaptive", "--lambda", "1e-4", "--json")
    assert main(args) == 0
    first = last_json_line(capsys.readouterr().out)

    files = sorted((tmp_path / "results" / "state").rglob(checkpoint.CHECKPOINT_FILE))
    state = checkpoint.load(files[-1])
    assert state["epoch"] == 1 and state["config"]["adaptive"] is True
    optimizer_state = state["optimizer"]["optimizer"]["state"]
    assert {"center", "dual_sum", "sq_sum", "step"} <= set(optimizer_state[0])
    assert set(state["rng"]) == {"torch", "numpy", "python"}
    assert len(state["history"]) == 1

    assert main(args) == 0
    second = last_json_line(capsys.readouterr().out)
    assert second["run_id"] == first["run_id"]
    assert second["accuracy"] == first["accuracy"]
    history = MlflowClient(tracking_uri).get_metric_history(first["run_id"], "accuracy")
    assert [m.step for m in history] == [1]

    results = tmp_path / "results"
    before = sorted(p.relative_to(results) for p in results.rglob("*"))
    assert main([*args, "--gamma", "0.5"]) == 2
    error = capsys.readouterr().err
    assert "--name state" in error and "gamma" in error
    assert sorted(p.relative_to(results) for p in results.rglob("*")) == before


@pytest.mark.parametrize("args, culprit", [
    (["--lambda", "-1"], "--lambda"),
    (["--gamma", "0"], "--gamma"),
    (["--lambda", "nan"], "--lambda"),
    (["--workers", "0"], "--workers"),
    (["--sync-every", "4", "--optimizer", "sgd"], "sync_every"),
    (["--restart", "5,3"], "--restart"),
    (["--dataset", "svhn"], "--dataset"),
])
def test_bad_config_is_refused_before_any_work(tmp_path, args, culprit, capsys):
    assert main(["train", "--storage", str(tmp_path / "results"), *args]) == 2
    error = capsys.readouterr().err
    assert culprit in error and "Traceback" not in error
    assert not (tmp_path / "results").exists()


def test_unknown_key_in_config_file_is_refused(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: lenet5\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "learning_rate: unknown key" in error


def test_unknown_model_is_refused_before_any_work(tmp_path, capsys):
    assert main(["train", "--model", "alexnet", "--storage", str(tmp_path / "results")]) == 2
    error = capsys.readouterr().err
    assert "model (--model): not a model spec" in error and "lenet5-caffe" in error
    assert not (tmp_path / "results").exists()


def test_ray_train_report_logging_is_quieted():
    """Ray Train logs each report, whole metrics dict included, at INFO from a logger named by
    its file; the worker loop turns it down to WARNING (if Ray renames it, this test says so)."""
    import logging

    import ray.train.v2._internal.execution.context as report_module

    from distrib_rda.training.loop import quiet_report_logging

    report_logger = logging.getLogger(report_module.__file__)
    report_logger.setLevel(logging.INFO)
    quiet_report_logging()
    assert not report_logger.isEnabledFor(logging.INFO)
    assert report_logger.isEnabledFor(logging.WARNING)


def test_reported_accuracy_is_the_saved_models_with_batchnorm(ray_local, tmp_path, beton_cache,
                                                              tracking_uri):
    """Two workers, ResNet-20 (BatchNorm): every rank evaluates with rank 0's buffers, so the
    accuracy reported for the last epoch is that of the checkpoint, evaluated alone in one
    process over the whole test set. The logged MLflow Model predicts what it predicts."""
    from distrib_rda.data import build_loaders, ensure_converted
    from distrib_rda.training.loop import evaluate

    summary = run_training(TrainConfig.build(
        model="resnet20", subset=512, batch_size=64, epochs=1, workers=2, loader_workers=1,
        cache_dir=beton_cache, storage=tmp_path / "results", tracking_uri=tracking_uri,
        experiment="batchnorm", name="bn"))
    state = checkpoint.load(summary["checkpoint"])
    model = build_model("resnet20", **state["model_args"])
    model.load_state_dict(state["model"])
    loaders = build_loaders(ensure_converted("fashion-mnist", cache_dir=beton_cache),
                            batch_size=200, seed=0, num_workers=1)
    accuracy, _ = evaluate(model, loaders.test, torch.device("cpu"))
    assert accuracy == summary["accuracy"]

    mlflow.set_tracking_uri(tracking_uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{summary['run_id']}/model")
    images = torch.cat([state["example"], torch.randn(3, 1, 28, 28)])
    with torch.no_grad():
        assert torch.equal(loaded(images), model.eval()(images))
