"""Bundled offline datasets, loaders for local data and seeded partitioners."""

from trustfed.data.datasets import LOADERS, Dataset, load_dataset, train_test_split
from trustfed.data.loaders import load_hf_dataset, load_image_folder, load_jsonl, load_table
from trustfed.data.partition import PARTITIONERS, dirichlet, iid, partition, shards

__all__ = [
    "LOADERS",
    "PARTITIONERS",
    "Dataset",
    "dirichlet",
    "iid",
    "load_dataset",
    "load_hf_dataset",
    "load_image_folder",
    "load_jsonl",
    "load_table",
    "partition",
    "shards",
    "train_test_split",
]
