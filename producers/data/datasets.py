"""Image datasets for the producer. Pixels are float32 in [0, 1]; normalisation belongs to the model.

An `ImageSet` keeps labels in memory and loads images by index, so a large image folder (ImageNet's
validation set) is never held in memory whole.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ProducerError


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
                   tuple(images.shape[1:]), lambda idx: images[torch.tensor(idx, dtype=torch.long)])

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


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist/"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned bytes, 3 and 1 dimensions


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """The uint8 array in the IDX file `path` (gzip'd when it ends in ``.gz``), checked against `magic`.

    An IDX file is a big-endian int32 magic number (0x0000 <type> <ndim>), ``ndim`` big-endian int32
    sizes, then the data. A wrong magic number or a size that disagrees with the data raises
    ProducerError naming the file.
    """
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a cut-off gzip an EOFError
        raise ProducerError(f"cannot read IDX file {path}: {exc}") from None
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise ProducerError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than its header")
    found, *shape = (int(v) for v in np.frombuffer(raw, dtype=">u4", count=1 + ndim))
    if found != magic:
        raise ProducerError(f"{path} is not an MNIST-format IDX file: magic number 0x{found:08x}, "
                            f"expected 0x{magic:08x}")
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ProducerError(f"IDX file {path} is corrupt or truncated: its header promises shape "
                            f"{tuple(shape)} ({expected} bytes of data) but it holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str, install_hint: str) -> Path:
    # Distributions name the files "train-images-idx3-ubyte" or "train-images.idx3-ubyte", gzip'd or not.
    prefix, kind = stem.split("-idx", 1)
    for name in (stem, f"{prefix}.idx{kind}"):
        for candidate in (root / f"{name}.gz", root / name):
            if candidate.is_file():
                return candidate
    raise ProducerError(f"{root / stem}(.gz) not found; {install_hint}")


def load_idx_set(name: str, split: str, root: str | os.PathLike, class_names: list[str], *,
                 install_hint: str) -> ImageSet:
    """Split ``train`` or ``test`` (``t10k-*``) of an MNIST-format IDX directory.

    Images are kept as uint8 (N, 1, H, W), a quarter of float32's memory, and scaled to [0, 1] per batch.
    """
    root = Path(root)
    if not root.is_dir():
        raise ProducerError(f"dataset directory {root} does not exist; {install_hint}")
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte", install_hint)
    labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte", install_hint)
    images = read_idx(images_path, _IDX_IMAGES_MAGIC)[:, None]
    labels = read_idx(labels_path, _IDX_LABELS_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise ProducerError(f"{images_path} holds {len(images)} images but {labels_path} "
                            f"holds {len(labels)} labels")
    if len(labels) and labels.max() >= len(class_names):
        raise ProducerError(f"{labels_path} holds label {labels.max()}, but {name} has only "
                            f"{len(class_names)} classes")

    def load(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images[np.asarray(idx, dtype=np.int64)]).float().div_(255.0)

    return ImageSet(name, split, labels, list(class_names), tuple(images.shape[1:]), load)


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> ImageSet:
    """Fashion-MNIST from IDX files; by default those of Debian's ``dataset-fashion-mnist`` package."""
    hint = ("install it with `apt-get install dataset-fashion-mnist` "
            "(or pass --root with any MNIST-format IDX directory)")
    return load_idx_set("fashion-mnist", split, root or FASHION_MNIST_ROOT, FASHION_MNIST_CLASSES,
                        install_hint=hint)


def load_mnist(split: str, root: str | os.PathLike | None = None) -> ImageSet:
    """Any MNIST-format IDX directory (digit classes 0-9); `root` is required."""
    hint = ("pass --root with a directory holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (optionally .gz)")
    if root is None:
        raise ProducerError(f"dataset 'mnist' needs a root directory: {hint}")
    return load_idx_set("mnist", split, root, [str(i) for i in range(10)], install_hint=hint)


# torchvision's ImageFolder extensions, so the same trees load with or without torchvision.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_image_folder(split: str, root: str | os.PathLike | None, *, resize_size: int = 256,
                      crop_size: int = 224) -> ImageSet:
    """A class-per-folder tree (``root/<class>/<image>``, ImageNet's validation layout), read lazily.

    ``root/train`` and ``root/test`` are the splits. A tree without split folders (``root/<class>/…``, as
    ImageNet's validation set ships) is the **test split only**: serving the same images as ``train`` too
    would let a detector calibrate on the rows it is evaluated on, so ``train`` is refused there (export
    such a tree with ``--splits test``). A tree with one split folder but not the other is refused. Class names are the sorted folder names, so
    ImageNet's folders (wnids) map to the usual 1000 class indices. Each image is converted to RGB, its
    shorter side resized to `resize_size` (bilinear, antialiased), then centre-cropped to `crop_size`.

    Written with Pillow rather than torchvision's ImageFolder + transforms: the pipeline is a few lines,
    and torchvision wheels from PyPI fail to import beside a CPU-only torch, while Pillow always works.
    The resize and crop arithmetic follows torchvision's ``Resize`` and ``CenterCrop`` on PIL images.
    """
    try:
        from PIL import Image
    except ImportError:
        raise ProducerError("dataset 'imagefolder' needs Pillow: pip install 'logitguard[vision]'") from None
    if root is None:
        raise ProducerError("dataset 'imagefolder' needs a root directory (--root) with one folder per class")
    if crop_size > resize_size:
        raise ProducerError(f"crop_size {crop_size} is larger than resize_size {resize_size}")
    root = Path(root)
    if not root.is_dir():
        raise ProducerError(f"image folder {root} does not exist")
    root = _split_folder(root, split)
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not class_names:
        raise ProducerError(f"image folder {root} has no class folders (expected {root}/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        for folder, subfolders, files in sorted(os.walk(root / name, followlinks=True)):
            subfolders.sort()
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(folder, file))
                    labels.append(label)
    if not paths:
        raise ProducerError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) "
                            f"in its {len(class_names)} class folders")

    def load_one(path: str) -> torch.Tensor:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except OSError as exc:  # PIL's UnidentifiedImageError is an OSError
            raise ProducerError(f"cannot read image {path}: {exc}") from None
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(resize_size * long / short)
        img = img.resize((resize_size, new_long) if w <= h else (new_long, resize_size), Image.BILINEAR)
        w, h = img.size
        top, left = int(round((h - crop_size) / 2.0)), int(round((w - crop_size) / 2.0))
        img = img.crop((left, top, left + crop_size, top + crop_size))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def load(idx: np.ndarray) -> torch.Tensor:
        images = [load_one(paths[i]) for i in np.asarray(idx, dtype=np.int64)]
        if not images:
            return torch.empty((0, 3, crop_size, crop_size))
        return torch.stack(images).float().div_(255.0)

    return ImageSet("imagefolder", split, np.asarray(labels, dtype=np.int64), class_names,
                    (3, crop_size, crop_size), load)


def _split_folder(root: Path, split: str) -> Path:
    """The folder holding `split`'s class folders (see `load_image_folder`); ProducerError where it has none."""
    present = [name for name in ("train", "test") if (root / name).is_dir()]
    if split in present:
        return root / split
    if present:
        raise ProducerError(f"image folder {root} has {root / present[0]} but no {root / split}: give each split "
                            f"its own folder ({root}/train/<class>/…, {root}/test/<class>/…)")
    if split == "test":
        return root
    raise ProducerError(f"image folder {root} has no split folders, so it is the test split only (the same images "
                        f"as train would put the evaluated rows in the training ones): export it with --splits test, "
                        f"or make {root}/train and {root}/test")


# name -> loader(split, root) ; root is None for datasets that need no files (or have a default).
DATASETS: dict[str, Callable[..., ImageSet]] = {
    "digits": lambda split, root=None: load_digits_set(split),
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "imagefolder": load_image_folder,
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
