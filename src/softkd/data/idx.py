"""IDX files (the MNIST family's format), gzipped or raw, read strictly: a wrong magic number, an
unexpected element type or a truncated body is a one-line error naming the file."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from softkd.errors import DataError

_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"Cannot read IDX file '{path}': {exc}; delete it and fetch it again "
                        "(softkd data fetch).") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise DataError(f"'{path}' is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); "
                        "check the path or fetch the data again.")
    dtype, ndim = np.dtype(_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file '{path}' is truncated inside its header; fetch it again.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"IDX file '{path}' has {len(raw)} bytes but its header promises {expected} "
                        f"(shape {shape}); the file is truncated or corrupt — fetch it again.")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
