"""Export a trained model's non-zeros: ``distrib-rda export SOURCE --out FILE``.

SOURCE is a checkpoint file (``checkpoint.pt``, ``model.pt``), a Ray checkpoint directory holding
``checkpoint.pt``, or an MLflow run id whose artifact ``model/model.pt`` is downloaded. Either way
it is a dict ``{"model": state_dict, "config": {...}, ...}`` read with
``torch.load(weights_only=True)``: a file that holds pickled code or objects is refused.

The output is a plain ``torch.save`` file that ``torch.load(weights_only=True)`` reads::

    {"format": "distrib-rda-sparse/1", "config": {...}, "tensors": {name: entry}}

where each entry stores a tensor ``w`` with ``n`` elements, ``k`` of them non-zero, in the
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

from distrib_rda.errors import UserError
from distrib_rda.safe_load import torch_load

FORMAT = "distrib-rda-sparse/1"
RUN_ARTIFACT = "model/model.pt"
CHECKPOINT_NAMES = ("checkpoint.pt", "model.pt")
# What a second stored tensor adds to a torch.save file besides its bytes (zip entry, pickle).
RECORD_BYTES = 256


class ExportError(UserError):
    """A source that cannot be exported, or an output that must not be written."""


def export_sparse(source: str | os.PathLike, out: str | os.PathLike, *,
                  tracking_uri: str = "sqlite:///mlflow.db", force: bool = False) -> dict[str, Any]:
    """Write the non-zeros of ``source``'s model to ``out``; print and return the sizes.

    Returns ``{"source", "out", "file_bytes", "dense_bytes", "ratio", "nonzeros", "numel",
    "weight_nonzeros", "weight_numel", "weight_density"}``: ``dense_bytes`` is the size of
    ``torch.save(state_dict)``, ``ratio = dense_bytes / file_bytes``; ``nonzeros`` and ``numel``
    count every floating tensor, the ``weight_*`` keys the tensors of 2 or more dimensions (the
    conv and linear weights), ``weight_density = weight_nonzeros / weight_numel``.
    """
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out}: is a directory; give a file name")
    if out.exists() and not force:
        raise ExportError(f"--out {out}: already exists; pass --force to overwrite it")
    with tempfile.TemporaryDirectory() as tmp:
        path = resolve_source(str(source), tracking_uri, Path(tmp))
        state, config, model_args = read_checkpoint(path)
    tensors = {name: encode(tensor) for name, tensor in state.items()}
    write_atomic({"format": FORMAT, "config": config, "model_args": model_args,
                  "tensors": tensors}, out, force=force)

    floats = [t for t in state.values() if t.is_floating_point()]
    weights = [t for t in floats if t.dim() >= 2]
    report = {
        "source": str(source), "out": str(out),
        "file_bytes": out.stat().st_size, "dense_bytes": saved_size(state),
        "nonzeros": count_nonzero(floats), "numel": sum(t.numel() for t in floats),
        "weight_nonzeros": count_nonzero(weights), "weight_numel": sum(t.numel() for t in weights),
    }
    report["ratio"] = report["dense_bytes"] / report["file_bytes"]
    report["weight_density"] = report["weight_nonzeros"] / max(report["weight_numel"], 1)
    print(f"exported {source} -> {out}\n"
          f"  conv/linear weights: {report['weight_nonzeros']:,} non-zeros of "
          f"{report['weight_numel']:,} ({report['weight_density']:.2%})\n"
          f"  all tensors: {report['nonzeros']:,} non-zeros of {report['numel']:,} values\n"
          f"  size: {report['file_bytes']:,} bytes sparse vs {report['dense_bytes']:,} dense "
          f"({report['ratio']:.2f}x smaller)")
    return report


def load_sparse_model(path: str | os.PathLike) -> torch.nn.Module:
    """Rebuild the dense model of an export made from a training checkpoint or run."""
    from distrib_rda.models import build_model

    state, config = load_sparse(path)
    model_args = torch_load(Path(path)).get("model_args")
    if not config or not model_args:
        raise ExportError(f"{path}: holds no model config; rebuild the model yourself and "
                          "load the state_dict from load_sparse()")
    model = build_model(config["model"], **model_args)
    model.load_state_dict(state)
    return model


def load_sparse(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The dense state_dict and the config of a file written by :func:`export_sparse`."""
    data = torch_load(Path(path))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExportError(f"{path}: not a sparse export (expected format {FORMAT!r})")
    return {name: decode(entry) for name, entry in data["tensors"].items()}, data["config"]


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
    """Download run ``run_id``'s ``model/model.pt``; a missing store or run is a UserError."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[10:]).is_file():
        raise ExportError(f"{run_id}: no such file, and no MLflow store at {tracking_uri} "
                          "to look the run up in (pass --tracking-uri)")
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=RUN_ARTIFACT, tracking_uri=tracking_uri, dst_path=str(tmp))
    except (MlflowException, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(f"{run_id}: no such file, and no MLflow run with an artifact "
                          f"{RUN_ARTIFACT} in {tracking_uri}: {first_line}") from None
    return Path(local)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None, dict | None]:
    """The model state_dict, config and model arguments of a checkpoint or run-model file."""
    data = torch_load(path)
    state = data.get("model") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in state.items()
    ):
        raise ExportError(f"{path}: expected a dict whose 'model' is a state_dict of tensors")
    config = data.get("config")
    if config is not None and not isinstance(config, dict):
        raise ExportError(f"{path}: 'config' must be a dict, not {type(config).__name__}")
    return state, config, data.get("model_args")


def write_atomic(payload: Any, out: Path, *, force: bool) -> None:
    """torch.save to a temp file beside ``out``, then rename; never clobber without ``force``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:  # a file object: the same archive name whatever ``out``
            torch.save(payload, file)
        if force:
            os.replace(tmp, out)
        else:
            os.link(tmp, out)  # fails if ``out`` appeared meanwhile
    except FileExistsError:
        raise ExportError(f"--out {out}: already exists; pass --force to overwrite it") from None
    finally:
        tmp.unlink(missing_ok=True)


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
