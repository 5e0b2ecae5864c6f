"""A user's own model, from the command line (``--model package.module:factory``) and from
Python (``distrib_rda.train(config, model=factory)``), on real Ray, FFCV and MLflow; a
torchvision model by name; and every bad spec refused before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from distrib_rda.models import ModelSpecError, build_model
from distrib_rda.optim import prunable_weights
from distrib_rda.training import checkpoint

USER_CODE = Path(__file__).parent / "user_code"
CLI = str(Path(sys.executable).with_name("distrib-rda"))


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's fresh shell: without what other tests set in this process
    (``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI, for one)."""
    inherited = {key: value for key, value in os.environ.items()
                 if key not in ("MLFLOW_TRACKING_URI", "DISTRIB_RDA_STORAGE", "RAY_ADDRESS")}
    return {**inherited, **extra}


@pytest.fixture
def user_code_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(USER_CODE))


def test_a_spec_builds_the_users_model_with_the_arguments_it_takes(user_code_on_path):
    model = build_model("my_models:small_cnn", in_channels=1, image_size=28, num_classes=7)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert [name for name, _ in prunable_weights(model)] == ["0", "3", "7"]


@pytest.mark.parametrize(("spec", "named"), [
    ("no_such_module:factory", "cannot import module 'no_such_module'"),
    ("my_models:nope", "module 'my_models' has no attribute 'nope'"),
    ("my_models:NOT_CALLABLE", "NOT_CALLABLE is a int, not a callable"),
    ("my_models:raises", "the factory raised RuntimeError: this factory is broken"),
    ("my_models:not_a_module", "the factory returned a str, not a torch.nn.Module"),
    ("my_models:no_weights", "has no conv or linear weight"),
    ("torchvision:no_such_net", "torchvision has no classification model 'no_such_net'"),
])
def test_a_bad_spec_is_refused_naming_it(user_code_on_path, spec, named):
    with pytest.raises(ModelSpecError) as error:
        build_model(spec, in_channels=1, image_size=28, num_classes=10)
    assert f"model {spec!r}" in str(error.value) and named in str(error.value)


@pytest.mark.parametrize("spec", ["my_models:raises", "no_such_module:factory"])
def test_the_command_line_refuses_a_bad_spec_before_any_work(tmp_path, spec):
    env = clean_env(PYTHONPATH=str(USER_CODE))
    done = subprocess.run(
        [CLI, "train", "--model", spec, "--storage", str(tmp_path / "results"),
         "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2
    assert f"model {spec!r}" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run directory, no store


def test_a_torchvision_model_by_name_adapts_its_first_conv_and_trains(one_thread):
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", in_channels=1, image_size=28, num_classes=10)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10
    from distrib_rda.config import TrainConfig

    parts = TrainConfig.build(target_sparsity=0.5).optim.build(model, total_steps=4)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x), y)
        parts.optimizer.zero_grad()
        loss.backward()
        parts.step()
        assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    parts.settle()  # the end of an epoch: exactly the scheduled zeros
    weights = [w for _, w in prunable_weights(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.5 * sum(w.numel() for w in weights))


def run_args(tmp_path, beton_cache, tracking_uri) -> list[str]:
    return ["--subset", "2048", "--batch-size", "64", "--epochs", "2", "--workers", "2",
            "--cache-dir", str(beton_cache), "--storage", str(tmp_path / "results"),
            "--tracking-uri", tracking_uri, "--experiment", "user-models",
            "--loader-workers", "1", "--target-sparsity", "0.8"]


def check_run(tracking_uri: str, run_id: str, spec: str, checkpoint_path: str,
              factory, target: float = 0.8) -> None:
    """The spec is in MLflow and in the checkpoint, and the checkpoint rebuilds that model."""
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model"] == spec
    state = checkpoint.load(checkpoint_path)
    assert state["config"]["model"] == spec
    model = factory(**{k: v for k, v in state["model_args"].items() if k == "num_classes"})
    model.load_state_dict(state["model"])
    zeros = sum(int((w == 0).sum()) for _, w in prunable_weights(model))
    assert zeros / sum(w.numel() for _, w in prunable_weights(model)) == pytest.approx(target,
                                                                                       abs=1e-3)


def test_a_users_model_trains_from_the_command_line_with_two_workers(
        tmp_path, beton_cache, tracking_uri):
    env = clean_env(PYTHONPATH=str(USER_CODE))
    done = subprocess.run([CLI, "train", "--model", "my_models:small_cnn", "--json",
                           *run_args(tmp_path, beton_cache, tracking_uri)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    sys.path.insert(0, str(USER_CODE))
    try:
        from my_models import small_cnn
    finally:
        sys.path.remove(str(USER_CODE))
    final = sorted((tmp_path / "results").glob("*/checkpoint_2*"))[-1]  # the last, by date
    check_run(tracking_uri, summary["run_id"], "my_models:small_cnn", str(final),
              lambda num_classes: small_cnn(1, num_classes))


def readme_block(heading: str) -> str:
    """The first ```python block under ``heading`` in the README, as printed."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index(heading):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_with_a_users_model_runs_as_printed(tmp_path):
    """Exactly as printed, from a fresh interpreter in an empty directory, as a user would paste
    it; the factory lives in __main__. HOME is the test's, so the default cache of converted
    datasets (~/.cache/distrib-rda) is made there."""
    code = readme_block("## Your own model, from the command line or from Python")
    assert "model=my_cnn" in code
    env = clean_env(HOME=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at 90.00% sparsity" in done.stdout.splitlines()[-1]
    assert (tmp_path / "mlflow.db").is_file()

    # The factory reached the workers by value: the run records it as __main__:my_cnn, and the
    # checkpoint rebuilds with the README's own function.
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (run,) = MlflowClient(tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri).search_experiments()])
    readme = {}
    exec(code.split("summary = ")[0], readme)  # the imports and the def, as printed
    final = sorted((tmp_path / "results").glob("*/checkpoint_2*"))[-1]
    check_run(tracking_uri, run.info.run_id, "__main__:my_cnn", str(final),
              lambda num_classes: readme["my_cnn"](1, num_classes), target=0.9)
