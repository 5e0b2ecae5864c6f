"""Export a trained model's non-zeros: ``distrib-rda export SOURCE --out FILE``.

SOURCE is a checkpoint file (``checkpoint.pt``), a Ray checkpoint directory holding
``checkpoint.pt``, a sparse export, or an MLflow run id: the run's ``sparse/model-sparse.pt``
(logged beside its MLflow Model), or ``model/model.pt`` for runs recorded before that. Every file
is read with ``torch.load(weights_only=True)``: a file that holds pickled code or objects is
refused.

The output is a plain ``torch.save`` file that ``torch.load(weights_only=True)`` reads::

    {"format": "distrib-rda-sparse/1", "config": {...}, "model_args": {...},
     "preprocessing": {"input_shape": [C, H, W], "mean": [...], "std": [...],
                       "pixel_scale": "0-255", "classes": [...], ...},
     "tensors": {name: entry}}

``config`` holds what defines the model and its training, and no local path (where the run
stored its checkpoints, caches or data is left out). ``preprocessing`` is what turns a raw image
into the model's input: ``(pixel - mean[c]) / std[c]``, pixels in ``[0, 255]``, laid out as
``(N, C, H, W)``; ``classes`` names the outputs. :func:`load_sparse_model` rebuilds the model.

Each tensor entry stores a tensor ``w`` with ``n`` elements, ``k`` of them non-zero, in the
smallest of three encodings (``b`` bytes per value):

- ``{"encoding": "dense", "data": w}``                         about ``n*b`` bytes;
- ``{"encoding": "coo", "shape", "indices", "values"}``        ``k*(4 + b)``: int32 flat indices;
- ``{"encoding": "bitmask", "shape", "mask", "values"}``       ``n/8 + k*b``: one bit per element.

The bitmask wins while more than 1 element in 32 is non-zero (float32), the indices below that.
Tensors where neither saves space (biases, BatchNorm parameters) and integer buffers stay
dense. :func:`load_sparse` rebuilds the dense state_dict exactly.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from distrib_rda.atomic import atomic_output
from distrib_rda.errors import UserError
from distrib_rda.safe_load import torch_load

FORMAT = "distrib-rda-sparse/1"
RUN_SPARSE_ARTIFACT = "sparse/model-sparse.pt"  # runs with an MLflow Model beside it
RUN_ARTIFACT = "model/model.pt"  # runs recorded before: a dict saved by hand
CHECKPOINT_NAMES = ("checkpoint.pt", "model.pt")
# What a second stored tensor adds to a torch.save file besides its bytes (zip entry, pickle).
RECORD_BYTES = 256
# Config keys that say where a run ran: a path, an address or a name of this machine.
LOCAL_KEYS = ("address", "storage", "cache_dir", "tracking_uri", "data_root", "loader_workers",
              "checkpoint_every", "max_failures", "name", "experiment", "register", "download")


class ExportError(UserError):
    """A source that cannot be exported, or an output that must not be written."""


def export_sparse(source: str | os.PathLike, out: str | os.PathLike, *,
                  tracking_uri: str = "sqlite:///mlflow.db", force: bool = False) -> dict[str, Any]:
    """Write the non-zeros of ``source``'s model to ``out``; print and return the sizes.

    Returns :func:`write_export`'s report with ``"source"`` added. ``tracking_uri`` is where a
    run id is looked up; its default gives way to ``MLFLOW_TRACKING_URI``.
    """
    from distrib_rda.locations import default_tracking_uri
    from distrib_rda.preflight import check_export

    tracking_uri = default_tracking_uri(tracking_uri)
    out = check_export(str(source), out, tracking_uri, force=force)
    with tempfile.TemporaryDirectory() as tmp:
        path = resolve_source(str(source), tracking_uri, Path(tmp))
        state, config, model_args, preprocessing = read_source(path)
    report = {"source": str(source), **write_export(
        state, out=out, config=config, model_args=model_args, preprocessing=preprocessing,
        force=force)}
    print(f"exported {source} -> {out}\n"
          f"  conv/linear weights: {report['weight_nonzeros']:,} non-zeros of "
          f"{report['weight_numel']:,} ({report['weight_density']:.2%})\n"
          f"  all tensors: {report['nonzeros']:,} non-zeros of {report['numel']:,} values\n"
          f"  size: {report['file_bytes']:,} bytes sparse vs {report['dense_bytes']:,} dense "
          f"({report['ratio']:.2f}x smaller)")
    return report


def write_export(state: dict[str, torch.Tensor], *, out: str | os.PathLike,
                 config: dict | None, model_args: dict | None = None,
                 preprocessing: dict | None = None, force: bool = False) -> dict[str, Any]:
    """Write ``state``'s non-zeros to ``out`` (module docstring); return the sizes.

    Returns ``{"out", "file_bytes", "dense_bytes", "ratio", "nonzeros", "numel",
    "weight_nonzeros", "weight_numel", "weight_density"}``: ``dense_bytes`` is the size of
    ``torch.save(state_dict)``, ``ratio = dense_bytes / file_bytes``; ``nonzeros`` and ``numel``
    count every floating tensor, the ``weight_*`` keys the tensors of 2 or more dimensions (the
    conv and linear weights), ``weight_density = weight_nonzeros / weight_numel``.
    """
    out = Path(out)
    tensors = {name: encode(tensor) for name, tensor in state.items()}
    write_atomic({"format": FORMAT, "config": portable_config(config), "model_args": model_args,
                  "preprocessing": preprocessing, "tensors": tensors}, out, force=force)
    floats = [t for t in state.values() if t.is_floating_point()]
    weights = [t for t in floats if t.dim() >= 2]
    report = {
        "out": str(out), "file_bytes": out.stat().st_size, "dense_bytes": saved_size(state),
        "nonzeros": count_nonzero(floats), "numel": sum(t.numel() for t in floats),
        "weight_nonzeros": count_nonzero(weights), "weight_numel": sum(t.numel() for t in weights),
    }
    report["ratio"] = report["dense_bytes"] / report["file_bytes"]
    report["weight_density"] = report["weight_nonzeros"] / max(report["weight_numel"], 1)
    return report


def portable_config(config: dict | None) -> dict | None:
    """``config`` without what ties it to one machine: the keys of ``LOCAL_KEYS``, and the
    directory of an ``imagefolder:PATH`` dataset (its last component is kept)."""
    if config is None:
        return None
    kept = {key: value for key, value in config.items() if key not in LOCAL_KEYS}
    dataset = kept.get("dataset")
    if isinstance(dataset, str) and dataset.startswith("imagefolder:"):
        kept["dataset"] = "imagefolder:" + Path(dataset.removeprefix("imagefolder:")).name
    return kept


def load_sparse_model(path: str | os.PathLike) -> torch.nn.Module:
    """Rebuild the dense model of an export made from a training checkpoint or run, in eval
    mode. Its input is ``read_export(path)["preprocessing"]`` applied to raw pixels."""
    from distrib_rda.models import build_model

    state, config = load_sparse(path)
    model_args = torch_load(Path(path)).get("model_args")
    if not config or not model_args:
        raise ExportError(f"{path}: holds no model config; rebuild the model yourself and "
                          "load the state_dict from load_sparse()")
    model = build_model(config["model"], **model_args)
    model.load_state_dict(state)
    return model.eval()


def load_sparse(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The dense state_dict and the config of a file written by :func:`export_sparse`."""
    data = read_export(path)
    return {name: decode(entry) for name, entry in data["tensors"].items()}, data["config"]


def read_export(path: str | os.PathLike) -> dict[str, Any]:
    """The whole export file as plain data (``torch.load(weights_only=True)``), checked."""
    data = torch_load(Path(path))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExportError(f"{path}: not a sparse export (expected format {FORMAT!r})")
    return data


def encode(tensor: torch.Tensor) -> dict[str, Any]:
    """The smallest of the dense, coo and bitmask entries for ``tensor`` (module docstring)."""
    tensor = tensor.detach().cpu()
    if not tensor.is_floating_point() or not 0 < tensor.numel() < 2**31:  # int32 indices
        return {"encoding": "dense", "data": tensor.clone()}
    flat = tensor.reshape(-1)
    nonzero = flat != 0
    count, itemsize = int(nonzero.sum()), tensor.element_size()
    sizes = {
        "dense": tensor.numel() * itemsize,
        "coo": count * (4 + itemsize) + RECORD_BYTES,
        "bitmask": math.ceil(tensor.numel() / 8) + count * itemsize + RECORD_BYTES,
    }
    encoding = min(sizes, key=sizes.__getitem__)  # ties keep the first: dense
    if encoding == "dense":
        return {"encoding": "dense", "data": tensor.clone()}
    entry = {"encoding": encoding, "shape": list(tensor.shape), "values": flat[nonzero]}
    if encoding == "coo":
        entry["indices"] = nonzero.nonzero().view(-1).to(torch.int32)
    else:
        entry["mask"] = pack_bits(nonzero)
    return entry


def decode(entry: dict[str, Any]) -> torch.Tensor:
    """The dense tensor of one :func:`encode` entry."""
    if entry["encoding"] == "dense":
        return entry["data"]
    values = entry["values"]
    flat = torch.zeros(math.prod(entry["shape"]), dtype=values.dtype)
    if entry["encoding"] == "coo":
        flat[entry["indices"].long()] = values
    else:
        flat[unpack_bits(entry["mask"], flat.numel())] = values
    return flat.view(entry["shape"])


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool vector -> uint8 bytes, element ``i`` in bit ``i % 8`` of byte ``i // 8``."""
    padded = torch.zeros(math.ceil(mask.numel() / 8) * 8, dtype=torch.uint8)
    padded[: mask.numel()] = mask
    return (padded.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.view(-1)[:numel].bool()


def resolve_source(source: str, tracking_uri: str, tmp: Path) -> Path:
    """The local checkpoint file of ``source``; a run's artifact is downloaded into ``tmp``."""
    path = Path(source)
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise ExportError(f"{path}: directory holds no {' or '.join(CHECKPOINT_NAMES)}")
    if path.is_file():
        return path
    if "/" in source or os.sep in source or "." in source:
        raise ExportError(f"{source}: no such checkpoint file or directory")
    return download_run_model(source, tracking_uri, tmp)


def download_run_model(run_id: str, tracking_uri: str, tmp: Path) -> Path:
    """Download run ``run_id``'s sparse export, or the ``model/model.pt`` of an older run; a
    missing run is a UserError (a missing store is refused before, by ``check_export``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from distrib_rda.terminal import quiet_mlflow

    quiet_mlflow()

    error_line = ""
    for artifact in (RUN_SPARSE_ARTIFACT, RUN_ARTIFACT):
        try:
            return Path(mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, tracking_uri=tracking_uri,
                dst_path=str(tmp)))
        except (MlflowException, OSError) as error:
            error_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise ExportError(f"{run_id}: no such file, and no MLflow run with an artifact "
                      f"{RUN_SPARSE_ARTIFACT} or {RUN_ARTIFACT} in {tracking_uri}: {error_line}")


def read_source(path: Path) -> tuple[dict[str, torch.Tensor], dict | None, dict | None,
                                     dict | None]:
    """The model state_dict, config, model arguments and preprocessing of a checkpoint, an
    older run's ``model.pt``, or a sparse export."""
    data = torch_load(path)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        state = {name: decode(entry) for name, entry in data["tensors"].items()}
        return state, data.get("config"), data.get("model_args"), data.get("preprocessing")
    state = data.get("model") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in state.items()
    ):
        raise ExportError(f"{path}: expected a dict whose 'model' is a state_dict of tensors")
    config = data.get("config")
    if config is not None and not isinstance(config, dict):
        raise ExportError(f"{path}: 'config' must be a dict, not {type(config).__name__}")
    return state, config, data.get("model_args"), data.get("preprocessing")


def write_atomic(payload: Any, out: Path, *, force: bool) -> None:
    """torch.save to a temp file beside ``out``, then rename; never clobber without ``force``."""
    with atomic_output(out, force=force) as tmp, open(tmp, "wb") as file:
        torch.save(payload, file)  # a file object: the same archive name whatever ``out``


class _ByteCounter:
    size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def count_nonzero(tensors: list[torch.Tensor]) -> int:
    return sum(int(t.count_nonzero()) for t in tensors)


def saved_size(obj: Any) -> int:
    """Bytes that ``torch.save(obj)`` writes, without keeping them."""
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.size
