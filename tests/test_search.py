"""Search spaces, Pareto fronts, and searches on real Ray Tune + Train with a real MLflow store.

The fast tests check the space files, the front computation, the plots and the MLflow records
with metric values written by hand. The search tests run real 4-trial searches of 1-epoch
LeNet-5 trainings on 1000 Fashion-MNIST images, one of them killed and resumed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from distrib_rda import tracking
from distrib_rda.cli import main
from distrib_rda.config import ConfigError, TrainConfig
from distrib_rda.errors import UserError
from distrib_rda.search import load_space, non_dominated, pareto_report
from distrib_rda.search.pareto import plot_fronts, plot_search, staircase
from distrib_rda.search.tune import _start_parent, finish_search, run_search

REPO = Path(__file__).resolve().parents[1]
SEARCHED = {"target_sparsity", "ramp", "threshold", "gamma", "warmup", "finetune_epochs"}


def brute_force_front(points, modes):
    """Independent reference: a point is out if some point is no worse everywhere and differs."""
    sign = [1 if m == "max" else -1 for m in modes]
    out = set()
    for i, p in enumerate(points):
        for q in points:
            if q != p and all(s * qq >= s * pp for s, qq, pp in zip(sign, q, p, strict=True)):
                out.add(i)
    return [i for i in range(len(points)) if i not in out]


def write_space(tmp_path: Path, text_or_data, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text_or_data if isinstance(text_or_data, str)
                    else yaml.safe_dump(text_or_data))
    return path


# --- the front ---------------------------------------------------------------------------

@pytest.mark.parametrize("modes", [("max", "max"), ("max", "min"), ("min", "min"),
                                   ("max", "max", "min")])
def test_non_dominated_matches_brute_force(modes):
    rng = random.Random(len(modes) * 7 + (modes[1] == "min"))
    for trial in range(60):
        n = rng.randint(1, 25)
        # coarse values, so that ties and duplicate points happen
        points = [tuple(rng.randint(0, 6) / 6 for _ in modes) for _ in range(n)]
        assert non_dominated(points, modes) == brute_force_front(points, modes), (trial, points)


def test_non_dominated_small_cases():
    assert non_dominated([], ["max", "max"]) == []
    # (accuracy, sparsity): the last is beaten by the first on both
    assert non_dominated([(0.9, 0.5), (0.8, 0.9), (0.85, 0.4)], ["max", "max"]) == [0, 1]
    # equal points are both on the front; a point equal on one and worse on the other is not
    assert non_dominated([(0.9, 0.5), (0.9, 0.5), (0.9, 0.4)], ["max", "max"]) == [0, 1]
    assert non_dominated([(1.0, 1.0), (2.0, 5.0)], ["max", "min"]) == [0, 1]
    assert non_dominated([(1.0, 5.0), (2.0, 1.0)], ["max", "min"]) == [1]
    assert non_dominated([(1.0, 5.0), (2.0, 1.0)], ["min", "min"]) == [0, 1]
    assert non_dominated([(1.0, 1.0), (2.0, 1.0)], ["min", "min"]) == [0]


def test_staircase_bounds_the_dominated_region():
    xs, ys, where = staircase([0.9, 0.5, 0.7], [0.80, 0.90, 0.85], ("max", "max"))
    assert (xs, ys, where) == ([0.5, 0.7, 0.9], [0.90, 0.85, 0.80], "pre")
    assert staircase([2.0, 1.0], [1.0, 2.0], ("min", "max"))[2] == "post"


# --- space files -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fashion_mnist_lenet5.yaml", "cifar10_resnet18.yaml"])
def test_shipped_spaces_are_valid(name):
    spec = load_space(REPO / "tune" / name)
    assert SEARCHED <= set(spec.space)
    assert spec.metrics == ["accuracy", "sparsity"] and spec.modes == ["max", "max"]
    assert spec.search.algorithm == "optuna"
    if name.startswith("cifar"):
        assert spec.base.gpu and spec.base.workers >= 4 and 160 <= spec.base.epochs <= 200
        assert str(spec.base.storage).startswith("/mnt/shared")
    else:
        assert not spec.base.gpu and spec.base.workers <= 2 and spec.trials <= 8
    # every trial config is a valid TrainConfig, at both ends of every searched range
    for end in (0, -1):
        sampled = {key: spec.space[key].encode(dist.values[end])
                   for key, dist in spec.space.items()}
        assert isinstance(spec.trial_config(sampled), TrainConfig)


def test_shipped_spaces_name_the_sparsity_never_lambda():
    """RDA finds its own l1 strength: the spaces search the target and how RDA reaches it."""
    for path in sorted((REPO / "tune").glob("*.yaml")):
        spec = load_space(path)
        assert "lambda_" not in spec.space and spec.base.optimizer == "rda", path
        assert spec.base.optim.target_sparsity is not None or "target_sparsity" in spec.space
    spec = load_space(REPO / "tune" / "fashion_mnist_lenet5_98.yaml")
    assert spec.base.epochs == 20 and spec.base.optim.target_sparsity == 0.98
    for finetune in spec.space["finetune_epochs"].values:
        config = spec.trial_config({**spec.start_points()[0], "finetune_epochs": finetune})
        assert config.optimizer_epochs + config.finetune_epochs == 20


BASE = {"config": {"epochs": 1}, "space": {"lambda_": {"loguniform": [1e-5, 1e-3]}}}


@pytest.mark.parametrize("change, key, reason", [
    ({"space": {"lamda": {"uniform": [0, 1]}}}, "space.lamda", "unknown config key"),
    ({"space": {"gamma": {"normal": [0, 1]}}}, "space.gamma", "unknown distribution 'normal'"),
    ({"space": {"gamma": {"uniform": [1.0, 0.5]}}}, "space.gamma", "needs lo < hi"),
    ({"space": {"gamma": {"uniform": [0.5, 0.5]}}}, "space.gamma", "needs lo < hi"),
    ({"space": {"lambda_": {"loguniform": [0.0, 1e-3]}}}, "space.lambda_", "needs 0 < lo"),
    ({"space": {"gamma": {"loguniform": [-1.0, 1.0]}}}, "space.gamma", "needs 0 < lo"),
    ({"space": {"gamma": {"uniform": [-1.0, 1.0]}}}, "space.gamma", "greater than 0"),
    ({"space": {"optimizer": {"choice": ["rda", "adam"]}}}, "space.optimizer", "'adam'"),
    ({"space": {"epochs": {"uniform": [1, 3]}}}, "space.epochs", "use choice or grid"),
    ({"space": {"storage": {"choice": ["a", "b"]}}}, "space.storage", "cannot be searched"),
    ({"space": {"gamma": {"choice": []}}}, "space.gamma", "non-empty list"),
    ({"space": {"gamma": {"grid": [0.1, 0.3]}}}, "space.gamma", "grid needs search.algorithm"),
    ({"search": {"algorithm": "grid"}}, "space.lambda_", "takes only {grid"),
    ({"objectives": [{"metric": "acc"}, {"metric": "sparsity"}]}, "objectives.0.metric",
     "'accuracy'"),
    ({"objectives": [{"metric": "accuracy", "mode": "up"}, {"metric": "sparsity"}]},
     "objectives.0.mode", "'max' or 'min'"),
    ({"objectives": [{"metric": "accuracy"}]}, "objectives", "two different metrics"),
    ({"search": {"algorithm": "hyperopt"}}, "search.algorithm", "'optuna', 'random' or 'grid'"),
    ({"search": {"trials": 0}}, "search.trials", "greater than or equal to 1"),
    ({"config": {"epochs": 0}}, "epochs", "greater than or equal to 1"),
    ({"config": {"epoch": 3}}, "epoch", "unknown key"),
    ({"spaces": {}}, "spaces", "unknown key"),
    ({"search": {"start": [{}]}}, "search.start[0]", "missing lambda_"),
    ({"search": {"start": [{"lambda_": 1e-4, "gamma": 0.3}]}}, "search.start[0]",
     "gamma not searched"),
    ({"search": {"start": [{"lambda": 1.0}]}}, "search.start[0].lambda_",
     "outside loguniform"),
    ({"search": {"trials": 1, "start": [{"lambda_": 1e-4}, {"lambda_": 1e-4}]}},
     "search.start", "2 start points but only 1 trials"),
])
def test_bad_space_is_refused_naming_file_key_and_reason(tmp_path, change, key, reason):
    data = {**BASE, **change}
    path = write_space(tmp_path, data, "bad_space.yaml")
    with pytest.raises(ConfigError) as caught:
        load_space(path)
    message = str(caught.value)
    assert str(path) in message and key in message and reason in message, message
    assert isinstance(caught.value, UserError)


def test_bad_space_through_the_cli_exits_2_without_traceback(tmp_path, capsys):
    path = write_space(tmp_path, {"space": {"gamma": {"loguniform": [0, 1]}}})
    assert main(["tune", str(path), "--storage", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert "space.gamma" in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()


def test_not_yaml_or_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(write_space(tmp_path, "space: [unclosed"))
    with pytest.raises(ConfigError, match="space"):
        load_space(write_space(tmp_path, "config: {}\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_space(tmp_path / "missing.yaml")


def test_flags_fix_keys_and_override_settings(tmp_path):
    path = write_space(tmp_path, {
        "config": {"epochs": 10},
        "space": {"lambda_": {"loguniform": [1e-5, 1e-3]}, "gamma": {"uniform": [0.1, 1.0]},
                  "restart": {"choice": [[], [2, 4]]}},
        "search": {"trials": 6, "max_concurrent": 2}})
    spec = load_space(path, overrides={"gamma": 0.5, "epochs": 8}, trials=3, max_concurrent=1)
    assert set(spec.space) == {"lambda_", "restart"}  # the flag fixed gamma
    assert spec.base.optim.gamma == 0.5 and spec.base.epochs == 8
    assert (spec.trials, spec.search.max_concurrent) == (3, 1)
    assert spec.trial_config({"lambda_": 2e-4, "restart": "[2, 4]"}).optim.restart == [2, 4]
    with pytest.raises(ConfigError, match="--trials 0"):
        load_space(path, trials=0)


def test_start_points_are_checked_and_encoded_for_tune(tmp_path):
    data = {"space": {"lambda_": {"loguniform": [1e-5, 1e-3]}, "adaptive": {"choice": [False]},
                      "restart": {"choice": [[], [2]]}, "gamma": {"uniform": [0.1, 1.0]}},
            "search": {"start": [{"lambda": 1e-4, "adaptive": False, "restart": [2],
                                  "gamma": 0.5}]}}
    spec = load_space(write_space(tmp_path, data))
    assert spec.start_points() == [{"lambda_": 1e-4, "adaptive": False, "restart": "[2]",
                                     "gamma": 0.5}]
    assert spec.trial_config(spec.start_points()[0]).optim.restart == [2]
    # a flag that fixes a searched key takes it out of the start points too
    assert load_space(write_space(tmp_path, data), overrides={"gamma": 0.2}).start_points() == [
        {"lambda_": 1e-4, "adaptive": False, "restart": "[2]"}]
    data["search"]["start"][0]["adaptive"] = 0  # not a bool: not one of the choices
    with pytest.raises(ConfigError, match=r"search.start\[0\].adaptive: 0 is outside choice"):
        load_space(write_space(tmp_path, data))


def test_grid_runs_each_combination_once(tmp_path):
    path = write_space(tmp_path, {
        "space": {"lambda_": {"grid": [0.0, 1e-4, 1e-3]}, "adaptive": {"grid": [False, True]}},
        "search": {"algorithm": "grid"}})
    spec = load_space(path)
    assert spec.trials == 6
    with pytest.raises(ConfigError, match="--trials 4.*6 combinations"):
        load_space(path, trials=4)


# --- plots and MLflow records, with metric values written by hand --------------------------

def fake_search(tracking_uri: str, tmp_path: Path, metrics: list[tuple[float, float]]):
    """A parent run and one finished child per (accuracy, sparsity), as a search leaves them."""
    spec = load_space(write_space(tmp_path, {
        "config": {"experiment": "fake", "tracking_uri": tracking_uri,
                   "storage": str(tmp_path / "results")},
        "space": {"lambda_": {"loguniform": [1e-5, 1e-2]}, "gamma": {"uniform": [0.1, 1.0]}}},
        "fake.yaml"))
    parent = tracking.start_run(spec.base, run_key="fake-parent", run_name="fake")
    client = MlflowClient(tracking_uri)
    client.set_tag(parent, "distrib_rda.role", "search")
    children = []
    for n, (accuracy, sparsity) in enumerate(metrics):
        cfg = spec.trial_config({"lambda_": 10 ** (-5 + 3 * n / max(1, len(metrics) - 1)),
                                 "gamma": 0.2 + 0.1 * n})
        child = tracking.start_run(cfg, run_key=f"fake/{n}", run_name=f"trial_{n}",
                                   parent_run_id=parent)
        tracking.log_epochs(client, child, [
            {"epoch": 1, "accuracy": accuracy * 0.9, "sparsity": sparsity * 0.5,
             "epoch_seconds": 1.0},
            {"epoch": 2, "accuracy": accuracy, "sparsity": sparsity, "epoch_seconds": 1.0}])
        client.set_terminated(child)
        children.append(child)
    search_dir = tmp_path / "results" / "fake"
    search_dir.mkdir(parents=True)
    return spec, parent, children, search_dir


METRICS = [(0.91, 0.30), (0.88, 0.75), (0.90, 0.60), (0.80, 0.70), (0.85, 0.92), (0.89, 0.55),
           (0.70, 0.97)]


def test_finish_search_records_the_front_on_the_parent(tracking_uri, tmp_path, capsys):
    spec, parent, children, search_dir = fake_search(tracking_uri, tmp_path, METRICS)
    client = MlflowClient(tracking_uri)
    stale = children[3]
    client.set_tag(stale, "pareto", "true")  # from an earlier finish: must be cleared
    outcome = finish_search(spec, parent, search_dir)

    expected = {children[i] for i in brute_force_front(METRICS, ["max", "max"])}
    assert {m["run_id"] for m in outcome["front"]} == expected
    payload = json.loads(Path(client.download_artifacts(parent, "pareto.json",
                                                        str(tmp_path))).read_text())
    assert {m["run_id"] for m in payload["front"]} == expected
    for member in payload["front"]:
        n = children.index(member["run_id"])
        assert member["metrics"]["accuracy"] == pytest.approx(METRICS[n][0])
        assert member["metrics"]["sparsity"] == pytest.approx(METRICS[n][1])
        assert float(member["params"]["lambda_"]) > 0 and "gamma" in member["params"]
    for child in children:
        assert (client.get_run(child).data.tags.get("pareto") == "true") == (child in expected)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent)} >= {"pareto.png", "pareto.json"}
    image = Image.open(client.download_artifacts(parent, "pareto.png", str(tmp_path)))
    assert image.size[0] >= 800 and image.size[1] >= 550

    # `distrib-rda pareto` prints the same front, the parent run left out
    capsys.readouterr()
    assert main(["pareto", "--experiment", "fake", "--tracking-uri", tracking_uri,
                 "--out", str(tmp_path / "fronts.png")]) == 0
    out = capsys.readouterr().out
    printed = {child for child in children + [parent] if child in out}
    assert printed == expected
    assert f"{len(expected)} of 7 runs" in out and (tmp_path / "fronts.png").stat().st_size > 10_000


def test_unfinished_runs_of_trials_tune_lost_are_retired(tracking_uri, tmp_path):
    spec, parent, children, search_dir = fake_search(tracking_uri, tmp_path, METRICS[:2])
    client = MlflowClient(tracking_uri)
    for n, child in enumerate(children):
        client.set_tag(child, "distrib_rda.trial_id", f"t{n}")
    lost = tracking.start_run(spec.base, run_key="fake/lost", run_name="lost",
                              parent_run_id=parent)
    client.set_tag(lost, "distrib_rda.trial_id", "gone")
    outcome = finish_search(spec, parent, search_dir, trial_ids={"t0", "t1"})
    assert outcome["lost"] == [lost] and (outcome["trials"], outcome["finished"]) == (2, 2)
    assert client.get_run(lost).info.lifecycle_stage == "deleted"
    assert all(client.get_run(c).info.lifecycle_stage == "active" for c in children)


def test_pareto_report_counts_single_train_runs_and_compares(tracking_uri, tmp_path):
    fake_search(tracking_uri, tmp_path, METRICS[:3])
    client = MlflowClient(tracking_uri)
    other = TrainConfig.build(experiment="single", tracking_uri=tracking_uri)
    run = tracking.start_run(other, run_key="one", run_name="dense")
    tracking.log_epochs(client, run, [{"epoch": 1, "accuracy": 0.95, "sparsity": 0.0,
                                       "epoch_seconds": 1.0}])
    client.set_terminated(run)
    unfinished = tracking.start_run(other, run_key="two", run_name="running")
    tracking.log_epochs(client, unfinished, [{"epoch": 1, "accuracy": 0.99, "sparsity": 0.99,
                                              "epoch_seconds": 1.0}])
    fronts = pareto_report(["fake", "single"], tracking_uri=tracking_uri,
                           out=tmp_path / "both.png")
    assert [m["run_id"] for m in fronts["single"]] == [run]  # the running one is not final
    assert {m["run_name"] for m in fronts["fake"]} == {"trial_0", "trial_1", "trial_2"} - {
        f"trial_{i}" for i in range(3) if i not in brute_force_front(METRICS[:3], ["max"] * 2)}
    assert Image.open(tmp_path / "both.png").size[0] >= 800


def test_pareto_shows_each_method_by_the_knob_that_drives_it(tracking_uri, tmp_path, capsys):
    """An SGD run shows no lambda, a GMP run its target, RDA its target or its lambda."""
    client = MlflowClient(tracking_uri)
    runs = {"sgd": {"optimizer": "sgd"}, "gmp": {"optimizer": "gmp", "target_sparsity": 0.95},
            "rda": {"target_sparsity": 0.9}, "rda-l1": {"lambda_": 8e-4}}
    for n, (name, values) in enumerate(runs.items()):
        cfg = TrainConfig.build(experiment="methods", tracking_uri=tracking_uri, **values)
        run = tracking.start_run(cfg, run_key=name, run_name=name)
        tracking.log_epochs(client, run, [{"epoch": 1, "accuracy": 0.9 - 0.01 * n,
                                           "sparsity": 0.2 * n, "epoch_seconds": 1.0}])
        client.set_terminated(run)
        assert ("lambda_" in client.get_run(run).data.params) == (name in ("rda-l1",))
    capsys.readouterr()
    assert main(["pareto", "--experiment", "methods", "--tracking-uri", tracking_uri]) == 0
    rows = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines()
            if line.count("│") > 4 and line.split("│")[1].strip() in runs}
    assert set(rows) == set(runs)
    assert "lambda" not in rows["sgd"] and "target" not in rows["sgd"]
    assert "target 0.95" in rows["gmp"] and "lambda" not in rows["gmp"]
    assert "target 0.9" in rows["rda"] and "lambda 0.0008" in rows["rda-l1"]


def test_unknown_experiment_is_named_with_the_existing_ones(tracking_uri, tmp_path, capsys):
    fake_search(tracking_uri, tmp_path, METRICS[:2])
    with pytest.raises(UserError, match=r"'nope'.*experiments there: .*fake"):
        pareto_report(["nope"], tracking_uri=tracking_uri, out=None)
    assert main(["pareto", "--experiment", "fake", "--compare", "nope",
                 "--tracking-uri", tracking_uri]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["pareto", "--experiment", "fake", "--tracking-uri", tracking_uri,
                 "--out", str(tmp_path / "missing" / "front.png")]) == 2
    assert "--out" in capsys.readouterr().err


def test_plots_render(tmp_path):
    points = [{"sparsity": s, "accuracy": a, "lambda_": str(10 ** -(2 + n))}
              for n, (a, s) in enumerate(METRICS)] + [
        {"sparsity": 0.0, "accuracy": 0.93, "lambda_": "0.0"}]
    front = brute_force_front([(p["accuracy"], p["sparsity"]) for p in points], ["max", "max"])
    out = plot_search(points, front, x="sparsity", y="accuracy", modes=("max", "max"),
                      title="fashion-mnist-lenet5: search 'demo'", out=tmp_path / "one.png")
    assert Image.open(out).size == (900, 624)
    out = plot_fronts({"a": points, "b": [{"sparsity": 0.5, "accuracy": 0.5}]},
                      {"a": front, "b": [0]}, out=tmp_path / "two.png")
    assert Image.open(out).size == (900, 624)


# --- real searches: Ray Tune + Ray Train + FFCV + MLflow -----------------------------------

TINY = {
    "config": {"dataset": "fashion-mnist", "model": "lenet5", "optimizer": "rda", "epochs": 1,
               "subset": 1000, "batch_size": 128, "workers": 1, "loader_workers": 1,
               "experiment": "tiny"},
    "space": {"lambda_": {"loguniform": [1e-5, 3e-3]}, "gamma": {"loguniform": [0.3, 1.0]},
              "restart": {"choice": [[], [1]]}},
    "search": {"algorithm": "optuna", "trials": 3, "max_concurrent": 2, "seed": 0},
}


def test_resume_refuses_what_it_cannot_continue(tmp_path, tracking_uri):
    """Checked before Ray starts: nothing to resume, or a different search under the name."""
    path = write_space(tmp_path, TINY, "tiny.yaml")
    flags = {"storage": tmp_path / "results", "tracking_uri": tracking_uri}
    with pytest.raises(UserError, match=r"--resume: no search 'tiny' to resume"):
        run_search(path, resume=True, overrides=flags)
    spec = load_space(path, overrides=flags)
    spec.base = spec.base.replace(storage=(tmp_path / "results").resolve())
    search_dir = tmp_path / "results" / "tiny"
    parent = _start_parent(spec, search_dir, search_dir / "search.json")
    assert json.loads((search_dir / "search.json").read_text())["parent_run_id"] == parent

    with pytest.raises(UserError, match=r"a search named 'tiny' is already there; add --resume"):
        run_search(path, overrides=flags)
    with pytest.raises(UserError, match=r"--resume: .*config.epochs: 1 -> 2"):
        run_search(path, resume=True, overrides={**flags, "epochs": 2})
    with pytest.raises(UserError, match=r"--trials 2: .* runs trials 3"):
        run_search(path, resume=True, trials=2, overrides=flags)
    changed = {**TINY, "space": {**TINY["space"], "gamma": {"uniform": [0.1, 1.0]}}}
    with pytest.raises(UserError, match=r"--resume: .*space: "):
        run_search(write_space(tmp_path, changed, "tiny.yaml"), resume=True, overrides=flags)
    assert MlflowClient(tracking_uri).get_run(parent).info.status == "RUNNING"


def tune_args(space: Path, tmp_path: Path, beton_cache: Path, tracking_uri: str,
              *extra: str) -> list[str]:
    return ["tune", str(space), "--storage", str(tmp_path / "results"),
            "--tracking-uri", tracking_uri, "--cache-dir", str(beton_cache), *extra]


def search_runs(tracking_uri: str, experiment: str = "tiny"):
    """(parent runs, children of the single parent), oldest first."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], order_by=["start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("distrib_rda.role") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def check_front_artifact(tracking_uri: str, parent_id: str, children, tmp_path: Path) -> set:
    """pareto.json's front is exactly the brute-force front of the children's final metrics."""
    client = MlflowClient(tracking_uri)
    payload = json.loads(Path(client.download_artifacts(
        parent_id, "pareto.json", str(tmp_path))).read_text())
    points = [(c.data.metrics["accuracy"], c.data.metrics["sparsity"]) for c in children]
    expected = {children[i].info.run_id for i in brute_force_front(points, ["max", "max"])}
    assert {m["run_id"] for m in payload["front"]} == expected
    assert payload["trials_finished"] == len(children)
    for child in children:
        tagged = client.get_run(child.info.run_id).data.tags.get("pareto") == "true"
        assert tagged == (child.info.run_id in expected)
    return expected


def wait_for(condition, timeout: float, proc: subprocess.Popen, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the search exited (status {proc.returncode}) before {what}:\n"
                        + log.read_text()[-3000:])
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}:\n" + log.read_text()[-3000:])


def test_search_killed_and_resumed(ray_local, tmp_path, beton_cache, tracking_uri, capsys):
    """A real search of 3 trials: started by `distrib-rda tune` in a subprocess, on this
    module's Ray, killed (SIGKILL: Ray then ends the driver's trials and their Train runs) once
    a trial has finished, refused without --resume, then resumed here to the end."""
    space = write_space(tmp_path, TINY, "tiny.yaml")
    args = tune_args(space, tmp_path, beton_cache, tracking_uri)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    MlflowClient(tracking_uri).search_experiments()  # create the store before two processes race
    log_file = tmp_path / "killed-search.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "distrib_rda.cli", *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def finished_children():
                try:
                    _, children = search_runs(tracking_uri)
                except Exception:  # noqa: BLE001 - store or experiment not created yet
                    return None
                return [c for c in children if c.info.status == "FINISHED"]

            wait_for(finished_children, 300, proc, "the first trial finished", log_file)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    parents, before = search_runs(tracking_uri)
    done_before = [c for c in before if c.info.status == "FINISHED"]
    assert len(parents) == 1 and 1 <= len(done_before) < 3
    client = MlflowClient(tracking_uri)
    history = {c.info.run_id: [(m.step, m.value, m.timestamp) for m in
                               client.get_metric_history(c.info.run_id, "accuracy")]
               for c in done_before}

    # the same search again, without --resume, is refused and names the flag
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err

    outcome = run_search(space, resume=True, overrides={
        "storage": str(tmp_path / "results"), "tracking_uri": tracking_uri,
        "cache_dir": str(beton_cache)})
    out = capsys.readouterr().out
    assert outcome["trials"] == outcome["finished"] == 3 and outcome["errored"] == 0
    # the search's progress: each finished trial with its searched values and both objectives
    table = [line for line in out.splitlines() if "lambda_" in line and "gamma" in line]
    assert table and "accuracy" in table[-1] and "sparsity" in table[-1], out[-3000:]

    parents_after, children = search_runs(tracking_uri)
    assert [p.info.run_id for p in parents_after] == [parents[0].info.run_id]
    parent = parents_after[0]
    assert parent.info.status == "FINISHED"
    assert len(children) == 3
    # every child from before the kill is reused (one child per trial, not per attempt) but
    # the lost ones (below), and the trials that had finished were not run again
    assert {c.info.run_id for c in before} - set(outcome["lost"]) \
        <= {c.info.run_id for c in children}
    assert {c.info.run_id for c in done_before} <= {c.info.run_id for c in children}
    for run_id, points in history.items():
        assert [(m.step, m.value, m.timestamp) for m in
                client.get_metric_history(run_id, "accuracy")] == points, "trial was rerun"
    # a trial started in the instant before the kill, after Tune's last state snapshot, is
    # replaced by Tune; its unfinished run is retired, not left as a fourth child
    for run_id in outcome["lost"]:
        assert client.get_run(run_id).info.lifecycle_stage == "deleted"

    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        params, metrics = child.data.params, child.data.metrics
        assert 1e-5 <= float(params["lambda_"]) <= 3e-3 and 0.3 <= float(params["gamma"]) <= 1
        assert params["restart"] in ("[]", "[1]") and params["epochs"] == "1"
        assert 0 < metrics["accuracy"] <= 1 and 0 <= metrics["sparsity"] <= 1
        # per-epoch metrics exactly as a train run has them
        for key in ("accuracy", "sparsity", "train_loss", "nonzeros", "epoch_seconds",
                    "sparsity/conv1"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [1]
        assert {"dataset", "model", "optimizer", "distrib_rda.trial_id"} <= set(child.data.tags)
    assert len({c.data.tags["distrib_rda.trial_id"] for c in children}) == 3

    expected = check_front_artifact(tracking_uri, parent.info.run_id, children, tmp_path)
    png = client.download_artifacts(parent.info.run_id, "pareto.png", str(tmp_path))
    assert Image.open(png).size == (900, 624)

    # `distrib-rda pareto` prints the front that the artifact holds
    assert main(["pareto", "--experiment", "tiny", "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert {c.info.run_id for c in children if c.info.run_id in out} == expected
    assert parent.info.run_id not in out
