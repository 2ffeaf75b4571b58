"""Producer datasets: digits, Fashion-MNIST / MNIST-format IDX directories and class-per-folder image trees."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from producers.data.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, load_dataset
from producers.errors import ProducerError

FASHION_HINT = ("install it with `apt-get install dataset-fashion-mnist` "
                "(or pass --root with any MNIST-format IDX directory)")


def raises_exactly(message: str):
    return pytest.raises(ProducerError, match=f"^{re.escape(message)}$")


# --- digits ---------------------------------------------------------------------------------------

def test_digits_split_sizes_and_range():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1438, 359)
    for data in (train, test):
        images = data.all_images()
        assert images.shape == (len(data), 1, 8, 8) and images.dtype == torch.float32
        assert 0.0 <= images.min() and images.max() <= 1.0
        assert data.image_shape == (1, 8, 8) and data.num_classes == 10
        assert set(np.unique(data.labels)) == set(range(10))


def test_unknown_dataset_and_split():
    with raises_exactly("unknown dataset 'cifar'; known: ['digits', 'fashion-mnist', 'imagefolder', 'mnist']"):
        load_dataset("cifar", "train")
    with raises_exactly("split must be 'train' or 'test', got 'val'"):
        load_dataset("digits", "val")


# --- Fashion-MNIST on the real files ---------------------------------------------------------------

fashion_files = pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT).is_dir(),
    reason=f"{FASHION_MNIST_ROOT} is absent (apt-get install dataset-fashion-mnist)")


@fashion_files
def test_fashion_mnist_real_files():
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.image_shape == test.image_shape == (1, 28, 28)
    assert train.class_names == FASHION_MNIST_CLASSES and train.class_names[9] == "Ankle boot"
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    assert train.labels[0] == 9 and test.labels[:3].tolist() == [9, 2, 1]
    images = test.all_images()
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() == 0.0 and images.max() == 1.0
    batch = train.load(np.array([59999, 0, 7]))
    assert batch.shape == (3, 1, 28, 28)
    torch.testing.assert_close(batch[1], train.load(np.array([0]))[0], rtol=0, atol=0)


# --- MNIST-format IDX round trip and errors on tiny files the tests write ---------------------------

def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None) -> Path:
    """`array` (uint8) as an IDX file; gzip'd when `path` ends in .gz."""
    magic = 0x0800 | array.ndim if magic is None else magic
    raw = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.fixture
def idx_dir(tmp_path):
    """Non-square 5x3 images: train gzip'd (6 images), test plain (4 images); returns dir and arrays."""
    rng = np.random.default_rng(0)
    arrays = {"train": (rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), np.array([0, 1, 2, 9, 9, 3], np.uint8)),
              "test": (rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), np.array([5, 4, 3, 2], np.uint8))}
    for split, prefix, ext in (("train", "train", ".gz"), ("test", "t10k", "")):
        images, labels = arrays[split]
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return tmp_path, arrays


@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_idx_round_trip(idx_dir, split):
    root, arrays = idx_dir
    data = load_dataset("mnist", split, root=str(root))
    images, labels = arrays[split]
    assert data.name == "mnist" and data.split == split
    assert data.image_shape == (1, 5, 3) and data.class_names == [str(i) for i in range(10)]
    np.testing.assert_array_equal(data.labels, labels)
    assert data.labels.dtype == np.int64
    loaded = data.all_images()
    assert loaded.shape == (len(labels), 1, 5, 3) and loaded.dtype == torch.float32
    np.testing.assert_array_equal(loaded[:, 0].numpy(), images.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(data.load(np.array([2, 0]))[:, 0].numpy(), images[[2, 0]] / np.float32(255))


def test_fashion_mnist_reads_any_idx_root_and_dotted_names(idx_dir):
    root, arrays = idx_dir
    for kind in ("images-idx3", "labels-idx1"):  # the "t10k-images.idx3-ubyte" spelling of some mirrors
        name, idx_kind = kind.split("-")
        (root / f"t10k-{kind}-ubyte").rename(root / f"t10k-{name}.{idx_kind}-ubyte")
    data = load_dataset("fashion-mnist", "test", root=str(root))
    assert data.class_names == FASHION_MNIST_CLASSES
    np.testing.assert_array_equal(data.labels, arrays["test"][1])


def test_idx_missing_directory_and_files(tmp_path):
    missing = tmp_path / "nowhere"
    with raises_exactly(f"dataset directory {missing} does not exist; {FASHION_HINT}"):
        load_dataset("fashion-mnist", "train", root=str(missing))
    with raises_exactly(f"{tmp_path / 'train-images-idx3-ubyte'}(.gz) not found; {FASHION_HINT}"):
        load_dataset("fashion-mnist", "train", root=str(tmp_path))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 4, 4), np.uint8))
    with raises_exactly(f"{tmp_path / 't10k-labels-idx1-ubyte'}(.gz) not found; {FASHION_HINT}"):
        load_dataset("fashion-mnist", "test", root=str(tmp_path))
    mnist_hint = ("pass --root with a directory holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                  "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (optionally .gz)")
    with raises_exactly(f"dataset 'mnist' needs a root directory: {mnist_hint}"):
        load_dataset("mnist", "train")


def test_idx_corrupt_files(idx_dir):
    root, _ = idx_dir
    images, labels = root / "t10k-images-idx3-ubyte", root / "t10k-labels-idx1-ubyte"

    write_idx(images, np.zeros((4, 5, 3), np.uint8), magic=0x0801)  # a labels magic on an images file
    with raises_exactly(f"{images} is not an MNIST-format IDX file: magic number 0x00000801, expected 0x00000803"):
        load_dataset("mnist", "test", root=str(root))

    images.write_bytes(struct.pack(">IIII", 0x0803, 4, 5, 3) + bytes(59))  # one byte short
    with raises_exactly(f"IDX file {images} is corrupt or truncated: its header promises shape (4, 5, 3) "
                        "(60 bytes of data) but it holds 59"):
        load_dataset("mnist", "test", root=str(root))

    images.write_bytes(b"\x00\x00\x08")
    with raises_exactly(f"IDX file {images} is truncated: 3 bytes, shorter than its header"):
        load_dataset("mnist", "test", root=str(root))

    write_idx(images, np.zeros((3, 5, 3), np.uint8))
    with raises_exactly(f"{images} holds 3 images but {labels} holds 4 labels"):
        load_dataset("mnist", "test", root=str(root))

    write_idx(images, np.zeros((4, 5, 3), np.uint8))
    write_idx(labels, np.array([0, 1, 10, 2], np.uint8))
    with raises_exactly(f"{labels} holds label 10, but mnist has only 10 classes"):
        load_dataset("mnist", "test", root=str(root))

    gz = root / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-20])
    with raises_exactly(f"cannot read IDX file {gz}: Compressed file ended before the end-of-stream marker "
                        "was reached"):
        load_dataset("mnist", "train", root=str(root))
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(ProducerError, match=f"^cannot read IDX file {re.escape(str(gz))}: Not a gzipped file"):
        load_dataset("mnist", "train", root=str(root))


# --- class-per-folder image trees ------------------------------------------------------------------

COLOURS = {"cat": (255, 0, 0), "dog": (0, 128, 255), "emu": (10, 200, 30)}


@pytest.fixture
def image_tree(tmp_path):
    """3 classes x 2 solid-colour PNGs of non-square sizes (one RGB, one RGBA), plus a non-image file."""
    pil = pytest.importorskip("PIL.Image")
    for name, colour in COLOURS.items():
        (tmp_path / name).mkdir()
        pil.new("RGB", (40, 30), colour).save(tmp_path / name / "a.png")
        pil.new("RGBA", (25, 50), (*colour, 255)).save(tmp_path / name / "b.PNG")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def test_imagefolder_shapes_labels_and_pixels(image_tree):
    from producers.data.datasets import load_image_folder

    data = load_image_folder("test", str(image_tree), resize_size=20, crop_size=16)
    assert data.class_names == ["cat", "dog", "emu"] and data.name == "imagefolder"
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1, 2, 2])
    assert data.image_shape == (3, 16, 16)
    images = data.all_images()
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    for i, colour in enumerate(COLOURS.values()):  # a solid colour survives resizing and cropping exactly
        expected = torch.tensor(colour, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 16, 16)
        torch.testing.assert_close(images[2 * i], expected, rtol=0, atol=0)
        torch.testing.assert_close(images[2 * i + 1], expected, rtol=0, atol=0)
    assert data.load(np.array([], dtype=np.int64)).shape == (0, 3, 16, 16)


def test_imagefolder_prefers_the_split_folder_and_defaults_to_224(image_tree):
    pil = pytest.importorskip("PIL.Image")
    (image_tree / "train" / "zebra").mkdir(parents=True)
    pil.new("L", (300, 260), 77).save(image_tree / "train" / "zebra" / "z.png")
    data = load_dataset("imagefolder", "train", root=str(image_tree))
    assert data.class_names == ["zebra"] and data.image_shape == (3, 224, 224)
    image = data.all_images()
    assert image.shape == (1, 3, 224, 224)
    torch.testing.assert_close(image, torch.full((1, 3, 224, 224), 77 / 255), rtol=0, atol=0)
    # train/ but no test/: the root's other folders are not a test split (nor is train/ a class of it).
    with raises_exactly(f"image folder {image_tree} has {image_tree / 'train'} but no {image_tree / 'test'}: give "
                        f"each split its own folder ({image_tree}/train/<class>/…, {image_tree}/test/<class>/…)"):
        load_dataset("imagefolder", "test", root=str(image_tree))
    (image_tree / "test" / "yak").mkdir(parents=True)
    pil.new("L", (30, 30), 5).save(image_tree / "test" / "yak" / "y.png")
    assert load_dataset("imagefolder", "test", root=str(image_tree)).class_names == ["yak"]


def test_imagefolder_without_split_folders_is_the_test_split_only(image_tree):
    """A flat class-per-folder tree must not serve the same images as train and test."""
    test = load_dataset("imagefolder", "test", root=str(image_tree))
    assert test.class_names == ["cat", "dog", "emu"] and len(test) == 6
    with raises_exactly(f"image folder {image_tree} has no split folders, so it is the test split only (the same "
                        f"images as train would put the evaluated rows in the training ones): export it with "
                        f"--splits test, or make {image_tree}/train and {image_tree}/test"):
        load_dataset("imagefolder", "train", root=str(image_tree))


def test_imagefolder_matches_torchvision_transforms(image_tree):
    """Same pixels as torchvision's Resize(20) + CenterCrop(16) + ToTensor on a textured image."""
    from producers.models.classifiers import import_torchvision

    try:
        tv = import_torchvision()
    except ProducerError as exc:
        pytest.skip(str(exc))
    from PIL import Image

    from producers.data.datasets import load_image_folder

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)).save(image_tree / "dog" / "c.png")
    data = load_image_folder("test", str(image_tree), resize_size=20, crop_size=16)
    index = [i for i, label in enumerate(data.labels) if label == 1][-1]
    transform = tv.transforms.Compose([tv.transforms.Resize(20), tv.transforms.CenterCrop(16),
                                       tv.transforms.ToTensor()])
    with Image.open(image_tree / "dog" / "c.png") as img:
        expected = transform(img.convert("RGB"))
    torch.testing.assert_close(data.load(np.array([index]))[0], expected, rtol=0, atol=0)


def test_imagefolder_errors(tmp_path):
    from producers.data.datasets import load_image_folder

    pytest.importorskip("PIL.Image")
    with raises_exactly("dataset 'imagefolder' needs a root directory (--root) with one folder per class"):
        load_dataset("imagefolder", "test")
    with raises_exactly(f"image folder {tmp_path / 'none'} does not exist"):
        load_dataset("imagefolder", "test", root=str(tmp_path / "none"))
    with raises_exactly(f"image folder {tmp_path} has no class folders (expected {tmp_path}/<class>/<image>)"):
        load_dataset("imagefolder", "test", root=str(tmp_path))
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.md").write_text("no images here")
    with raises_exactly(f"image folder {tmp_path} holds no images (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, "
                        ".tiff, .webp) in its 1 class folders"):
        load_dataset("imagefolder", "test", root=str(tmp_path))
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    data = load_dataset("imagefolder", "test", root=str(tmp_path))
    with pytest.raises(ProducerError, match=f"^cannot read image {re.escape(str(tmp_path / 'cat' / 'broken.png'))}: "):
        data.load(np.array([0]))
    with raises_exactly("crop_size 300 is larger than resize_size 256"):
        load_image_folder("test", str(tmp_path), crop_size=300)
