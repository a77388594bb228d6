"""Datasets and batching."""

from softkd.data.datasets import DATASETS, ArrayDataset, Splits, build_dataset, keep_labels
from softkd.data.loader import build_loader

__all__ = ["DATASETS", "ArrayDataset", "Splits", "build_dataset", "build_loader", "keep_labels"]
