"""Long-tailed data: datasets, seedable DDP-aware samplers, and DALI / torch loaders."""

from fastlt.data.base import LongTailedDataset, exponential_counts
from fastlt.data.cifar import CIFAR10LT, CIFAR100LT, CIFARLT
from fastlt.data.fashion_mnist import FashionMNISTLT
from fastlt.data.listfile import ListFileDataset
from fastlt.data.loaders import make_loader
from fastlt.data.mnist import DigitsLT, MNISTLT
from fastlt.data.sampling import LongTailSampler, epoch_indices
from fastlt.data.splits import shot_split

__all__ = [
    "CIFAR10LT",
    "CIFAR100LT",
    "CIFARLT",
    "DigitsLT",
    "FashionMNISTLT",
    "LongTailSampler",
    "ListFileDataset",
    "LongTailedDataset",
    "MNISTLT",
    "epoch_indices",
    "exponential_counts",
    "make_loader",
    "shot_split",
]
