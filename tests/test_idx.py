"""IDX files and the MNIST-family datasets: lookup order, corrupt files, the real Fashion-MNIST."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from softkd.data.datasets import MNIST_FILES, build_dataset, find_idx_files
from softkd.data.idx import read_idx
from softkd.errors import DataError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, *, gz: bool = True) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def fake_mnist(folder: Path, n: int = 40, *, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", n // 2)):
        write_idx(folder / MNIST_FILES[f"{split}_images"], rng.integers(0, 256, (count, 28, 28)), gz=gz)
        write_idx(folder / MNIST_FILES[f"{split}_labels"], np.arange(count) % 10, gz=gz)
    return folder


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a-idx3-ubyte", array, gz=gz)), array)


def test_corrupt_idx_files_are_named(tmp_path):
    good = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 28, 28)), gz=False)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated.*has 3142 bytes but its header promises 3152"):
        read_idx(truncated)
    magic = tmp_path / "magic"
    magic.write_bytes(b"\x1f\x8b" + good.read_bytes()[2:])
    with pytest.raises(DataError, match="not an IDX file \\(bad magic number"):
        read_idx(magic)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(good.read_bytes())[:-20])
    with pytest.raises(DataError, match="Cannot read IDX file .*broken.gz"):
        read_idx(broken_gz)


def test_lookup_order_data_dir_then_env_then_system(tmp_path, monkeypatch):
    mine, env = fake_mnist(tmp_path / "mine", gz=False), fake_mnist(tmp_path / "env" / "mnist")
    monkeypatch.setenv("SOFTKD_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert find_idx_files("mnist", str(mine))["train_images"].parent == mine
    assert find_idx_files("mnist")["train_images"].parent == env
    splits = build_dataset("mnist", val_fraction=0.25, seed=0, data_dir=str(mine))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 20)
    assert splits.train.input_shape == (1, 28, 28) and float(splits.train.x.max()) <= 1.0
    monkeypatch.delenv("SOFTKD_DATA")
    with pytest.raises(DataError, match=f"mnist not found \\(looked in .*{tmp_path / 'cache'}.*softkd data fetch mnist"):
        find_idx_files("mnist")
    # a data.dir that is missing or empty is an error naming it, never a silent fall-back elsewhere
    monkeypatch.setenv("SOFTKD_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError, match=f"data.dir '{tmp_path / 'nope'}' is not a folder"):
        find_idx_files("mnist", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"data.dir '{tmp_path / 'empty'}' does not hold mnist's four IDX files"):
        find_idx_files("mnist", str(tmp_path / "empty"))


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_real_fashion_mnist_from_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.delenv("SOFTKD_DATA", raising=False)
    splits = build_dataset("fashion-mnist", val_fraction=0.1, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54_000, 6_000, 10_000)
    assert splits.train.x.shape[1:] == (1, 28, 28) and splits.train.num_classes == 10
    assert sorted(set(splits.test.y.tolist())) == list(range(10))
