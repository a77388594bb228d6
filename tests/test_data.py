"""Datasets and batching: stable ids, deterministic splits, label fractions, batch formats."""

import pytest
import torch

from softkd.data import ArrayDataset, build_dataset, build_loader, keep_labels
from softkd.errors import DataError
from softkd.losses import UNLABELED


def test_digits_splits_are_disjoint_deterministic_and_stratified():
    a, b = build_dataset("digits", seed=0), build_dataset("digits", seed=0)
    assert torch.equal(a.train.ids, b.train.ids) and torch.equal(a.val.ids, b.val.ids)
    ids = [set(s.ids.tolist()) for s in (a.train, a.val, a.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == 1797
    assert a.train.input_shape == (1, 8, 8) and float(a.train.x.max()) == 1.0
    other = build_dataset("digits", seed=1)
    assert torch.equal(other.test.ids, a.test.ids)  # the test split never moves
    assert not torch.equal(other.val.ids, a.val.ids)
    assert torch.bincount(a.val.y).min() >= 13  # every class in validation


def test_keep_labels_is_seeded_and_stratified():
    data = build_dataset("digits").train
    few = keep_labels(data, 0.1, seed=0)
    assert torch.equal(few.x, data.x) and torch.equal(few.ids, data.ids)
    labeled = few.y != UNLABELED
    assert abs(int(labeled.sum()) - 0.1 * len(data)) <= 10
    assert torch.equal(few.y[labeled], data.y[labeled])
    assert torch.bincount(few.y[labeled]).min() >= 10
    assert torch.equal(keep_labels(data, 0.1, seed=0).y, few.y)
    assert not torch.equal(keep_labels(data, 0.1, seed=1).y, few.y)
    with pytest.raises(DataError, match="labeled_fraction"):
        keep_labels(data, 0.0, seed=0)


def test_index_batches_cover_every_sample_once_per_epoch():
    data = ArrayDataset(torch.arange(10.0).reshape(10, 1), torch.arange(10) % 3, ids=torch.arange(100, 110))
    loader = build_loader(data, batch_size=4, shuffle=True, seed=0, extras={"t": torch.arange(10) * 2})
    for _ in range(2):
        batches = list(loader)
        assert [len(b["x"]) for b in batches] == [4, 4, 2]
        seen = torch.cat([b["index"] for b in batches])
        assert sorted(seen.tolist()) == list(range(10))
        for b in batches:
            assert torch.equal(b["id"], b["index"] + 100) and torch.equal(b["t"], b["index"] * 2)
            assert torch.equal(b["x"].flatten(), b["index"].float())


@pytest.mark.parametrize("make_item", [lambda x, y: (x, y), lambda x, y: {"x": x, "y": y}, lambda x, y: (x,)])
def test_generic_datasets_batch_like_arrays(make_item):
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return make_item(torch.full((2,), float(i)), i % 2)

    batches = list(build_loader(Items(), batch_size=4))
    assert [len(b["x"]) for b in batches] == [4, 2]
    assert batches[0]["index"].tolist() == [0, 1, 2, 3]
    expected = [0, 1, 0, 1] if len(make_item(0, 0)) == 2 else [UNLABELED] * 4
    assert batches[0]["y"].tolist() == expected


def test_array_dataset_rejects_mismatched_lengths():
    with pytest.raises(DataError, match="5 inputs but 4 labels"):
        ArrayDataset(torch.zeros(5, 3), torch.zeros(4))


def _digits_arrays():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype("float32"), bunch.target.astype("int64")


def test_user_npz_splits_keep_unlabeled_samples_in_the_transfer_set(tmp_path):
    import numpy as np

    from softkd.data.datasets import load_splits

    x, y = _digits_arrays()
    y = y.copy()
    y[::4] = -1  # a quarter unlabeled
    np.savez(tmp_path / "d.npz", x=x, y=y)
    splits = load_splits("mine", path=str(tmp_path / "d.npz"), val_fraction=0.1, test_fraction=0.2, seed=3)
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(x)
    assert (splits.test.y >= 0).all() and (splits.val.y >= 0).all()
    assert int((splits.train.y == UNLABELED).sum()) == int((torch.as_tensor(y) == -1).sum())
    again = load_splits("mine", path=str(tmp_path / "d.npz"), val_fraction=0.1, test_fraction=0.2, seed=4)
    assert torch.equal(again.test.ids, splits.test.ids) and not torch.equal(again.val.ids, splits.val.ids)


def test_csv_with_test_file_and_extra_unlabeled_data(tmp_path):
    import numpy as np

    from softkd.data.datasets import load_splits

    x, y = _digits_arrays()
    header = ",".join(f"p{i}" for i in range(64)) + ",digit"
    for name, rows in (("train", slice(0, 1000)), ("test", slice(1000, 1400))):
        lines = [header] + [",".join(f"{v:g}" for v in xi) + f",{yi}" for xi, yi in zip(x[rows], y[rows])]
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
    np.savez(tmp_path / "more.npz", x=x[1400:])
    splits = load_splits("csv-digits", path=str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"),
                         unlabeled_path=str(tmp_path / "more.npz"), label_column="digit", val_fraction=0.1, seed=0)
    assert len(splits.test) == 400 and len(splits.val) == 100
    assert len(splits.train) == 900 + len(x) - 1400
    assert int((splits.train.y == UNLABELED).sum()) == len(x) - 1400
    assert len(set(splits.train.ids.tolist())) == len(splits.train)  # ids stay unique
    with pytest.raises(DataError, match="no labeled samples"):
        load_splits("x", path=str(tmp_path / "more.npz"))
    np.savez(tmp_path / "odd.npz", x=np.zeros((5, 3), dtype="float32"))
    with pytest.raises(DataError, match="shape"):
        load_splits("csv-digits", path=str(tmp_path / "train.csv"), label_column="digit",
                    unlabeled_path=str(tmp_path / "odd.npz"))


def test_atomic_writes_leave_no_temporary_file_and_normal_permissions(tmp_path):
    import os

    from softkd.utils import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "hello")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_user_labels_must_number_at_least_two_classes_each_with_training_samples(tmp_path):
    import numpy as np

    from softkd.data.datasets import load_splits

    x = np.random.default_rng(0).normal(size=(60, 4)).astype("float32")
    y = np.tile([0, 1, 2], 20)
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    assert load_splits("ok", path=str(tmp_path / "ok.npz")).train.num_classes == 3
    stray = y.copy()
    stray[5] = 1_000_000  # one typo would make a 1,000,001-class model
    np.savez(tmp_path / "stray.npz", x=x, y=stray)
    with pytest.raises(DataError, match=r"labels classes up to 1000000, but 999997 of those have no labeled sample "
                                        r"\(3, 4, 5, 6, 7, \.\.\.\); number the 4 classes 0\.\.3"):
        load_splits("stray", path=str(tmp_path / "stray.npz"))
    np.savez(tmp_path / "one.npz", x=x, y=np.zeros(60, dtype=int))
    with pytest.raises(DataError, match=r"labeled samples of 1 class only \(\[0\]\); distillation needs at least 2"):
        load_splits("one", path=str(tmp_path / "one.npz"))
    np.savez(tmp_path / "test.npz", x=x[:10], y=np.arange(10) % 5)  # classes 3 and 4 exist only in the test file
    with pytest.raises(DataError, match=r"Test data '.*test.npz' has label\(s\) \[3, 4\] that the training data"):
        load_splits("ok", path=str(tmp_path / "ok.npz"), test_path=str(tmp_path / "test.npz"))
