"""Datasets: registered readers of official files, seeded subsets, augmentation and batching."""

from cardkit.data import builtin as _builtin  # noqa: F401  (registers the built-in datasets)
from cardkit.data.augment import Augmentation
from cardkit.data.loader import BatchLoader
from cardkit.data.registry import DatasetInfo, list_datasets, register_dataset
from cardkit.data.splits import ArrayDataset, DatasetSplits, load_dataset

__all__ = [
    "ArrayDataset",
    "Augmentation",
    "BatchLoader",
    "DatasetInfo",
    "DatasetSplits",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]
