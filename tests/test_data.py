"""distrib_rda.data on real FFCV files: conversion, loaders, ranks, cache, and bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from filelock import FileLock

from distrib_rda import cli
from distrib_rda.data import (
    DatasetMeta,
    DataSourceError,
    build_loaders,
    convert,
    ensure_converted,
    sources,
)
from distrib_rda.data.cache import cache_key, lock_file
from distrib_rda.data.convert import write_dataset
from distrib_rda.data.sources import Arrays, read_idx
from distrib_rda.errors import UserError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _generated(tmp: Path, *, num_train: int, num_test: int, shape=(7, 5, 3), seed=0) -> Path:
    """A converted dataset whose label is the sample's index, so every sample is identifiable."""
    rng = np.random.default_rng(seed)
    arrays = Arrays(
        rng.integers(0, 256, (num_train, *shape), dtype=np.uint8),
        np.arange(num_train, dtype=np.int64),
        rng.integers(0, 256, (num_test, *shape), dtype=np.uint8),
        np.arange(num_test, dtype=np.int64) % num_train,
        tuple(f"c{i}" for i in range(num_train)),
    )
    out = tmp / f"gen-{num_train}-{num_test}-{'x'.join(map(str, shape))}"
    write_dataset(arrays, out, dataset="generated", source="test arrays")
    np.savez(tmp / f"{out.name}.npz", train=arrays.train_images, test=arrays.test_images)
    return out


def _originals(beton_dir: Path) -> dict[str, np.ndarray]:
    data = np.load(beton_dir.parent / f"{beton_dir.name}.npz")
    return {"train": data["train"], "test": data["test"]}


def _pixels(images: torch.Tensor, meta: DatasetMeta) -> np.ndarray:
    """Undo the normalization: NCHW float back to NHWC uint8."""
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    restored = (images * std + mean).round().clamp(0, 255).to(torch.uint8)
    return restored.permute(0, 2, 3, 1).numpy()


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("shape", [(7, 5, 1), (6, 9, 3)], ids=["grey", "rgb"])
def test_every_pixel_and_label_round_trips(tmp_path, shape):
    beton_dir = _generated(tmp_path, num_train=40, num_test=13, shape=shape)
    original = _originals(beton_dir)
    meta = DatasetMeta.load(beton_dir)
    assert meta.shape == shape and (meta.num_train, meta.num_test) == (40, 13)
    flat = original["train"].reshape(-1, shape[2]).astype(np.float64)
    np.testing.assert_allclose(meta.mean, flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(meta.std, flat.std(axis=0), rtol=1e-12)

    loaders = build_loaders(beton_dir, batch_size=8, seed=0, augment=False)
    images, labels = [], []
    for x, y in loaders.test:
        assert x.dtype == torch.float32 and x.shape[1:] == (shape[2], shape[0], shape[1])
        assert x.is_contiguous() and y.dtype == torch.int64 and y.shape == (len(x),)
        images.append(_pixels(x, meta))
        labels.append(y.clone())
    np.testing.assert_array_equal(np.concatenate(images), original["test"])
    assert torch.cat(labels).tolist() == [i % 40 for i in range(13)]

    # Normalized values are exactly the float32 lookup (p - mean) / std.
    x, y = next(iter(loaders.train))
    expected = (original["train"][y.numpy()].astype(np.float64) - meta.mean) / meta.std
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), expected, rtol=1e-6, atol=1e-6)

    seen = [y.clone() for _, y in loaders.train]  # 40 = 5 batches of 8: nothing dropped
    assert sorted(torch.cat(seen).tolist()) == list(range(40))


def test_ffcv_keeps_the_callers_thread_count(tmp_path):
    beton_dir = _generated(tmp_path, num_train=32, num_test=8, shape=(4, 4, 1))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaders = build_loaders(beton_dir, batch_size=4, seed=0, num_workers=2)
        assert torch.get_num_threads() == 1
        for epoch in range(2):
            for _ in loaders.train:
                assert torch.get_num_threads() == 1, f"epoch {epoch}"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_numba_keeps_what_each_loader_compiled_in_its_disk_cache(tmp_path):
    """FFCV's typed dict (compiled at ``import ffcv``) and the normalizing kernel are kept in
    numba's on-disk cache: a second process (as each Ray worker is) loads them, compiling
    none of them again."""
    beton_dir = _generated(tmp_path, num_train=16, num_test=4, shape=(6, 6, 1))
    program = (
        "import sys; from distrib_rda.data import build_loaders; "
        "loaders = build_loaders(sys.argv[1], batch_size=4, seed=0); "
        "[None for _ in loaders.train]; "  # a whole epoch: FFCV's thread ends before exit
        "from numba.typed import typeddict; from distrib_rda.data.ops import normalize_to_chw; "
        "print([(sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values())) "
        "for d in (typeddict._make_dict, typeddict._setitem, normalize_to_chw)])")
    seen = []
    for _ in range(2):  # the first process may compile and write the cache, if it is empty
        done = subprocess.run([sys.executable, "-c", program, str(beton_dir)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        seen.append(done.stdout.strip())
    assert seen[1] == "[(1, 0), (1, 0), (1, 0)]", seen


def test_colour_32x32_is_cropped_and_flipped_by_default(tmp_path):
    beton_dir = _generated(tmp_path, num_train=24, num_test=4, shape=(32, 32, 3))
    original = _originals(beton_dir)["train"]
    loaders = build_loaders(beton_dir, batch_size=24, seed=0)  # augment=None: on for 32x32x3
    x, y = next(iter(loaders.train))
    got = _pixels(x, loaders.meta)
    changed = 0
    for image, label in zip(got, y.tolist(), strict=True):
        padded = np.pad(original[label], ((4, 4), (4, 4), (0, 0)))
        candidates = [
            view
            for dy in range(9) for dx in range(9)
            for view in (padded[dy:dy + 32, dx:dx + 32], padded[dy:dy + 32, dx:dx + 32][:, ::-1])
        ]
        assert any(np.array_equal(image, c) for c in candidates), f"sample {label}"
        changed += not np.array_equal(image, original[label])
    assert changed > 12  # 1 - 1/162 of them move; the test loader never does:
    x, y = next(iter(loaders.test))
    np.testing.assert_array_equal(_pixels(x, loaders.meta), _originals(beton_dir)["test"][:4])


def test_grey_is_not_augmented_by_default_and_can_be(tmp_path):
    beton_dir = _generated(tmp_path, num_train=16, num_test=4, shape=(12, 12, 1))
    original = _originals(beton_dir)["train"]
    plain = build_loaders(beton_dir, batch_size=16, seed=0)
    x, y = next(iter(plain.train))
    np.testing.assert_array_equal(_pixels(x, plain.meta), original[y.numpy()])
    augmented = build_loaders(beton_dir, batch_size=16, seed=0, augment=True)
    x, y = next(iter(augmented.train))
    assert not np.array_equal(_pixels(x, plain.meta), original[y.numpy()])


def test_subset_resume_and_small_datasets(tmp_path):
    beton_dir = _generated(tmp_path, num_train=50, num_test=5, shape=(3, 3, 1))
    first = build_loaders(beton_dir, batch_size=10, seed=5, num_workers=1)
    epochs = [torch.cat([y.clone() for _, y in first.train]).tolist() for _ in range(3)]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == list(range(50))
    resumed = build_loaders(beton_dir, batch_size=10, seed=5, start_epoch=2, num_workers=1)
    assert torch.cat([y.clone() for _, y in resumed.train]).tolist() == epochs[2]

    subset = build_loaders(beton_dir, batch_size=10, seed=5, subset=20, num_workers=1)
    assert sorted(torch.cat([y.clone() for _, y in subset.train]).tolist()) == list(range(20))
    assert subset.train.num_samples == 20 and len(subset.train) == 2

    # A dataset smaller than one batch is not dropped.
    tiny = build_loaders(beton_dir, batch_size=64, seed=5, num_workers=1)
    assert sorted(torch.cat([y.clone() for _, y in tiny.train]).tolist()) == list(range(50))
    with pytest.raises(UserError, match="subset"):
        build_loaders(beton_dir, batch_size=10, seed=5, subset=51)
    many = build_loaders(beton_dir, batch_size=10, seed=5, num_workers=os.cpu_count() + 2)
    assert len([y for _, y in many.test]) == 1


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="session")
def fashion_mnist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fashion") / "fashion-mnist"
    convert("fashion-mnist", out)
    return out


def test_fashion_mnist_counts_and_label_histogram(fashion_mnist):
    meta = DatasetMeta.load(fashion_mnist)
    assert (meta.num_train, meta.num_test, meta.shape) == (60000, 10000, (28, 28, 1))
    assert meta.classes[0] == "T-shirt/top" and meta.num_classes == 10
    assert "dataset-fashion-mnist" in meta.source
    loaders = build_loaders(fashion_mnist, batch_size=1000, seed=0)
    train = torch.cat([y.clone() for _, y in loaders.train])
    test = torch.cat([y.clone() for _, y in loaders.test])
    assert len(train) == 60000 and len(test) == 10000
    assert torch.bincount(train).tolist() == [6000] * 10
    assert torch.bincount(test).tolist() == [1000] * 10
    # The first test images are the IDX file's, pixel for pixel.
    x, _ = next(iter(loaders.test))
    idx = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[:1000]
    np.testing.assert_array_equal(_pixels(x, meta)[..., 0], idx)


# --------------------------------------------------------------------------- ranks

def _fork(target, args_per_process: list[tuple], timeout: float = 120) -> None:
    """Run ``target(*args)`` in forked processes (they inherit torch and ffcv already imported).

    The children use one FFCV thread (numba's threading layers are not fork-safe) and one
    torch thread.
    """
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=target, args=args) for args in args_per_process]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
    alive = [proc for proc in procs if proc.is_alive()]
    for proc in alive:
        proc.kill()
    assert not alive and [proc.exitcode for proc in procs] == [0] * len(procs)


def _rank(rank: int, world: int, init: str, beton: Path, out: Path, train: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        loaders = build_loaders(beton, batch_size=8, seed=7, num_workers=1)
        record = {"test": _labels(loaders.test), "test_samples": loaders.test.num_samples}
        if train:
            record["train"] = [_labels(loaders.train) for _ in range(2)]
            loaders.train.next_epoch = 1  # what build_loaders(start_epoch=1) sets
            record["resumed"] = _labels(loaders.train)
            subset = build_loaders(beton, batch_size=8, seed=7, subset=48, num_workers=1)
            record["subset"] = _labels(subset.train)
        out.write_text(json.dumps(record))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _labels(loader) -> list[int]:
    return [v for _, y in loader for v in y.tolist()]


def _run_ranks(tmp_path: Path, beton_dir: Path, world: int, train: bool) -> list[dict]:
    init = f"file://{tmp_path}/pg-{world}"
    outs = [tmp_path / f"rank{world}-{r}.json" for r in range(world)]
    _fork(_rank, [(r, world, init, beton_dir, outs[r], train) for r in range(world)])
    return [json.loads(out.read_text()) for out in outs]


def test_two_ranks_get_disjoint_train_shards_covering_the_train_set(tmp_path):
    beton_dir = _generated(tmp_path, num_train=64, num_test=25, shape=(4, 4, 3))
    ranks = _run_ranks(tmp_path, beton_dir, world=2, train=True)
    for epoch in range(2):
        shards = [set(rank["train"][epoch]) for rank in ranks]
        assert all(len(rank["train"][epoch]) == 32 for rank in ranks)
        assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(64))
    assert ranks[0]["train"][0] != ranks[0]["train"][1]  # reshuffled each epoch
    for rank in ranks:
        assert rank["resumed"] == rank["train"][1]
    subset = [set(rank["subset"]) for rank in ranks]
    assert not subset[0] & subset[1] and subset[0] | subset[1] == set(range(48))
    assert sorted(ranks[0]["test"] + ranks[1]["test"]) == list(range(25))


@pytest.mark.parametrize("world", [1, 3])
def test_evaluation_counts_every_test_image_once(tmp_path, world):
    beton_dir = _generated(tmp_path, num_train=30, num_test=25, shape=(4, 4, 1))
    if world == 1:
        loaders = build_loaders(beton_dir, batch_size=8, seed=0)
        ranks = [{"test": [v for _, y in loaders.test for v in y.tolist()]}]
    else:
        ranks = _run_ranks(tmp_path, beton_dir, world=world, train=False)
        assert [rank["test_samples"] for rank in ranks] == [9, 8, 8]
    assert sorted(v for rank in ranks for v in rank["test"]) == list(range(25))


# --------------------------------------------------------------------------- other sources


def _write_cifar(root: Path, per_batch: int = 6) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


def test_cifar10_in_torchvision_layout(tmp_path):
    _write_cifar(tmp_path / "root")
    meta = convert("cifar10", tmp_path / "out", data_root=tmp_path / "root")
    assert (meta.num_train, meta.num_test, meta.shape) == (30, 6, (32, 32, 3))
    assert meta.classes[-1] == "truck"
    batch = pickle.loads((tmp_path / "root/cifar-10-batches-py/test_batch").read_bytes())
    loaders = build_loaders(tmp_path / "out", batch_size=6, seed=0)
    x, y = next(iter(loaders.test))
    expected = batch["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(_pixels(x, meta), expected)
    assert y.tolist() == batch["labels"]


def test_mnist_in_torchvision_layout_gz_or_plain(tmp_path):
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for i, stem in enumerate(sources.IDX_STEMS):
        count = 12 if stem.startswith("train") else 5
        body = (np.arange(count * 4 * 4) % 256).astype(np.uint8) if "images" in stem else \
            (np.arange(count) % 10).astype(np.uint8)
        dims = (count, 4, 4) if "images" in stem else (count,)
        data = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
        data += body.tobytes()
        if i % 2:
            (raw / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (raw / stem).write_bytes(data)
    meta = convert("mnist", tmp_path / "out", data_root=tmp_path / "root")
    assert (meta.num_train, meta.num_test, meta.shape, meta.classes[3]) == (12, 5, (4, 4, 1), "3")


def _image_tree(root: Path, *, mode: str, split: bool) -> dict[str, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(2)
    images = {}
    for part in (["train", "test"] if split else [""]):
        for label in ("cat", "dog", "emu"):
            folder = root / part / label
            folder.mkdir(parents=True)
            for i in range(10 if part != "test" else 2):
                pixels = rng.integers(0, 256, (5, 6, 3) if mode == "RGB" else (5, 6),
                                      dtype=np.uint8)
                path = folder / f"{i:02d}.png"
                Image.fromarray(pixels, mode).save(path)
                images[str(path)] = pixels
    return images


def test_imagefolder_holds_out_the_last_tenth_of_each_class():
    files = [(Path(f"{label}/{i:02d}.png"), label) for label, n in enumerate((1, 4, 25))
             for i in range(n)]
    train, test = sources._hold_out(files)
    assert [str(path) for path, _ in test] == ["1/03.png", "2/23.png", "2/24.png"]
    assert sorted(train + test) == sorted(files)


@pytest.mark.parametrize("mode,split", [("RGB", False), ("L", True)])
def test_imagefolder(tmp_path, mode, split):
    images = _image_tree(tmp_path / "tree", mode=mode, split=split)
    meta = convert(f"imagefolder:{tmp_path / 'tree'}", tmp_path / "out")
    assert meta.classes == ("cat", "dog", "emu")
    assert meta.shape == (5, 6, 3 if mode == "RGB" else 1)
    assert (meta.num_train, meta.num_test) == ((27, 3) if not split else (30, 6))
    x, y = next(iter(build_loaders(tmp_path / "out", batch_size=8, seed=0).test))
    test_files = sorted(p for p in images if (not split and p.endswith("09.png")) or "/test/" in p)
    expected = np.stack([images[p].reshape(5, 6, -1) for p in test_files])
    np.testing.assert_array_equal(_pixels(x, meta), expected)
    assert y.tolist() == [["cat", "dog", "emu"].index(Path(p).parent.name) for p in test_files]


def test_imagefolder_of_mixed_sizes_is_refused_or_resized_to_the_size_named(tmp_path):
    from PIL import Image

    for label, sizes in (("cat", [(6, 6), (9, 5)]), ("dog", [(6, 6), (6, 6)])):
        (tmp_path / "tree" / label).mkdir(parents=True)
        for i, (height, width) in enumerate(sizes):
            Image.fromarray(np.full((height, width), 50 * i, np.uint8)).save(
                tmp_path / "tree" / label / f"{i}.png")
    dataset = f"imagefolder:{tmp_path / 'tree'}"
    with pytest.raises(DataSourceError, match=r"2 sizes .*6x6: 3 file.*5x9: 1 file.*--image-s"):
        convert(dataset, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    meta = convert(dataset, tmp_path / "out", image_size=4)
    assert meta.shape == (4, 4, 1)
    assert "4 of 4 images resized to 4x4 (--image-size 4)" in meta.source
    resized = sources.resolve_source(dataset, image_size=4)
    plain = sources.resolve_source(dataset)
    assert resized.peek().shape == (4, 4, 1)
    assert cache_key(resized) != cache_key(plain)  # another size, another cached copy


def test_a_dataset_of_one_class_is_refused(tmp_path):
    _image_tree(tmp_path / "tree", mode="L", split=False)
    for label in ("dog", "emu"):
        shutil.rmtree(tmp_path / "tree" / label)
    with pytest.raises(DataSourceError, match="one class, 'cat'; a classifier needs two"):
        sources.resolve_source(f"imagefolder:{tmp_path / 'tree'}")


def test_peek_reads_headers_only_and_agrees_with_the_conversion(tmp_path):
    _image_tree(tmp_path / "tree", mode="RGB", split=True)
    source = sources.resolve_source(f"imagefolder:{tmp_path / 'tree'}")
    facts = source.peek()
    meta = convert(f"imagefolder:{tmp_path / 'tree'}", tmp_path / "out")
    assert (facts.num_train, facts.num_test, facts.classes, facts.shape) == \
        (meta.num_train, meta.num_test, meta.classes, meta.shape)
    fashion = sources.resolve_source("fashion-mnist").peek()
    assert (fashion.num_train, fashion.num_test, fashion.shape) == (60000, 10000, (28, 28, 1))


# --------------------------------------------------------------------------- cache


def _convert_cached(dataset: str, cache: Path, out: Path) -> None:
    torch.set_num_threads(1)
    out.write_text(str(ensure_converted(dataset, cache_dir=cache)))


def test_ensure_converted_once_for_two_processes_then_reuses(tmp_path, capfd):
    _image_tree(tmp_path / "tree", mode="RGB", split=False)
    dataset, cache = f"imagefolder:{tmp_path / 'tree'}", tmp_path / "cache"
    cache.mkdir()
    outs = [tmp_path / f"worker{i}.txt" for i in range(2)]
    # Hold the lock while both workers start, so that they really contend for it.
    with FileLock(str(lock_file(cache, dataset))):
        context = multiprocessing.get_context("fork")
        procs = [context.Process(target=_convert_cached, args=(dataset, cache, out))
                 for out in outs]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + 60
        waiting = ""
        while waiting.count("waiting for another process") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            waiting += capfd.readouterr().err
        assert waiting.count("waiting for another process") == 2, waiting
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert sum("writing" in line for line in capfd.readouterr().err.splitlines()) == 2  # 2 files
    paths = {out.read_text() for out in outs}
    assert len(paths) == 1
    converted = Path(paths.pop())
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == \
        [converted.name]

    before = _digest(converted), (converted / "train.beton").stat().st_mtime_ns
    assert ensure_converted(dataset, cache_dir=cache) == converted
    assert (_digest(converted), (converted / "train.beton").stat().st_mtime_ns) == before

    os.utime(tmp_path / "tree" / "cat" / "00.png", ns=(1, 1))  # a changed source: a new key
    assert ensure_converted(dataset, cache_dir=cache) != converted


def test_ensure_converted_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _image_tree(tmp_path / "tree", mode="L", split=False)
    path = ensure_converted(f"imagefolder:{tmp_path / 'tree'}", cache_dir="~/cache")
    assert path.parent == tmp_path / "cache" and (path / "meta.json").is_file()


# --------------------------------------------------------------------------- bad input


def test_missing_sources_say_what_and_where(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataSourceError, match=r"MNIST/raw.*--download"):
        convert("mnist", tmp_path / "out", data_root=empty)
    with pytest.raises(DataSourceError, match=r"cifar-10-batches-py.*data_batch_1.*--download"):
        convert("cifar10", tmp_path / "out", data_root=empty)
    with pytest.raises(DataSourceError, match="cifar-100-python"):
        convert("cifar100", tmp_path / "out")
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "nothing")
    with pytest.raises(DataSourceError, match=r"apt-get install dataset-fashion-mnist") as error:
        convert("fashion-mnist", tmp_path / "out", data_root=empty)
    assert "t10k-labels-idx1-ubyte" in str(error.value) and str(empty) in str(error.value)
    with pytest.raises(DataSourceError, match=r"not a directory"):
        convert("imagefolder:" + str(tmp_path / "nowhere"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_idx_file_is_named(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in sources.IDX_STEMS:
        data = gzip.decompress((FASHION / f"{stem}.gz").read_bytes()) if "labels" in stem \
            else bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (9, 28, 28))
        (raw / stem).write_bytes(data)
    with pytest.raises(DataSourceError, match=r"train-images-idx3-ubyte is truncated"):
        convert("fashion-mnist", tmp_path / "out", data_root=tmp_path)
    assert not (tmp_path / "out").exists()


def test_unknown_dataset_lists_the_allowed_ones(tmp_path):
    allowed = r"'imagenet'.*fashion-mnist, mnist, cifar10, cifar100, imagefolder:PATH"
    with pytest.raises(DataSourceError, match=allowed):
        convert("imagenet", tmp_path / "out")


def test_corrupt_or_truncated_beton_is_named(tmp_path):
    good = _generated(tmp_path, num_train=20, num_test=5, shape=(4, 4, 3))
    train = good / "train.beton"
    size = train.stat().st_size

    header = tmp_path / "header"
    header.mkdir()
    for name in ("train.beton", "test.beton", "meta.json"):
        (header / name).write_bytes((good / name).read_bytes())
    with open(header / "train.beton", "r+b") as stream:
        stream.write(b"\xff" * 64)
    with pytest.raises(DataSourceError, match=rf"{header / 'train.beton'}.*not a readable"):
        build_loaders(header, batch_size=4, seed=0)

    short = tmp_path / "short"
    short.mkdir()
    for name in ("test.beton", "meta.json"):
        (short / name).write_bytes((good / name).read_bytes())
    (short / "train.beton").write_bytes(train.read_bytes()[: size // 2])
    with pytest.raises(DataSourceError, match=rf"{short / 'train.beton'}.*truncated"):
        build_loaders(short, batch_size=4, seed=0)

    # Without the size in meta.json, FFCV's header and tables give the truncation away.
    meta = json.loads((short / "meta.json").read_text())
    meta["file_bytes"] = {}
    (short / "meta.json").write_text(json.dumps(meta))
    for cut in (size // 2, size - 1):
        (short / "train.beton").write_bytes(train.read_bytes()[:cut])
        with pytest.raises(DataSourceError, match=rf"{short / 'train.beton'}.*convert it again"):
            build_loaders(short, batch_size=4, seed=0)

    (short / "meta.json").unlink()
    with pytest.raises(DataSourceError, match=r"meta.json not found"):
        build_loaders(short, batch_size=4, seed=0)


def test_existing_output_is_never_changed_without_force(tmp_path):
    out = _generated(tmp_path, num_train=12, num_test=3, shape=(2, 2, 1))
    _write_cifar(tmp_path / "root")
    before = _digest(out)
    with pytest.raises(DataSourceError, match=r"already exist.*--force"):
        convert("cifar10", out, data_root=tmp_path / "root")
    assert _digest(out) == before
    # A failing forced conversion changes nothing either.
    with pytest.raises(DataSourceError):
        convert("cifar10", out, data_root=tmp_path / "missing", force=True)
    assert _digest(out) == before
    meta = convert("cifar10", out, data_root=tmp_path / "root", force=True)
    assert meta.num_train == 30 and DatasetMeta.load(out).num_train == 30
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.beton", "train.beton"]


def test_cli_convert_exits_2_on_bad_input(tmp_path, capsys):
    assert cli.main(["data", "convert", "imagenet", "--out", str(tmp_path / "o")]) == 2
    assert "unknown dataset 'imagenet'" in capsys.readouterr().err
    out = _generated(tmp_path, num_train=4, num_test=2, shape=(2, 2, 1))
    before = _digest(out)
    assert cli.main(["data", "convert", "fashion-mnist", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and _digest(out) == before
