"""Sparse export: exact round trip, smaller than dense, from files, Ray dirs and MLflow runs.

Bad sources (pickled code, corrupt files, unknown runs) and existing outputs are refused.
"""

from __future__ import annotations

import os
import pickle

import mlflow
import pytest
import torch
from torch import nn

from distrib_rda.cli import main
from distrib_rda.config import TrainConfig
from distrib_rda.errors import UserError
from distrib_rda.export import (
    LOCAL_KEYS,
    decode,
    encode,
    export_sparse,
    load_sparse,
    saved_size,
)
from distrib_rda.models import build_model


def sparse_model(name: str = "lenet5", zero_fraction: float = 0.9, seed: int = 0) -> nn.Module:
    """A model whose conv and linear weights are ``zero_fraction`` zeros."""
    torch.manual_seed(seed)
    model = build_model(name, in_channels=1, image_size=28, num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.mul_(torch.rand_like(module.weight) >= zero_fraction)
    return model


def save_checkpoint(model: nn.Module, path, name: str = "lenet5") -> None:
    """A checkpoint shaped like the training loop's (see the contracts)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()  # lr 0: momentum buffers in the state, the zeros stay zero
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
        "rng": {"torch": torch.get_rng_state()},
        "config": TrainConfig(model=name).model_dump(mode="json"),
    }, path)


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_round_trip_from_a_ray_checkpoint_dir_is_exact_and_smaller(tmp_path, name):
    model = sparse_model(name)
    (tmp_path / "checkpoint_000003").mkdir()
    save_checkpoint(model, tmp_path / "checkpoint_000003" / "checkpoint.pt", name)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # the saved weights

    report = export_sparse(tmp_path / "checkpoint_000003", tmp_path / "sparse.pt")

    assert report["file_bytes"] == (tmp_path / "sparse.pt").stat().st_size
    assert report["dense_bytes"] == saved_size(model.state_dict())
    assert report["file_bytes"] < report["dense_bytes"] / 3
    assert report["ratio"] == pytest.approx(report["dense_bytes"] / report["file_bytes"])
    assert report["weight_density"] == pytest.approx(0.1, abs=0.02)
    assert report["nonzeros"] == sum(int(t.count_nonzero()) for t in state.values()
                                     if t.is_floating_point())

    dense, config = load_sparse(tmp_path / "sparse.pt")
    assert config["model"] == name
    assert_same_state(dense, state)
    rebuilt = build_model(config["model"], in_channels=1, image_size=28, num_classes=10)
    rebuilt.load_state_dict(dense)
    assert_same_state(rebuilt.state_dict(), state)
    loaded = torch.load(tmp_path / "sparse.pt", weights_only=True)  # plain data, no code
    encodings = {entry["encoding"] for entry in loaded["tensors"].values()}
    assert "dense" in encodings and encodings & {"coo", "bitmask"}


@pytest.mark.parametrize(("tensor", "encoding"), [
    (torch.randn(64, 32) * (torch.rand(64, 32) < 0.1), "bitmask"),
    (torch.randn(64, 32, 3, 3) * (torch.rand(64, 32, 3, 3) < 0.01), "coo"),
    (torch.zeros(500), "coo"),
    (torch.randn(64, 32), "dense"),
    (torch.randn(10) * (torch.rand(10) < 0.1), "dense"),  # too small to gain
    (torch.tensor(7), "dense"),
    (torch.arange(100, dtype=torch.int64) % 2, "dense"),  # integer buffers stay dense
    (torch.randn(3, 4, dtype=torch.float64).relu(), "dense"),
])
def test_each_tensor_takes_its_smallest_encoding_and_decodes_exactly(tensor, encoding):
    entry = encode(tensor)
    assert entry["encoding"] == encoding
    decoded = decode(entry)
    assert decoded.dtype == tensor.dtype and decoded.shape == tensor.shape
    assert torch.equal(decoded, tensor)


def test_exports_an_mlflow_run_model(tmp_path, tracking_uri):
    model = sparse_model()
    (tmp_path / "model").mkdir()
    torch.save({"model": model.state_dict(), "config": TrainConfig().model_dump(mode="json")},
               tmp_path / "model" / "model.pt")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment(
        "export", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(tmp_path / "model" / "model.pt"), "model")
    client.set_terminated(run.info.run_id)

    report = export_sparse(run.info.run_id, tmp_path / "out.pt", tracking_uri=tracking_uri)

    assert report["file_bytes"] < report["dense_bytes"]
    dense, config = load_sparse(tmp_path / "out.pt")
    assert_same_state(dense, model.state_dict())
    # the run's config, less where it ran: no storage, cache or store path
    assert config == {key: value for key, value in TrainConfig().model_dump(mode="json").items()
                      if key not in LOCAL_KEYS}
    assert {"storage", "cache_dir", "tracking_uri", "data_root"}.isdisjoint(config)

    with pytest.raises(UserError, match="0123456789abcdef0123456789abcdef.*no MLflow run"):
        export_sparse("0123456789abcdef0123456789abcdef", tmp_path / "x.pt",
                      tracking_uri=tracking_uri)
    empty_run = client.create_run(experiment).info.run_id
    with pytest.raises(UserError, match="sparse/model-sparse.pt or model/model.pt"):
        export_sparse(empty_run, tmp_path / "x.pt", tracking_uri=tracking_uri)
    assert not (tmp_path / "x.pt").exists()


def test_unknown_run_without_a_store_creates_no_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/missing.db"
    with pytest.raises(UserError, match=f"abc123.*--tracking-uri {uri}: no MLflow store there"):
        export_sparse("abc123", tmp_path / "x.pt", tracking_uri=uri)
    assert not (tmp_path / "missing.db").exists()


class RunsShell:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    pass


def test_refuses_pickled_code_without_running_it(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as file:
        pickle.dump({"model": RunsShell(marker)}, file, protocol=2)
    with pytest.raises(UserError, match=r"checkpoint.pt: refused: .*pickled code.*system"):
        export_sparse(path, tmp_path / "out.pt")
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()

    torch.save({"model": model_state(), "config": {}, "extra": Custom()}, tmp_path / "model.pt")
    with pytest.raises(UserError, match=r"model.pt: refused: .*Custom"):
        export_sparse(tmp_path / "model.pt", tmp_path / "out.pt")


def model_state() -> dict:
    return sparse_model().state_dict()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_refuses_a_corrupt_file_naming_it(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model_state(), "config": {}}, path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint",
                      "empty": b""}[damage])
    with pytest.raises(UserError, match=r"checkpoint.pt: not a readable torch file"):
        export_sparse(path, tmp_path / "out.pt")


def test_refuses_what_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.ones(3)}, tmp_path / "a.pt")
    with pytest.raises(UserError, match="a.pt: expected a dict whose 'model' is a state_dict"):
        export_sparse(tmp_path / "a.pt", tmp_path / "out.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="empty_dir: directory holds no checkpoint.pt"):
        export_sparse(tmp_path / "empty_dir", tmp_path / "out.pt")
    with pytest.raises(UserError, match="nothing.pt: no such checkpoint file"):
        export_sparse(tmp_path / "nothing.pt", tmp_path / "out.pt")
    with pytest.raises(UserError, match="a.pt: not a sparse export"):
        load_sparse(tmp_path / "a.pt")


def test_never_overwrites_without_force(tmp_path):
    source = tmp_path / "model.pt"
    torch.save({"model": model_state(), "config": {}}, source)
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    with pytest.raises(UserError, match="out.pt: already exists; pass --force"):
        export_sparse(source, out)
    assert out.read_bytes() == b"precious"

    export_sparse(source, out, force=True)
    assert_same_state(load_sparse(out)[0], model_state())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "out.pt"]  # no temp left


def test_cli_exit_codes(tmp_path, capsys):
    source = tmp_path / "model.pt"
    torch.save({"model": model_state(), "config": {}}, source)
    assert main(["export", str(source), "--out", str(tmp_path / "out.pt")]) == 0
    assert "x smaller" in capsys.readouterr().out

    assert main(["export", str(source), "--out", str(tmp_path / "out.pt")]) == 2
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o.pt")]) == 2
    with open(tmp_path / "evil.pt", "wb") as file:
        pickle.dump({"model": RunsShell(tmp_path / "MARKER")}, file, protocol=2)
    assert main(["export", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "missing.pt" in err and "evil.pt: refused" in err
    assert "Traceback" not in err
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "o.pt").exists()
