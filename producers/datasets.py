"""Image datasets for the producer. Pixels are float32 in [0, 1]; normalisation belongs to the model.

An `ImageSet` keeps labels in memory and loads images by index, so a large image folder (ImageNet's
validation set) is never held in memory whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ProducerError


@dataclass(frozen=True)
class ImageSet:
    """One split of an image-classification dataset.

    Attributes
    ----------
    name : dataset name (``digits``, ``fashion-mnist``, …).
    split : ``train`` or ``test``.
    labels : int64 array of shape (N,).
    class_names : C names.
    image_shape : (channels, height, width).
    load : maps an int array of indices (B,) to a float32 tensor (B, channels, height, width) in [0, 1].
    """

    name: str
    split: str
    labels: np.ndarray
    class_names: list[str]
    image_shape: tuple[int, int, int]
    load: Callable[[np.ndarray], torch.Tensor]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def in_memory(cls, name: str, split: str, images: torch.Tensor, labels: np.ndarray,
                  class_names: list[str]) -> ImageSet:
        """An ImageSet over a tensor of shape (N, channels, height, width) already in [0, 1]."""
        images = images.float().contiguous()
        return cls(name, split, np.asarray(labels, dtype=np.int64), list(class_names),
                   tuple(images.shape[1:]), lambda idx: images[torch.as_tensor(idx, dtype=torch.long)])

    def all_images(self) -> torch.Tensor:
        return self.load(np.arange(len(self)))


def load_digits_set(split: str, *, test_fraction: float = 0.2) -> ImageSet:
    """scikit-learn's 8x8 digits (always available), split deterministically: the last 20% is ``test``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    n_test = int(round(len(images) * test_fraction))
    rows = slice(0, len(images) - n_test) if split == "train" else slice(len(images) - n_test, None)
    return ImageSet.in_memory("digits", split, images[rows], digits.target[rows], [str(i) for i in range(10)])


# name -> loader(split, root) ; root is None for datasets that need no files.
DATASETS: dict[str, Callable[..., ImageSet]] = {
    "digits": lambda split, root=None: load_digits_set(split),
}


def load_dataset(name: str, split: str, *, root: str | None = None) -> ImageSet:
    """Load split ``train`` or ``test`` of dataset `name` (see `DATASETS`)."""
    if split not in ("train", "test"):
        raise ProducerError(f"split must be 'train' or 'test', got {split!r}")
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ProducerError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None
    return loader(split, root)
