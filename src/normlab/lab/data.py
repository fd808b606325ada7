"""Datasets for the lab, all read or generated locally -- nothing is ever downloaded.

* ``mnist1d`` -- MNIST-1D (Greydanus 2020), generated procedurally by the ``mnist1d``
  package's ``make_dataset`` (its ``get_dataset`` download path is never used):
  inputs (N, 1, 40), 10 classes, 4000 train / 1000 test.
* ``digits`` -- scikit-learn's bundled handwritten digits: (N, 1, 8, 8), 10 classes.
* ``cifar10`` -- CIFAR-10 in torchvision's on-disk python format
  (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``, ``batches.meta``).
* ``imagefolder`` -- one folder per class of image files (read with PIL); if the
  root has ``train/`` and ``test/`` (or ``val/``) sub-trees they are the splits,
  otherwise a seeded 80/20 split.

Every loader returns a :class:`Dataset` of float32 tensors standardized per channel
with the training split's mean and standard deviation.
"""

from __future__ import annotations

import functools
import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DataError", "Dataset", "load_dataset"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


class DataError(ValueError):
    """A dataset that cannot be read: the message says which file/folder and why."""


@dataclass
class Dataset:
    """A classification dataset in memory.

    ``x_train``: (N, C, *spatial) float32, ``y_train``: (N,) int64, same for test.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[2:])

    @property
    def spatial_dims(self) -> int:
        return self.x_train.dim() - 2

    def describe(self) -> str:
        shape = "x".join(str(s) for s in (self.in_channels, *self.spatial_shape))
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test, "
                f"inputs {shape}, {self.num_classes} classes")


# --------------------------------------------------------------------------- public entry
def load_dataset(name: str, data_dir: str | None = None, *, n_train: int | None = None,
                 n_test: int | None = None, seed: int = 42, image_size: int = 32) -> Dataset:
    """Load ``name`` (see module docstring); subsample to ``n_train``/``n_test`` with ``seed``."""
    if name in ("cifar10", "imagefolder"):
        root = _check_dir(data_dir, name)
        if name == "cifar10":
            xtr, ytr, xte, yte, classes = _load_cifar10(root)
        else:
            xtr, ytr, xte, yte, classes = _load_imagefolder(root, image_size, seed)
    elif name == "mnist1d":
        xtr, ytr, xte, yte, classes = _load_mnist1d(seed)
    elif name == "digits":
        xtr, ytr, xte, yte, classes = _load_digits(seed)
    else:
        raise DataError(f"unknown dataset {name!r}; expected mnist1d, digits, cifar10 or imagefolder")
    rng = np.random.default_rng(seed)
    xtr, ytr = _subsample(xtr, ytr, n_train, rng, "train")
    xte, yte = _subsample(xte, yte, n_test, rng, "test")
    # Standardize per channel with training statistics (inputs are the same for every norm).
    axes = (0, *range(2, xtr.ndim))
    mean = xtr.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = xtr.std(axis=axes, keepdims=True, dtype=np.float64) + 1e-8
    def prep(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((x - mean) / std).astype(np.float32))
    return Dataset(name, prep(xtr), torch.from_numpy(ytr.astype(np.int64)), prep(xte),
                   torch.from_numpy(yte.astype(np.int64)), classes)


def _subsample(x: np.ndarray, y: np.ndarray, n: int | None, rng: np.random.Generator,
               split: str) -> tuple[np.ndarray, np.ndarray]:
    if n is None or n >= len(y):
        return x, y
    if n < 1:
        raise DataError(f"expected at least 1 {split} example, got n_{split}={n}")
    idx = np.sort(rng.permutation(len(y))[:n])
    return x[idx], y[idx]


def _check_dir(data_dir: str | None, name: str) -> Path:
    if not data_dir:
        raise DataError(f"--dataset {name} needs --data-dir PATH (data are read locally, never downloaded)")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"data dir {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"data dir {str(root)!r} is not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"data dir {str(root)!r} is not readable (permission denied)")
    return root


# --------------------------------------------------------------------------- MNIST-1D
@functools.lru_cache(maxsize=2)  # generation takes seconds; arrays are never modified in place
def _load_mnist1d(seed: int):
    """Generate MNIST-1D offline. ``make_dataset`` reseeds numpy's and python's global
    RNGs; we restore them afterwards so the caller's randomness is untouched."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    classes = [str(i) for i in range(10)]
    return (data["x"][:, None, :], data["y"], data["x_test"][:, None, :], data["y_test"], classes)


# --------------------------------------------------------------------------- digits
def _load_digits(seed: int):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images[:, None, :, :].astype(np.float32)
    y = bunch.target
    perm = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut], perm[cut:]
    return x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)]


# --------------------------------------------------------------------------- CIFAR-10
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (CIFAR batches hold nothing else), so a
    malicious file in a data dir cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"), ("_codecs", "encode"), ("codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"CIFAR-10: missing file {str(path)!r}") from None
    except PermissionError:
        raise DataError(f"CIFAR-10: cannot read {str(path)!r} (permission denied)") from None
    except Exception as error:  # truncated, not a pickle, foreign objects
        raise DataError(f"CIFAR-10: {str(path)!r} is not a CIFAR-10 python batch ({error})") from None
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR-10: {str(path)!r} does not hold a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _load_cifar10(root: Path):
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if not (folder / "test_batch").exists():
        raise DataError(f"CIFAR-10: {str(folder)!r} has no 'test_batch'; expected torchvision's "
                        "'cifar-10-batches-py' folder (data_batch_1..5, test_batch, batches.meta)")

    def arrays(batch: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(batch["labels"], dtype=np.int64)
        except (KeyError, ValueError) as error:
            raise DataError(f"CIFAR-10: {str(path)!r} lacks 3072-byte 'data' rows or 'labels' "
                            f"({error})") from None
        if len(labels) != len(data):
            raise DataError(f"CIFAR-10: {str(path)!r} has {len(data)} images but {len(labels)} labels")
        return data, labels

    train_paths = sorted(folder.glob("data_batch_*"))
    if not train_paths:
        raise DataError(f"CIFAR-10: no data_batch_* files in {str(folder)!r}")
    parts = [arrays(_read_batch(p), p) for p in train_paths]
    xtr = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = arrays(_read_batch(folder / "test_batch"), folder / "test_batch")
    classes = [str(i) for i in range(10)]
    meta_path = folder / "batches.meta"
    if meta_path.exists():
        names = _read_batch(meta_path).get("label_names")
        if names is not None and len(names) == 10:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return xtr, ytr, xte.astype(np.float32) / 255.0, yte, classes


# --------------------------------------------------------------------------- ImageFolder
def _scan(root: Path) -> dict[str, list[Path]]:
    try:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except PermissionError:
        raise DataError(f"imagefolder: cannot list {str(root)!r} (permission denied)") from None
    found = {}
    for d in class_dirs:
        try:
            files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        except PermissionError:
            raise DataError(f"imagefolder: cannot list {str(d)!r} (permission denied)") from None
        if files:
            found[d.name] = files
    return found


def _read_images(files: list[Path], size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(files), 3, size, size), dtype=np.float32)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if image.size != (size, size):
                    image = image.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(f"imagefolder: cannot read image {str(path)!r} ({error})") from None
    return out


def _load_imagefolder(root: Path, size: int, seed: int):
    splits = {}
    for split in ("train", "test", "val"):
        if (root / split).is_dir():
            splits[split] = _scan(root / split)
    if "train" in splits and ("test" in splits or "val" in splits):
        train = splits["train"]
        test = splits.get("test") or splits["val"]
        classes = sorted(train)
        missing = sorted(set(test) - set(train))
        if missing:
            raise DataError(f"imagefolder: test classes {missing} have no training images")
        xtr_f = [(f, classes.index(c)) for c in classes for f in train[c]]
        xte_f = [(f, classes.index(c)) for c in sorted(test) for f in test[c]]
    else:
        found = _scan(root)
        classes = sorted(found)
        items = [(f, i) for i, c in enumerate(classes) for f in found[c]]
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(items))
        cut = max(1, int(round(0.8 * len(items))))
        xtr_f = [items[i] for i in perm[:cut]]
        xte_f = [items[i] for i in perm[cut:]]
    if len(classes) < 2:
        raise DataError(f"imagefolder: expected at least 2 class folders with images in {str(root)!r}, "
                        f"found {len(classes)}")
    if not xte_f:
        raise DataError(f"imagefolder: too few images in {str(root)!r} to hold out a test split")
    xtr = _read_images([f for f, _ in xtr_f], size)
    xte = _read_images([f for f, _ in xte_f], size)
    ytr = np.array([y for _, y in xtr_f], dtype=np.int64)
    yte = np.array([y for _, y in xte_f], dtype=np.int64)
    return xtr, ytr, xte, yte, classes
