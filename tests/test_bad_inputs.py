"""Bad input, table-driven: every case exits non-zero with one message naming the culprit, prints
no traceback, and changes nothing that existed (checkpoints, .beton files, MLflow stores)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from distrib_rda.cli import main
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
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


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
    ("RDA target without fine-tune", ["train", "--target-sparsity", "0.9"], "--finetune-epochs"),
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


@pytest.mark.parametrize("args, culprit", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_is_refused_and_nothing_changes(world, tmp_path, monkeypatch, capsys, args,
                                                  culprit):
    monkeypatch.chdir(tmp_path)  # so default outputs (results/, mlflow.db) would land here
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
