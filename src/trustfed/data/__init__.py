"""Bundled offline datasets, local-folder loaders and seeded partitioners."""

from trustfed.data.datasets import LOADERS, Dataset, load_dataset, train_test_split
from trustfed.data.partition import PARTITIONERS, dirichlet, iid, partition, shards

__all__ = [
    "LOADERS",
    "PARTITIONERS",
    "Dataset",
    "dirichlet",
    "iid",
    "load_dataset",
    "partition",
    "shards",
    "train_test_split",
]
