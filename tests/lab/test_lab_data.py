"""Loaders: MNIST-1D offline, digits, CIFAR-10 (torchvision python format), ImageFolder."""

from __future__ import annotations

import pickle
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.cli import main
from normlab.lab.data import DataError, load_dataset
from normlab.lab.results import ResultsStore


def _corr_one(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999999)


def test_mnist1d_is_generated_offline_and_leaves_global_rng_alone(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("the lab must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    data = load_dataset("mnist1d")
    assert (np.random.random(), random.random()) == (expected_np, expected_py)
    assert data.x_train.shape == (4000, 1, 40) and data.x_test.shape == (1000, 1, 40)
    assert data.num_classes == 10 and set(data.y_train.tolist()) == set(range(10))
    again = load_dataset("mnist1d")
    assert torch.equal(data.x_train, again.x_train)  # deterministic
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-3


def test_digits_and_subsampling() -> None:
    data = load_dataset("digits", n_train=100, n_test=50)
    assert data.x_train.shape == (100, 1, 8, 8) and data.x_test.shape == (50, 1, 8, 8)
    assert data.y_train.dtype == torch.int64


def _write_cifar(root: Path, n_train: int = 12, n_test: int = 6) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    raw_train = rng.integers(0, 256, size=(n_train, 3072), dtype=np.uint8)
    raw_test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    labels = [int(i % 10) for i in range(n_train)]
    half = n_train // 2
    for i, sl in enumerate((slice(0, half), slice(half, n_train)), start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": raw_train[sl], b"labels": labels[sl], b"batch_label": b"x"}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": raw_test, b"labels": [int(i % 10) for i in range(n_test)]}, f)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
             b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    return raw_train, raw_test


def test_cifar10_reader(tmp_path: Path) -> None:
    raw_train, raw_test = _write_cifar(tmp_path)
    data = load_dataset("cifar10", str(tmp_path))
    assert data.x_train.shape == (12, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
    assert data.classes[0] == "airplane" and data.classes[9] == "truck"
    assert data.y_train.tolist() == [i % 10 for i in range(12)]
    # rows are 1024 R, then G, then B values, row-major: channel c equals an affine map of them
    images = raw_train.reshape(12, 3, 32, 32).astype(np.float64)
    for c in range(3):
        assert _corr_one(data.x_train[:, c].numpy(), images[:, c])
    # the folder itself works as --data-dir too
    assert load_dataset("cifar10", str(tmp_path / "cifar-10-batches-py")).x_test.shape[0] == 6


def test_cifar10_refuses_code_in_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in ("data_batch_1", "test_batch"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        load_dataset("cifar10", str(tmp_path))


def _write_images(root: Path, classes: dict[str, int], sizes=((20, 12), (9, 9))) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            w, h = sizes[i % len(sizes)]
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")


def test_imagefolder_split_and_resize(tmp_path: Path) -> None:
    _write_images(tmp_path, {"cat": 6, "dog": 4})
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_dataset("imagefolder", str(tmp_path), image_size=16)
    assert data.classes == ["cat", "dog"]
    assert data.x_train.shape[1:] == (3, 16, 16)
    assert len(data.y_train) + len(data.y_test) == 10 and len(data.y_test) == 2
    assert sorted(data.y_train.tolist() + data.y_test.tolist()) == [0] * 6 + [1] * 4


def test_imagefolder_train_test_layout(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 3, "b": 3})
    _write_images(tmp_path / "test", {"a": 1, "b": 2})
    data = load_dataset("imagefolder", str(tmp_path), image_size=8)
    assert data.y_train.tolist() == [0, 0, 0, 1, 1, 1] and data.y_test.tolist() == [0, 1, 1]


def test_imagefolder_bad_image_is_named(tmp_path: Path) -> None:
    _write_images(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset("imagefolder", str(tmp_path))


def test_cifar_compare_end_to_end_with_resnet(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "data", n_train=16, n_test=8)
    out = tmp_path / "run"
    args = ["compare", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--norm", "gn,bn",
            "--batch-sizes", "4", "--ref-batch", "4", "--seeds", "1", "--min-steps", "3", "--epochs",
            "0.1", "--width", "4", "--no-progress", "--out", str(out), "--threads", "1"]
    assert main(args) == 0
    rows = ResultsStore(out).rows
    assert {(r["scenario"], r["norm"]) for r in rows} == {
        (s, n) for s in ("sweep", "noniid", "cost") for n in ("gn", "bn")}
    assert "Dataset **cifar10**" in (out / "report.md").read_text()


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("empty", "has no 'test_batch'"),
    ("truncated", "not a CIFAR-10 python batch"),
])
def test_bad_data_dir_gives_clear_error(tmp_path: Path, capsys, setup: str, message: str) -> None:
    target = tmp_path / "data"
    if setup == "file":
        target.write_text("x")
    elif setup in ("empty", "truncated"):
        target.mkdir()
        if setup == "truncated":
            (target / "test_batch").write_bytes(b"\x80\x04\x95")
            (target / "data_batch_1").write_bytes(b"\x80\x04\x95")
    code = main(["compare", "--dataset", "cifar10", "--data-dir", str(target), "--no-progress",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written for a failed start


def test_dataset_needs_data_dir(capsys) -> None:
    assert main(["compare", "--dataset", "imagefolder", "--no-progress"]) == 2
    assert "needs --data-dir" in capsys.readouterr().err


def test_imagefolder_compare_end_to_end(tmp_path: Path) -> None:
    _write_images(tmp_path / "data", {"a": 6, "b": 6, "c": 6})
    out = tmp_path / "run"
    args = ["compare", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--image-size",
            "8", "--norm", "gn", "--batch-sizes", "2", "--ref-batch", "2", "--seeds", "1", "--min-steps",
            "3", "--epochs", "0.1", "--width", "4", "--no-progress", "--out", str(out), "--threads", "1"]
    assert main(args) == 0
    sweep = [r for r in ResultsStore(out).rows if r["scenario"] == "sweep"]
    assert len(sweep) == 1 and sweep[0]["metrics"]["steps"] == 3
