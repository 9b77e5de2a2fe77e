"""Bundled offline datasets, loaders for local data, data manifests and seeded partitioners."""

from trustfed.data.datasets import LOADERS, Dataset, load_dataset, train_test_split
from trustfed.data.loaders import load_hf_dataset, load_image_folder, load_jsonl, load_table
from trustfed.data.manifest import data_manifest, manifest_hash
from trustfed.data.partition import PARTITIONERS, dirichlet, iid, partition, shards

__all__ = [
    "LOADERS",
    "PARTITIONERS",
    "Dataset",
    "data_manifest",
    "dirichlet",
    "iid",
    "load_dataset",
    "load_hf_dataset",
    "load_image_folder",
    "load_jsonl",
    "load_table",
    "manifest_hash",
    "partition",
    "shards",
    "train_test_split",
]
