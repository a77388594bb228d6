"""Datasets from files: ``.npz`` arrays, ``.csv`` tables and folders of images, each read into an
:class:`~softkd.data.datasets.ArrayDataset` whose sample ids are 0..N-1 in file order.

Anything a user can fix is a one-line :class:`DataError` naming the file (and, for tables, the
line and column). Labels are class indices; -1 (or an empty CSV cell) marks an unlabeled sample.
"""

from __future__ import annotations

import csv
import inspect
import math
import re
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from softkd.data.datasets import ArrayDataset
from softkd.errors import ConfigError, DataError
from softkd.losses.logits import UNLABELED


def load_arrays(path, **kwargs) -> ArrayDataset:
    """Dispatch on what ``path`` is: a ``.npz`` file, a ``.csv`` file or a folder of images."""
    path = Path(path).expanduser()
    loader = {".npz": load_npz, ".csv": load_csv}.get(path.suffix.lower())
    if path.is_dir():
        loader = load_image_folder
    elif loader is None and not path.exists():
        raise DataError(f"No such file or folder: '{path}'; check the path.")
    elif loader is None:
        raise DataError(f"Cannot load '{path}': unknown file type '{path.suffix}'; give a .npz file, a .csv file "
                        "or a folder of images with one subfolder per class.")
    accepted = [p for p in inspect.signature(loader).parameters if p != "path"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"The option {unknown[0]!r} does not apply to '{path}' ({loader.__name__}); "
                          f"it takes {', '.join(accepted)}.")
    return loader(path, **kwargs)


def load_npz(path, *, name: str | None = None, num_classes: int | None = None) -> ArrayDataset:
    """Inputs from key ``x`` (N, ...) and optional integer labels from key ``y`` (N,), -1 = unlabeled."""
    path = _existing_file(path, ".npz")
    with path.open("rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise DataError(f"'{path}' is a single .npy array, not an .npz archive; "
                        "save inputs and labels with numpy.savez(path, x=inputs, y=labels).")
    if not zipfile.is_zipfile(path):
        raise DataError(f"'{path}' is not an .npz archive (not a zip file); "
                        "save inputs and labels with numpy.savez(path, x=inputs, y=labels).")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                found = ", ".join(archive.files) or "nothing"
                raise DataError(f"'{path}' has no array 'x' (found: {found}); "
                                "save the inputs under x: numpy.savez(path, x=inputs, y=labels).")
            x = _npz_member(archive, "x", path)
            y = _npz_member(archive, "y", path) if "y" in archive.files else None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DataError(f"'{path}' is a corrupt .npz archive ({exc}); write it again with numpy.savez.") from None

    if x.dtype.kind not in "biuf" or x.ndim == 0:
        what = "a scalar" if x.ndim == 0 else f"{x.dtype} values"
        raise DataError(f"Array 'x' in '{path}' holds {what}; it must be numbers of shape (N, ...).")
    if len(x) == 0:
        raise DataError(f"'{path}' holds no samples (x has shape {x.shape}); give it at least one.")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
        raise DataError(f"Array 'x' in '{path}' has a NaN or infinite value in sample {bad}; "
                        "replace or drop such samples before loading.")
    if y is not None:
        y = _npz_labels(y, len(x), path)
    return ArrayDataset(x.astype(np.float32, copy=False), y, num_classes=num_classes, name=name or path.name)


def _npz_member(archive, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"Array '{key}' in '{path}' holds Python objects; store plain numbers "
                            "(e.g. numpy.asarray(values, dtype=float)).") from None
        raise DataError(f"Array '{key}' in '{path}' is corrupt ({exc}); write the file again.") from None


def _npz_labels(y: np.ndarray, n: int, path: Path) -> np.ndarray:
    if y.ndim != 1:
        hint = " (one-hot? store class indices: y.argmax(1))" if y.ndim == 2 else ""
        raise DataError(f"Labels 'y' in '{path}' have shape {y.shape}; they must have shape (N,){hint}.")
    if len(y) != n:
        raise DataError(f"'{path}' has {n} inputs in 'x' but {len(y)} labels in 'y'; give one label per "
                        "input (-1 for unlabeled).")
    if y.dtype.kind not in "iuf":
        raise DataError(f"Labels 'y' in '{path}' are {y.dtype}, not integers; store class indices 0, 1, ... "
                        "and -1 for unlabeled.")
    bad = ~np.isfinite(y) | (y != np.round(y)) | (y < UNLABELED) if y.dtype.kind == "f" else y < UNLABELED
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"Labels 'y' in '{path}' hold {y[i].item()} at index {i}; labels must be class indices "
                        "0, 1, ... or -1 for unlabeled.")
    return y.astype(np.int64)


def load_csv(path, *, label_column: str | None = "label", name: str | None = None,
             num_classes: int | None = None) -> ArrayDataset:
    """A header row, then one sample per line: every column but ``label_column`` is a float feature.

    An empty (or -1) label cell marks an unlabeled row; ``label_column=None`` reads no labels.
    """
    path = _existing_file(path, ".csv")
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            header = [cell.strip() for cell in next(csv.reader([f.readline()]), [])]
            if not any(header):
                empty = not f.read().strip()
                raise DataError(f"CSV file '{path}' is empty; its first line must be a header naming the columns."
                                if empty else f"CSV file '{path}' has a blank first line; it must be a header "
                                "naming the columns.")
            label_idx = _label_index(header, label_column, path)
            features = [j for j in range(len(header)) if j != label_idx]
            if not features:
                raise DataError(f"CSV file '{path}' has no feature columns besides '{label_column}'; "
                                "add at least one column of inputs.")
            converters = None if label_idx is None else {label_idx: _label_cell}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "input contained no data": checked below
                    table = np.loadtxt(f, delimiter=",", quotechar='"', comments=None, ndmin=2,
                                       dtype=np.float64, converters=converters)
            except UnicodeDecodeError:
                raise
            except ValueError as exc:
                hint = re.search(r"could not convert .* at row (\d+)", str(exc))  # 0-based data row
                raise _csv_problem(path, header, label_idx, start=int(hint[1]) if hint else 0,
                                   detail=str(exc)) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"CSV file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "save it as UTF-8.") from None
    if table.shape[0] == 0:
        raise DataError(f"CSV file '{path}' has a header but no data rows; give it at least one sample.")
    if table.shape[1] != len(header):
        raise _csv_problem(path, header, label_idx)
    bad = ~np.isfinite(table[:, features]).all(axis=1)
    if label_idx is not None:
        y = table[:, label_idx]
        bad |= ~np.isfinite(y) | (y != np.round(y)) | (y < UNLABELED)
    if bad.any():
        raise _csv_problem(path, header, label_idx, start=int(np.flatnonzero(bad)[0]))
    y = None if label_idx is None else table[:, label_idx].astype(np.int64)
    x = table[:, features].astype(np.float32)
    return ArrayDataset(x, y, num_classes=num_classes, name=name or path.name)


def _label_index(header: list[str], label_column: str | None, path: Path) -> int | None:
    if label_column is None:
        return None
    hits = [j for j, column in enumerate(header) if column == label_column]
    if len(hits) > 1:
        raise DataError(f"CSV file '{path}' has {len(hits)} columns named '{label_column}'; rename all but one.")
    if not hits:
        shown = ", ".join(f"'{c}'" for c in header[:10]) + (f", ... ({len(header)} in all)" if len(header) > 10 else "")
        raise DataError(f"CSV file '{path}' has no column '{label_column}' (columns: {shown}); pass "
                        "label_column='<name>' to name the label column, or label_column=None for no labels.")
    return hits[0]


def _label_cell(cell: str) -> float:
    cell = cell.strip()
    return float(cell) if cell else float(UNLABELED)


def _csv_problem(path: Path, header: list[str], label_idx: int | None, *, start: int = 0,
                 detail: str = "") -> DataError:
    """The bad row or cell, found by a slow second pass that checks cells from data row ``start``
    (numpy's hint) on; blank lines are skipped, as numpy skips them."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        for i, row in enumerate(r for r in reader if r):
            where = f"CSV file '{path}', line {reader.line_num}"
            if len(row) != len(header):
                return DataError(f"{where} has {len(row)} fields but the header has {len(header)} columns; "
                                 "give every row one value per column.")
            if i < start or _row_is_fine(row, label_idx):
                continue
            for j, cell in enumerate(row):
                problem = _label_problem(cell) if j == label_idx else _feature_problem(cell)
                if problem:
                    return DataError(f"{where}, column '{header[j]}': {problem}.")
    if start:
        return _csv_problem(path, header, label_idx, detail=detail)
    return DataError(f"Cannot read CSV file '{path}'{': ' + detail if detail else ''}; check its format.")


def _row_is_fine(row: list[str], label_idx: int | None) -> bool:
    features = row if label_idx is None else row[:label_idx] + row[label_idx + 1:]
    try:
        finite = all(map(math.isfinite, map(float, features)))
    except ValueError:
        return False
    return finite and (label_idx is None or _label_problem(row[label_idx]) is None)


def _feature_problem(cell: str) -> str | None:
    try:
        value = float(cell)
    except ValueError:
        return f"{cell.strip()!r} is not a number; features must be numeric (fix or drop the row)"
    if not np.isfinite(value):
        return f"{cell.strip()!r} is not finite; replace missing values before loading"
    return None


def _label_problem(cell: str) -> str | None:
    try:
        value = _label_cell(cell)
    except ValueError:
        value = None
    if value is None or not np.isfinite(value) or value != round(value) or value < UNLABELED:
        return (f"label {cell.strip()!r} is not a class index; use integers 0, 1, ... "
                "(leave the cell empty or write -1 for an unlabeled row)")
    return None


def load_image_folder(path, *, name: str | None = None, size: tuple[int, int] | None = None,
                      grayscale: bool | None = None) -> ArrayDataset:
    """Images in one subfolder per class (sorted names give class indices 0, 1, ...), as float32
    (N, C, H, W) in [0, 1]. Loose images at the top level are unlabeled (-1).

    ``size=(H, W)`` (or one int for squares) resizes every image; without it all images must share one size. ``grayscale``
    None gives one channel when every image is grey and three otherwise; True or False forces it.
    The class names are kept as ``dataset.classes``.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise DataError(f"Image folder '{root}' {what}; give a folder with one subfolder of images per class.")
    if size is not None:
        size = _check_size(size)
    entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    classes = [p.name for p in entries if p.is_dir()]
    files = [(f, label) for label, folder in enumerate(classes) for f in _files_under(root / folder)]
    files += [(p, UNLABELED) for p in entries if not p.is_dir()]
    if not files:
        raise DataError(f"Image folder '{root}' holds no images; put them in one subfolder per class "
                        "(e.g. cat/1.png, dog/2.png).")

    images, first = [], None
    for file, _ in files:
        with _open_image(file) as image:
            first = first or (file, image.size)
            if size is None and image.size != first[1]:
                (w0, h0), (w1, h1) = first[1], image.size
                raise DataError(f"Images in '{root}' differ in size: '{first[0].relative_to(root)}' is {h0}×{w0} "
                                f"but '{file.relative_to(root)}' is {h1}×{w1} (H×W); pass size=(H, W) to resize all.")
            images.append(_pixels(image, size=size, grayscale=grayscale))
    if grayscale is None and len({a.shape[0] for a in images}) > 1:
        images = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in images]
    x = np.stack(images)  # (N, C, H, W)
    y = np.array([label for _, label in files], dtype=np.int64)
    dataset = ArrayDataset(x, y, num_classes=len(classes) or None, name=name or root.name)
    dataset.classes = classes
    return dataset


def _files_under(folder: Path) -> list[Path]:
    """Files below ``folder`` at any depth, sorted by relative path; hidden files and folders skipped."""
    found = (p for p in folder.rglob("*") if p.is_file())
    return sorted((p for p in found if not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                  key=lambda p: p.relative_to(folder).as_posix())


def _open_image(file: Path):
    try:
        image = Image.open(file)
    except UnidentifiedImageError:
        raise DataError(f"'{file}' is not an image Pillow can read; remove it from the image folder.") from None
    except OSError as exc:
        raise DataError(f"Cannot read image '{file}' ({exc}); check its permissions.") from None
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        image.close()
        raise DataError(f"Image '{file}' is truncated or corrupt ({exc}); replace or remove it.") from None
    return image


_GREY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def _pixels(image, *, size: tuple[int, int] | None, grayscale: bool | None) -> np.ndarray:
    """(C, H, W) float32 in [0, 1]; 16-bit grey images are scaled by 65535, others by 255."""
    grey = image.mode in _GREY_MODES if grayscale is None else grayscale
    if image.mode == "I" or image.mode.startswith("I;16"):
        image, scale = image.convert("F"), 65535.0
    else:
        image, scale = image.convert("L" if grey else "RGB"), 255.0
    if size is not None:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    a = np.clip(np.asarray(image, dtype=np.float32) / scale, 0.0, 1.0)
    if a.ndim == 2:  # (H, W) -> (1, H, W), or grey -> 3 channels when colour is asked for
        a = a[None] if grey else np.repeat(a[None], 3, axis=0)
    else:
        a = a.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    return a


def _check_size(size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else size
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in pair)):
        raise ConfigError(f"The 'size' of load_image_folder must be (height, width) in pixels; got {size!r}.")
    return int(pair[0]), int(pair[1])


def _existing_file(path, kind: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{kind} file '{path}' not found; check the path.")
    if not path.is_file():
        raise DataError(f"'{path}' is a folder, not a {kind} file; give the path of the file itself.")
    return path
