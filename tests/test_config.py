"""The config schema: one registry per kind of component, keys that belong to their optimizer,
strict parsing, and the params a run records. No Ray, no torch training."""

from __future__ import annotations

import ast
import collections
import subprocess
import sys
import time
from pathlib import Path

import pytest

import distrib_rda
from distrib_rda.cli import build_parser
from distrib_rda.config import ConfigError, TrainConfig, as_config, load_yaml
from distrib_rda.data.sources import DATASETS
from distrib_rda.models import MODELS
from distrib_rda.optimizers import OPTIMIZERS

PACKAGE = Path(distrib_rda.__file__).parent


def string_constants(path: Path) -> list[ast.Constant]:
    """The string literals of a module, without its docstrings and ``__all__``."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)):
            skip.add(id(body[0].value))
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            skip.update(id(item) for item in ast.walk(node.value))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in skip]


def test_each_component_name_is_written_once_in_the_package():
    names = {*MODELS, *DATASETS, *OPTIMIZERS}
    found = collections.defaultdict(list)
    for path in PACKAGE.rglob("*.py"):
        for node in string_constants(path):
            if node.value in names:
                found[node.value].append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert {name: places for name, places in found.items() if len(places) != 1} == {}
    assert set(found) == names


def test_cli_choices_and_help_come_from_the_registries():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {action.dest: action for action in train._actions}
    assert flags["optimizer"].choices == list(OPTIMIZERS)
    text = train.format_help()
    for name in (*MODELS, *DATASETS):
        assert name in " ".join(text.split())  # the model and dataset names, in their help
    for action in train._actions:
        if action.dest not in ("help", "config", "json"):
            assert "default:" in (action.help or ""), action.dest
    assert "LAMBDA_" not in text and "--lambda LAMBDA" in text


def test_an_sgd_run_records_no_rda_key_and_gmp_records_its_target():
    sgd = TrainConfig.build(optimizer="sgd").params()
    assert {"lambda_", "gamma", "warmup", "target_sparsity", "finetune_epochs"} & set(sgd) == set()
    assert {"lr", "momentum", "optimizer", "epochs", "model", "dataset"} <= set(sgd)
    gmp = TrainConfig.build(optimizer="gmp", target_sparsity=0.9).params()
    assert gmp["target_sparsity"] == "0.9" and "lambda_" not in gmp
    rda = TrainConfig.build().params()
    assert rda["target_sparsity"] == "0.95" and "gamma" in rda and "ramp" in rda


def test_params_leave_out_where_the_run_ran():
    params = TrainConfig.build(address="127.0.0.1:6379", storage="/tmp/x", name="run1",
                               cache_dir="/tmp/cache", loader_workers=4).params()
    for key in ("address", "storage", "cache_dir", "tracking_uri", "loader_workers",
                "checkpoint_every", "max_failures", "name", "experiment", "data_root"):
        assert key not in params


@pytest.mark.parametrize(("values", "named"), [
    ({"optimizer": "sgd", "lambda_": 1e-3},
     "lambda_ (--lambda): applies to optimizer prox-sgd, rda, not sgd"),
    ({"optimizer": "sgd", "target_sparsity": 0.9}, "applies to optimizer gmp, rda, not sgd"),
    ({"optimizer": "gmp", "gamma": 0.3}, "gamma (--gamma): applies to optimizer rda, not gmp"),
    ({"optimizer": "gmp"}, "target_sparsity (--target-sparsity): required"),
    ({"target_sparsity": 1.0}, "target_sparsity (--target-sparsity)"),
    ({"target_sparsity": 0}, "target_sparsity (--target-sparsity)"),
    ({"ramp": [0.6, 0.1]}, "0 <= start < end <= 1"),
    ({"ramp": [0.5, 0.5]}, "0 <= start < end <= 1"),
    ({"optimizer": "gmp", "target_sparsity": 0.9, "ramp": [0.2, 1.5]}, "0 <= start < end"),
    ({"lambda_": 1e-3, "target_sparsity": 0.9}, "give one"),
    ({"lambda": 1e-3, "lambda_": 1e-3}, "given twice, as lambda and lambda_"),
    ({"epochs": True}, "epochs (--epochs): must be an integer, not true/false"),
    ({"lr": False}, "lr (--lr): must be a number, not true/false"),
    ({"epochs": 10**7}, "epochs (--epochs)"),
    ({"fused": 1}, "fused (--fused)"),
    ({"name": "../escaped"}, "name (--name): must be a plain name"),
    ({"name": "/abs/path"}, "name (--name): must be a plain name"),
    ({"name": "a/b"}, "name (--name): must be a plain name"),
    ({"name": ""}, "name (--name): must be a plain name"),
    ({"experiment": ""}, "experiment (--experiment)"),
    ({"model": "not a spec"}, "model (--model): not a model spec"),
    ({"dataset": "imagenet"}, "dataset (--dataset): must be one of fashion-mnist"),
    ({"optimizer": "adam"}, "optimizer (--optimizer): must be one of sgd, prox-sgd, gmp, rda"),
    ({"optimizer": "sgd", "sync_every": 4}, "needs optimizer: rda"),
    ({"restart": [30]}, "restart epochs must be within"),
])
def test_bad_values_are_refused_naming_the_key(values, named):
    with pytest.raises(ConfigError) as error:
        TrainConfig.build(**values)
    assert named in str(error.value)


def test_every_bad_key_is_named_at_once():
    with pytest.raises(ConfigError) as error:
        TrainConfig.build(optimizer="gmp", gamma=-1, epochs=0, batch_size="many")
    message = str(error.value)
    for key in ("gamma", "epochs", "batch_size", "target_sparsity"):
        assert f"{key} (--" in message


def test_numbers_read_the_same_from_yaml_and_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("lambda: 1e-5\nlr: 5.0e-2\nepochs: 3\n")
    cfg = as_config(tmp_path / "run.yaml")
    assert (cfg.optim.lambda_, cfg.optim.target_sparsity, cfg.optim.lr) == (1e-5, None, 0.05)
    assert cfg == TrainConfig.build(lambda_=1e-5, lr=0.05, epochs=3)


@pytest.mark.parametrize(("text", "named"), [
    ("epochs: 3\nepochs: 4\n", "key 'epochs' is given twice"),
    ("- a\n- b\n", "must hold a mapping"),
    ("epochs: [\n", "not valid YAML"),
])
def test_yaml_files_are_read_strictly(tmp_path, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_yaml(path)


def test_a_binary_config_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="not a text file"):
        load_yaml(path)


def test_replace_keeps_the_section_and_round_trips():
    cfg = TrainConfig.build(target_sparsity=0.9, gamma=0.2)
    assert TrainConfig.build(**cfg.to_dict()) == cfg
    assert cfg.replace(epochs=3).optim.gamma == 0.2
    sgd = cfg.replace(optimizer="sgd")
    assert sgd.optimizer == "sgd" and "gamma" not in sgd.to_dict()


def test_a_typo_is_refused_before_heavy_imports():
    """`train` validates its config before importing torch, Ray or MLflow."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from distrib_rda.cli import main; code = main("
         "['train', '--epochs', '0']); print(sorted({'torch', 'ray', 'mlflow'} & "
         "set(sys.modules))); sys.exit(code)"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    assert done.returncode == 2
    assert "epochs (--epochs)" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout.strip() == "[]"
    assert seconds < 5  # a second or so on a quiet machine; generous for a loaded one


def test_the_command_exits_with_mains_status_after_its_exit_handlers():
    """``distrib-rda`` skips the interpreter's teardown (cli.exit_quickly), not the exit
    handlers (Ray's shutdown and MLflow's flushes are among them), and keeps main's status.
    The teardown is seen by an object of ``__main__`` that prints when it is finalized, as
    a normal exit (``sys.exit(main())``) does when it clears the modules."""
    program = ("import atexit, sys; from distrib_rda import cli\n"
               "class Finalized:\n"
               "    def __del__(self): print('teardown ran')\n"
               "kept = Finalized()\n"
               "atexit.register(lambda: print('exit handler ran'))\n"
               "sys.argv = ['distrib-rda', 'train', '--workers', '0']\n")
    done = subprocess.run([sys.executable, "-c", program + "cli.console()"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "--workers" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout.split() == ["exit", "handler", "ran"]
    normal = subprocess.run([sys.executable, "-c", program + "sys.exit(cli.main())"],
                            capture_output=True, text=True)
    assert normal.returncode == 2 and "teardown ran" in normal.stdout  # what is skipped
