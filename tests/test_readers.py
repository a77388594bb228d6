"""Loading .npz, .csv and image folders: happy paths, labeled + unlabeled mixes, and every user
error naming the file, line, column or image at fault."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from softkd.data.readers import load_arrays, load_csv, load_image_folder, load_npz
from softkd.errors import ConfigError, DataError


def write_csv(path, text):
    path.write_text(text)
    return path


def write_png(path, pixels, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode=mode).save(path)
    return path


def grey(h, w, value=0):
    return np.full((h, w), value, dtype=np.uint8)


# ----- npz -----

def test_npz_loads_inputs_labels_and_unlabeled(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([2, -1]))
    data = load_npz(tmp_path / "d.npz")
    assert data.x.dtype == torch.float32 and data.input_shape == (3, 4)
    assert torch.equal(data.x, torch.from_numpy(x).float())
    assert data.y.tolist() == [2, -1] and data.ids.tolist() == [0, 1]
    assert data.num_classes == 3 and data.num_labeled == 1 and data.name == "d.npz"


def test_npz_without_labels_is_all_unlabeled_and_accepts_integral_float_labels(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.ones((3, 2), dtype=np.uint8))
    assert load_npz(tmp_path / "a.npz", name="transfer").y.tolist() == [-1, -1, -1]
    np.savez(tmp_path / "b.npz", x=np.ones((2, 2)), y=np.array([1.0, -1.0]))
    data = load_npz(tmp_path / "b.npz", num_classes=5)
    assert data.y.tolist() == [1, -1] and data.num_classes == 5


@pytest.mark.parametrize("arrays, match", [
    ({"inputs": np.ones((2, 2))}, r"no array 'x' \(found: inputs\).*x=inputs"),
    ({"x": np.array(["a", "b"])}, r"'x' in .*holds <U1 values.*numbers"),
    ({"x": np.ones((3, 2)), "y": np.array([0, 1])}, r"3 inputs in 'x' but 2 labels in 'y'"),
    ({"x": np.ones((2, 2)), "y": np.array([0.5, 1.0])}, r"hold 0\.5 at index 0.*-1 for unlabeled"),
    ({"x": np.ones((2, 2)), "y": np.array([0, -2])}, r"hold -2 at index 1"),
    ({"x": np.ones((2, 2)), "y": np.array(["0", "1"])}, r"are <U1, not integers"),
    ({"x": np.ones((2, 2)), "y": np.eye(2)}, r"shape \(2, 2\).*one-hot"),
    ({"x": np.zeros((0, 4))}, r"holds no samples"),
    ({"x": np.array([[1.0], [np.nan]])}, r"NaN or infinite value in sample 1"),
])
def test_npz_errors_name_the_file_and_the_fix(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match) as info:
        load_npz(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_npz_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"missing\.npz' not found"):
        load_npz(tmp_path / "missing.npz")
    write_csv(tmp_path / "text.npz", "not a zip")
    with pytest.raises(DataError, match=r"text\.npz' is not an \.npz archive"):
        load_npz(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", np.ones(3))
    with pytest.raises(DataError, match=r"single\.npy' is a single \.npy array"):
        load_npz(tmp_path / "single.npy")
    np.savez(tmp_path / "objects.npz", x=np.array([{}, {}], dtype=object))
    with pytest.raises(DataError, match=r"'x' in .*objects\.npz' holds Python objects"):
        load_npz(tmp_path / "objects.npz")
    np.savez(tmp_path / "cut.npz", x=np.arange(1000.0))
    raw = (tmp_path / "cut.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[:200] + raw[-200:])  # body gone, central directory kept
    with pytest.raises(DataError, match=r"cut\.npz"):
        load_npz(tmp_path / "cut.npz")


# ----- csv -----

def test_csv_loads_features_labels_and_unlabeled_rows(tmp_path):
    path = write_csv(tmp_path / "t.csv", "f1,label,f2\n1.5,0,2\n3, ,4\n5,\"2\",-6e-1\n7,-1,8\n\n")
    data = load_csv(path)
    assert np.allclose(data.x.numpy(), [[1.5, 2], [3, 4], [5, -0.6], [7, 8]])
    assert data.x.dtype == torch.float32
    assert data.y.tolist() == [0, -1, 2, -1] and data.ids.tolist() == [0, 1, 2, 3]
    assert data.num_classes == 3 and data.name == "t.csv"


def test_csv_label_column_option_bom_and_single_row(tmp_path):
    path = write_csv(tmp_path / "t.csv", "\ufeffa,target\r\n1,1\r\n")
    data = load_csv(path, label_column="target", name="small", num_classes=4)
    assert data.x.tolist() == [[1.0]] and data.y.tolist() == [1] and data.num_classes == 4
    assert data.name == "small"
    unlabeled = load_csv(write_csv(tmp_path / "u.csv", "a,b\n1,2\n3,4\n"), label_column=None)
    assert unlabeled.x.shape == (2, 2) and unlabeled.num_labeled == 0


@pytest.mark.parametrize("text, match", [
    ("f1,f2,label\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n9,abc,0\n", r"line 6, column 'f2': 'abc' is not a number"),
    ("f1,label\n1,0\n\n2,0\n3,x\n", r"line 5, column 'label': label 'x'"),  # blank lines still counted
    ("f1,label\n1,0\n2,cat\n", r"line 3, column 'label': label 'cat' is not a class index"),
    ("f1,label\n1,0\n2,1.5\n", r"line 3, column 'label': label '1.5' is not a class index"),
    ("f1,label\n1,-3\n", r"line 2, column 'label': label '-3'"),
    ("f1,label\n1,0\n\n2\n", r"line 4 has 1 fields but the header has 2 columns"),
    ("f1,label\n1,0,5\n2,1,6\n", r"line 2 has 3 fields but the header has 2"),
    ("f1,label\n1,0\nnan,1\n", r"line 3, column 'f1': 'nan' is not finite"),
    ("f1,label\n1,0\n,1\n", r"line 3, column 'f1': '' is not a number"),
    ("f1,f2\n1,2\n", r"no column 'label' \(columns: 'f1', 'f2'\); pass label_column="),
    ("label\n1\n", r"no feature columns besides 'label'"),
    ("", r"is empty; its first line must be a header"),
    ("\n1,2\n", r"blank first line"),
    ("f1,label\n", r"header but no data rows"),
    ("f1,label,label\n1,2,3\n", r"2 columns named 'label'"),
])
def test_csv_errors_name_file_line_and_column(tmp_path, text, match):
    path = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(DataError, match=match) as info:
        load_csv(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_csv_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv' not found"):
        load_csv(tmp_path / "nope.csv")
    (tmp_path / "latin.csv").write_bytes("f\u00e9,label\n1,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv' is not UTF-8"):
        load_csv(tmp_path / "latin.csv")


def test_csv_of_20k_rows_loads_fast(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 20)).astype(np.float32)
    y = rng.integers(-1, 10, 20_000)
    table = np.column_stack([x, y])
    header = ",".join([f"f{i}" for i in range(20)] + ["label"])
    np.savetxt(tmp_path / "big.csv", table, delimiter=",", header=header, comments="", fmt="%.7g")
    start = time.perf_counter()
    data = load_csv(tmp_path / "big.csv")
    assert time.perf_counter() - start < 2.0
    assert data.x.shape == (20_000, 20) and torch.allclose(data.x, torch.from_numpy(x), rtol=1e-6)
    assert data.y.tolist() == y.tolist()


# ----- image folders -----

def test_image_folder_classes_order_and_unlabeled_loose_images(tmp_path):
    write_png(tmp_path / "dog" / "b.png", grey(4, 3, 255))
    write_png(tmp_path / "dog" / "a.png", grey(4, 3, 0))
    write_png(tmp_path / "cat" / "z.png", grey(4, 3, 51))
    write_png(tmp_path / "loose.png", grey(4, 3, 102))
    (tmp_path / "emu").mkdir()  # an empty class keeps its index
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"junk")
    data = load_image_folder(tmp_path, name="pets")
    assert data.classes == ["cat", "dog", "emu"] and data.num_classes == 3
    assert data.x.shape == (4, 1, 4, 3) and data.x.dtype == torch.float32
    assert data.x[:, 0, 0, 0].tolist() == pytest.approx([0.2, 0.0, 1.0, 0.4])  # cat/z, dog/a, dog/b, loose
    assert data.y.tolist() == [0, 1, 1, -1] and data.ids.tolist() == [0, 1, 2, 3]
    assert data.name == "pets"


def test_image_folder_colour_resize_and_grayscale(tmp_path):
    rgb = np.zeros((6, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    write_png(tmp_path / "a" / "red.png", rgb)
    write_png(tmp_path / "b" / "grey.png", grey(3, 5, 255))
    rgba = np.concatenate([rgb[:2, :2], np.zeros((2, 2, 1), dtype=np.uint8)], axis=2)
    write_png(tmp_path / "b" / "see-through.png", rgba)
    data = load_image_folder(tmp_path, size=(4, 2))
    assert data.x.shape == (3, 3, 4, 2)  # one colour image makes all three-channel
    assert data.x[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert data.x[1, :, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert data.x[2, :, 0, 0].tolist() == [1.0, 0.0, 0.0]  # alpha dropped
    assert float(data.x.min()) >= 0 and float(data.x.max()) <= 1
    assert load_image_folder(tmp_path, size=3, grayscale=True).x.shape == (3, 1, 3, 3)


def test_image_folder_16_bit_grey_is_scaled_to_unit_range(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16)).save(tmp_path / "a" / "deep.png")
    data = load_image_folder(tmp_path)
    assert data.x.shape == (1, 1, 2, 2) and float(data.x.max()) == 1.0


def test_image_folder_errors_name_the_files(tmp_path):
    with pytest.raises(DataError, match=r"nowhere' not found"):
        load_image_folder(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"holds no images; put them in one subfolder per class"):
        load_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no images"):
        load_image_folder(tmp_path)
    write_png(tmp_path / "a" / "one.png", grey(4, 4))
    write_png(tmp_path / "b" / "two.png", grey(5, 6))
    with pytest.raises(DataError, match=r"'a/one\.png' is 4×4 but 'b/two\.png' is 5×6 \(H×W\); pass size="):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, size=(4, 4)).x.shape == (2, 1, 4, 4)
    (tmp_path / "b" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"b/notes\.txt' is not an image"):
        load_image_folder(tmp_path, size=(4, 4))
    (tmp_path / "b" / "notes.txt").unlink()
    noise = np.random.default_rng(0).integers(0, 256, (4, 4), dtype=np.uint8)
    raw = write_png(tmp_path / "a" / "one.png", noise).read_bytes()
    (tmp_path / "a" / "one.png").write_bytes(raw[:-30])  # header intact, pixel data cut
    with pytest.raises(DataError, match=r"a/one\.png' is truncated or corrupt"):
        load_image_folder(tmp_path, size=(4, 4))
    with pytest.raises(ConfigError, match=r"'size' of load_image_folder must be \(height, width\)"):
        load_image_folder(tmp_path, size=(4, 0))


# ----- dispatch -----

def test_load_arrays_dispatches_on_suffix(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((2, 3)))
    write_csv(tmp_path / "d.CSV", "a,label\n1,0\n")
    write_png(tmp_path / "imgs" / "c" / "1.png", grey(2, 2))
    assert load_arrays(tmp_path / "d.npz").x.shape == (2, 3)
    assert load_arrays(str(tmp_path / "d.CSV"), label_column="label").y.tolist() == [0]
    assert load_arrays(tmp_path / "imgs", grayscale=False).x.shape == (1, 3, 2, 2)
    write_csv(tmp_path / "d.json", "{}")
    with pytest.raises(DataError, match=r"d\.json': unknown file type '\.json'; give a \.npz file, a \.csv"):
        load_arrays(tmp_path / "d.json")
    with pytest.raises(DataError, match=r"No such file or folder: .*gone\.parquet"):
        load_arrays(tmp_path / "gone.parquet")
    with pytest.raises(DataError, match=r"gone\.npz' not found"):
        load_arrays(tmp_path / "gone.npz")
    with pytest.raises(ConfigError, match=r"option 'size' does not apply to .*d\.npz' \(load_npz\); it takes name"):
        load_arrays(tmp_path / "d.npz", size=(2, 2))
