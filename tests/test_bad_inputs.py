"""Bad input, table-driven: every case exits non-zero with one message naming the culprit, prints
no traceback, changes nothing that existed (checkpoints, .beton files, MLflow stores, run
directories: every file's hash) and creates nothing (no directory, config file, store or
output). The classes: paths that escape their place or cannot be written, stores that are not
there or not databases, strict config parsing, datasets that cannot train a classifier or do
not fit the run, reruns with another config, unreachable clusters and servers."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from distrib_rda import preflight
from distrib_rda.cli import build_parser, config_from_args, main
from distrib_rda.config import TrainConfig
from distrib_rda.data import convert
from distrib_rda.models import build_model

IMAGEFOLDER_CLASSES = ("cat", "dog")


class Payload:
    """Pickled code: loading it with weights_only=False would run os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Existing things that bad input must not touch: a converted dataset, a checkpoint, a
    malicious checkpoint, a corrupt one, an MLflow store with one run, an existing output."""
    root = tmp_path_factory.mktemp("world")
    from PIL import Image

    for label in IMAGEFOLDER_CLASSES:
        (root / "images" / label).mkdir(parents=True)
        for index in range(4):
            pixels = np.random.default_rng(index).integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / label / f"{index}.png")
    convert(f"imagefolder:{root / 'images'}", root / "beton")
    model = build_model("lenet5", in_channels=1, image_size=28, num_classes=10)
    torch.save({"model": model.state_dict(), "config": {"model": "lenet5"}},
               root / "checkpoint.pt")
    torch.save(Payload(root / "pwned"), root / "evil.pt")
    (root / "corrupt.pt").write_bytes((root / "checkpoint.pt").read_bytes()[:200])
    (root / "existing.pt").write_bytes(b"keep me")
    (root / "corrupt-beton").mkdir()
    for name in ("train.beton", "test.beton", "meta.json"):
        data = (root / "beton" / name).read_bytes()
        (root / "corrupt-beton" / name).write_bytes(data[: len(data) // 3]
                                                      if name.endswith("beton") else data)
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.create_experiment("kept", artifact_location=str(root / "artifacts"))
    client.set_terminated(client.create_run(experiment).info.run_id)
    (root / "not-a-mapping.yaml").write_text("- model\n- lenet5\n")
    (root / "unknown-key.yaml").write_text("model: lenet5\nlearning_rate: 0.1\n")
    (root / "bad-space.yaml").write_text(
        "config: {epochs: 1}\nspace:\n  lambda_: {lognormal: [1.0e-5, 1.0e-3]}\n")
    (root / "inverted-space.yaml").write_text(
        "config: {epochs: 1}\nspace:\n  gamma: {uniform: [1.0, 0.1]}\n")
    (root / "empty-data-root").mkdir()

    # Places that are not what a flag needs, and stores that are not MLflow's.
    (root / "afile").write_text("a file, not a directory\n")
    (root / "dbdir").mkdir()
    (root / "notdb.db").write_text("not a database\n")
    with sqlite3.connect(root / "other.db") as other:
        other.execute("CREATE TABLE notes (text TEXT)")
    (root / "existing.png").write_bytes(b"keep me too")
    gone = client.create_experiment("gone", artifact_location=str(root / "artifacts-gone"))
    client.delete_experiment(gone)

    # Image trees that cannot train a classifier as they are.
    def images(tree: str, sizes: dict[str, list[tuple[int, int]]]) -> None:
        for label, shapes in sizes.items():
            (root / tree / label).mkdir(parents=True)
            for index, (height, width) in enumerate(shapes):
                Image.fromarray(np.full((height, width, 3), index, dtype=np.uint8)).save(
                    root / tree / label / f"{index}.png")

    images("one-class", {"cat": [(8, 8)] * 4})
    images("mixed", {"cat": [(8, 8), (9, 8), (10, 8)], "dog": [(8, 8)] * 3})
    images("rect", {"cat": [(8, 12)] * 3, "dog": [(8, 12)] * 3})
    images("bomb", {"cat": [(8, 8)] * 3, "dog": [(8, 8)] * 3})
    # 200 million pixels, past twice Pillow's limit: its decompression-bomb guard refuses it.
    Image.frombytes("1", (20000, 10000), bytes(20000 * 10000 // 8)).save(
        root / "bomb" / "cat" / "big.png")

    # Config and space files that strict parsing refuses.
    (root / "binary.yaml").write_bytes(b"model: lenet5\n\x00\x01\xff\xfe")
    (root / "duplicate.yaml").write_text("epochs: 3\nlambda: 1.0e-4\nepochs: 4\n")
    (root / "boolean.yaml").write_text("epochs: true\n")
    (root / "lambda-twice.yaml").write_text("lambda: 1.0e-4\nlambda_: 2.0e-4\n")
    (root / "directory.yaml").mkdir()
    space = "space:\n  gamma: {uniform: [0.1, 0.3]}\nsearch: {trials: 2}\n"
    (root / "space.yaml").write_text("config: {epochs: 2, subset: 100}\n" + space)
    (root / "boolean-space.yaml").write_text("config: {epochs: true}\n" + space)
    (root / "subset-space.yaml").write_text("config: {epochs: 2, subset: 70000}\n" + space)

    # Runs and searches that exist: a rerun under the name must match them.
    results = root / "results"
    cfg = TrainConfig.build(name="r1", epochs=3, storage=results, cache_dir=root / "cache",
                            tracking_uri=f"sqlite:///{root}/mlflow.db")
    saved = preflight.check_train(cfg).cfg
    (results / "r1").mkdir(parents=True)
    (results / "r1" / preflight.CONFIG_FILE).write_text(json.dumps(saved.to_dict()))
    (results / "broken").mkdir()
    (results / "broken" / preflight.CONFIG_FILE).write_text("{not json")
    (results / "space").mkdir()  # a search named like space.yaml
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file's hash and every directory under ``root``: a change, or anything new."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            if path.is_file() else "dir" for path in sorted(root.rglob("*"))}


def _no_ray(*args, **kwargs):
    pytest.fail("a refusal must come before Ray starts")


W = "{world}"  # replaced by the fixture's directory
CASES = [
    # command line and config
    ("negative lambda", ["train", "--lambda", "-1"], "--lambda"),
    ("NaN lambda", ["train", "--lambda", "nan"], "--lambda"),
    ("gamma zero", ["train", "--gamma", "0"], "--gamma"),
    ("eps zero", ["train", "--eps", "0"], "--eps"),
    ("init scale zero", ["train", "--init-scale", "0"], "--init-scale"),
    ("zero workers", ["train", "--workers", "0"], "--workers"),
    ("batch smaller than workers", ["train", "--batch-size", "1", "--workers", "2"], "batch_size"),
    ("target sparsity 1.5", ["train", "--target-sparsity", "1.5"], "--target-sparsity"),
    ("GMP without a target", ["train", "--optimizer", "gmp"], "--target-sparsity"),
    ("target sparsity for SGD", ["train", "--optimizer", "sgd", "--target-sparsity", "0.9"],
     "target_sparsity"),
    ("RDA target with AdaGrad steps", ["train", "--target-sparsity", "0.9", "--adaptive"],
     "--adaptive"),
    ("restarts out of order", ["train", "--restart", "5,3"], "--restart"),
    ("local DA without RDA", ["train", "--optimizer", "sgd", "--sync-every", "4"], "sync_every"),
    ("unknown model", ["train", "--model", "alexnet"], "--model"),
    ("unknown optimizer", ["train", "--optimizer", "adam"], "--optimizer"),
    ("not a number", ["train", "--lambda", "lots"], "--lambda"),
    ("missing config file", ["train", "--config", f"{W}/nope.yaml"], "nope.yaml"),
    ("config not a mapping", ["train", "--config", f"{W}/not-a-mapping.yaml"], "not-a-mapping"),
    ("unknown config key", ["train", "--config", f"{W}/unknown-key.yaml"], "learning_rate"),
    ("tracking store unreachable", ["train", "--tracking-uri", "http://127.0.0.1:9"],
     "--tracking-uri"),
    ("old file store", ["train", "--tracking-uri", f"{W}/mlruns"], "--tracking-uri"),
    # datasets and .beton files
    ("unknown dataset", ["train", "--dataset", "svhn"], "--dataset"),
    ("missing imagefolder", ["train", "--dataset", f"imagefolder:{W}/no-such-dir"],
     "no-such-dir"),
    ("mnist missing under data root", ["train", "--dataset", "mnist", "--data-root",
                                       f"{W}/empty-data-root"], "empty-data-root"),
    ("convert over an existing output", ["data", "convert", f"imagefolder:{W}/images", "--out",
                                         f"{W}/beton"], "--force"),
    ("convert an unknown dataset", ["data", "convert", "svhn", "--out", f"{W}/new"], "svhn"),
    ("cifar10 missing", ["data", "convert", "cifar10", "--data-root", f"{W}/empty-data-root",
                         "--out", f"{W}/new"], "cifar"),
    # checkpoints and exports
    ("corrupt checkpoint", ["export", f"{W}/corrupt.pt", "--out", f"{W}/x.pt"], "corrupt.pt"),
    ("checkpoint with pickled code", ["export", f"{W}/evil.pt", "--out", f"{W}/x.pt"],
     "evil.pt"),
    ("export over an existing file", ["export", f"{W}/checkpoint.pt", "--out",
                                      f"{W}/existing.pt"], "--force"),
    ("unknown run id", ["export", "0123456789abcdef", "--out", f"{W}/x.pt", "--tracking-uri",
                        f"sqlite:///{W}/mlflow.db"], "0123456789abcdef"),
    # search files and reports
    ("unknown distribution", ["tune", f"{W}/bad-space.yaml"], "lognormal"),
    ("inverted range", ["tune", f"{W}/inverted-space.yaml"], "gamma"),
    ("missing space file", ["tune", f"{W}/nope.yaml"], "nope.yaml"),
    ("pareto of an unknown experiment", ["pareto", "--experiment", "nope", "--tracking-uri",
                                         f"sqlite:///{W}/mlflow.db"], "nope"),
]
# Where a run writes, in the world: each case below must create none of it (W/cache included).
T = ["--storage", f"{W}/results", "--cache-dir", f"{W}/cache", "--tracking-uri",
     f"sqlite:///{W}/mlflow.db"]
STORE = ["--tracking-uri", f"sqlite:///{W}/mlflow.db"]
CASES += [
    # paths that escape their place, or are not directories
    ("name escapes --storage", ["train", *T, "--name", "../escaped"], "--name"),
    ("absolute name", ["train", *T, "--name", "/abs/path"], "--name"),
    ("nested name", ["train", *T, "--name", "a/b"], "--name"),
    ("empty name", ["train", *T, "--name", ""], "--name"),
    ("storage is a file", ["train", *T, "--storage", f"{W}/afile"], "--storage"),
    ("storage under a file", ["train", *T, "--storage", f"{W}/afile/results"], "--storage"),
    ("cache dir is a file", ["train", *T, "--cache-dir", f"{W}/afile"], "--cache-dir"),
    ("cache dir under a file", ["train", *T, "--cache-dir", f"{W}/afile/c"], "--cache-dir"),
    ("data root is a file", ["train", *T, "--dataset", "mnist", "--data-root", f"{W}/afile"],
     "--data-root"),
    ("search storage is a file", ["tune", f"{W}/space.yaml", *T, "--storage", f"{W}/afile"],
     "--storage"),
    ("convert out under a file", ["data", "convert", f"imagefolder:{W}/images", "--out",
                                  f"{W}/afile/beton"], "--out"),
    ("export out is a directory", ["export", f"{W}/checkpoint.pt", "--out", f"{W}/dbdir"],
     "--out"),
    ("export out under a file", ["export", f"{W}/checkpoint.pt", "--out", f"{W}/afile/x.pt"],
     "--out"),
    ("pareto out is a directory", ["pareto", "--experiment", "kept", *STORE, "--out",
                                   f"{W}/dbdir"], "--out"),
    ("pareto out of unknown type", ["pareto", "--experiment", "kept", *STORE, "--out",
                                    f"{W}/fronts.xyz"], "--out"),
    ("pareto out over a file", ["pareto", "--experiment", "kept", *STORE, "--out",
                                f"{W}/existing.png"], "--force"),
    # stores that are not there, or not MLflow databases: never created, never changed
    ("store names a directory", ["train", *T, "--tracking-uri", f"sqlite:///{W}/dbdir"],
     "--tracking-uri"),
    ("store is not a database", ["train", *T, "--tracking-uri", f"sqlite:///{W}/notdb.db"],
     "notdb.db"),
    ("store is another database", ["train", *T, "--tracking-uri", f"sqlite:///{W}/other.db"],
     "other.db"),
    ("store in a missing directory", ["train", *T, "--tracking-uri",
                                      f"sqlite:///{W}/nodir/mlflow.db"], "--tracking-uri"),
    ("deleted experiment", ["train", *T, "--experiment", "gone"], "--experiment gone"),
    ("search store is a directory", ["tune", f"{W}/space.yaml", *T, "--name", "new-search",
                                     "--tracking-uri", f"sqlite:///{W}/dbdir"], "--tracking-uri"),
    ("pareto of a missing store", ["pareto", "--experiment", "kept", "--tracking-uri",
                                   f"sqlite:///{W}/none.db"], "--tracking-uri"),
    ("pareto of a non-database", ["pareto", "--experiment", "kept", "--tracking-uri",
                                  f"sqlite:///{W}/notdb.db"], "notdb.db"),
    ("export from a non-database", ["export", "0123456789abcdef", "--out", f"{W}/x.pt",
                                    "--tracking-uri", f"sqlite:///{W}/notdb.db"], "notdb.db"),
    ("export from a missing store", ["export", "0123456789abcdef", "--out", f"{W}/x.pt",
                                     "--tracking-uri", f"sqlite:///{W}/none.db"], "none.db"),
    ("export from an unreachable server", ["export", "0123456789abcdef", "--out", f"{W}/x.pt",
                                           "--tracking-uri", "http://127.0.0.1:9"],
     "--tracking-uri"),
    # strict parsing
    ("binary config file", ["train", *T, "--config", f"{W}/binary.yaml"], "binary.yaml"),
    ("config file is a directory", ["train", *T, "--config", f"{W}/directory.yaml"],
     "directory.yaml"),
    ("duplicate YAML key", ["train", *T, "--config", f"{W}/duplicate.yaml"], "given twice"),
    ("YAML boolean for a number", ["train", *T, "--config", f"{W}/boolean.yaml"], "epochs"),
    ("lambda and lambda_ both", ["train", *T, "--config", f"{W}/lambda-twice.yaml"],
     "given twice"),
    ("empty experiment", ["train", *T, "--experiment", ""], "--experiment"),
    ("epochs beyond bounds", ["train", *T, "--epochs", "100000000"], "--epochs"),
    ("YAML boolean in a space", ["tune", f"{W}/boolean-space.yaml", *T], "epochs"),
    ("image size for a named dataset", ["train", *T, "--image-size", "32"], "--image-size"),
    # datasets that cannot train a classifier, or do not fit the run
    ("one class", ["train", *T, "--dataset", f"imagefolder:{W}/one-class"], "two classes"),
    ("mixed image sizes", ["train", *T, "--dataset", f"imagefolder:{W}/mixed"],
     "--image-size"),
    ("images not square", ["train", *T, "--dataset", f"imagefolder:{W}/rect"], "--image-size"),
    ("decompression bomb", ["train", *T, "--dataset", f"imagefolder:{W}/bomb"], "big.png"),
    ("convert one class", ["data", "convert", f"imagefolder:{W}/one-class", "--out",
                           f"{W}/new"], "two classes"),
    ("convert mixed sizes", ["data", "convert", f"imagefolder:{W}/mixed", "--out", f"{W}/new"],
     "--image-size"),
    ("convert a bomb", ["data", "convert", f"imagefolder:{W}/bomb", "--image-size", "8",
                        "--out", f"{W}/new"], "big.png"),
    ("convert to a tiny size", ["data", "convert", f"imagefolder:{W}/mixed", "--image-size",
                                "2", "--out", f"{W}/new"], "--image-size"),
    ("subset beyond the dataset", ["train", *T, "--subset", "70000"], "--subset 70000"),
    ("subset beyond an image tree", ["train", *T, "--dataset", f"imagefolder:{W}/images",
                                     "--subset", "7"], "--subset 7"),
    ("more workers than test images", ["train", *T, "--dataset", f"imagefolder:{W}/images",
                                       "--workers", "3", "--batch-size", "6"], "--workers 3"),
    ("search subset beyond the dataset", ["tune", f"{W}/subset-space.yaml", *T], "--subset"),
    # reruns
    ("rerun with another config", ["train", *T, "--name", "r1", "--epochs", "4"],
     "resuming with a different config"),
    ("rerun over an unreadable config", ["train", *T, "--name", "broken"], "broken"),
    ("search exists without --resume", ["tune", f"{W}/space.yaml", *T], "--resume"),
    ("nothing to resume", ["tune", f"{W}/space.yaml", *T, "--name", "never", "--resume"],
     "--resume"),
    # clusters
    ("unreachable address", ["train", *T, "--address", "127.0.0.1:1"], "--address"),
]


@pytest.mark.parametrize("args, culprit", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_is_refused_and_nothing_changes(world, tmp_path, monkeypatch, capsys, args,
                                                  culprit):
    monkeypatch.chdir(tmp_path)  # so default outputs (results/, mlflow.db) would land here
    monkeypatch.setattr(ray, "init", _no_ray)
    args = [arg.replace(W, str(world)) for arg in args]
    culprit = culprit.replace(W, str(world))
    before = snapshot(world)
    try:
        status = main(args)
    except SystemExit as exit_info:  # argparse's own refusals
        status = exit_info.code
    error = capsys.readouterr().err
    assert status == 2
    assert culprit in error, error
    assert "Traceback" not in error
    assert snapshot(world) == before
    assert not (world / "pwned").exists()
    assert not any(tmp_path.iterdir()), sorted(tmp_path.iterdir())


def test_an_installed_command_prints_one_line_and_no_traceback(tmp_path):
    """The same through the real console script, as a user runs it."""
    command = [str(Path(sys.executable).parent / "distrib-rda"), "train", "--gamma", "0"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "gamma (--gamma): Input should be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_address_is_refused(tmp_path, beton_cache, capsys):
    status = main(["train", "--address", "127.0.0.1:1", "--cache-dir", str(beton_cache),
                   "--storage", str(tmp_path / "results"), "--tracking-uri",
                   f"sqlite:///{tmp_path}/mlflow.db"])
    assert status == 2
    assert "--address 127.0.0.1:1" in capsys.readouterr().err


def test_more_workers_than_cpus_is_refused_not_a_hang(ray_local, tmp_path, beton_cache,
                                                      capsys):
    status = main(["train", "--workers", "64", "--cache-dir", str(beton_cache), "--storage",
                   str(tmp_path / "results"), "--tracking-uri",
                   f"sqlite:///{tmp_path}/mlflow.db"])
    assert status == 2
    assert "--workers 64" in capsys.readouterr().err


def test_a_refused_start_leaves_nothing_and_the_retry_proceeds(world, tmp_path, capsys):
    """A run refused for an unreachable --address leaves no run directory or config file
    behind, so the corrected command is not taken for a resume with another config."""
    args = ["train", "--name", "retry", "--storage", str(tmp_path / "results"), "--cache-dir",
            str(tmp_path / "cache"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    assert main([*args, "--address", "127.0.0.1:1"]) == 2
    assert "--address 127.0.0.1:1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    plan = preflight.check_train(config_from_args(build_parser().parse_args(args)))
    assert (plan.resumed, plan.directory) == (False, tmp_path / "results" / "retry")
    assert not any(tmp_path.iterdir())


REFUSED_AT_ONCE = [
    ["train", "--epochs", "0"],
    ["train", *T, "--storage", f"{W}/afile"],
    ["train", *T, "--subset", "70000"],
    ["train", *T, "--dataset", f"imagefolder:{W}/mixed"],
    ["tune", f"{W}/space.yaml", *T, "--tracking-uri", f"sqlite:///{W}/notdb.db"],
    ["pareto", "--experiment", "kept", "--tracking-uri", f"sqlite:///{W}/none.db"],
    ["export", "0123456789abcdef", "--out", f"{W}/x.pt", "--tracking-uri",
     f"sqlite:///{W}/none.db"],
]


@pytest.mark.parametrize("args", REFUSED_AT_ONCE, ids=[" ".join(a[:1] + a[-2:]).replace(W, "W")
                                                       for a in REFUSED_AT_ONCE])
def test_refused_before_torch_ray_or_mlflow_is_imported(world, tmp_path, args):
    """What the pre-flight refuses costs no import of torch, Ray or MLflow: a second or so,
    whatever the machine's load adds."""
    args = [arg.replace(W, str(world)) for arg in args]
    program = ("import sys; from distrib_rda.cli import main; code = main(sys.argv[1:]); "
               "print(sorted({'torch', 'ray', 'mlflow', 'ffcv'} & set(sys.modules))); "
               "sys.exit(code)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", program, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.strip() == "[]", done.stdout
    assert seconds < 5  # about 0.5 s on a quiet machine; generous for a loaded one


def test_pareto_writes_its_plot_whole_and_never_over_a_file_without_force(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("fronts", artifact_location=str(tmp_path / "a"))
    for accuracy, sparsity in ((0.9, 0.5), (0.8, 0.9), (0.7, 0.6)):
        run = client.create_run(experiment).info.run_id
        client.log_metric(run, "accuracy", accuracy)
        client.log_metric(run, "sparsity", sparsity)
        client.set_terminated(run)
    out = tmp_path / "plots" / "fronts.svg"
    assert main(["pareto", "--experiment", "fronts", "--tracking-uri", uri, "--out",
                 str(out)]) == 2  # its directory must exist
    assert "does not exist" in capsys.readouterr().err and not out.parent.exists()
    out.parent.mkdir()
    assert main(["pareto", "--experiment", "fronts", "--tracking-uri", uri, "--out",
                 str(out)]) == 0
    first = out.read_bytes()
    assert first.lstrip().startswith(b"<?xml")  # the type its suffix names
    assert main(["pareto", "--experiment", "fronts", "--tracking-uri", uri, "--out",
                 str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == first
    assert main(["pareto", "--experiment", "fronts", "--tracking-uri", uri, "--out",
                 str(out), "--force"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["fronts.svg"]  # no temporary left
