"""Download the MNIST-family archives, resumably, and keep only files whose sha256 checks out.

Each file goes to ``<file>.part`` next to its final name. An interrupted transfer leaves the
``.part`` behind and the next :func:`fetch` asks the server for the rest (``Range: bytes=N-``);
a server that ignores the range starts it over. A complete ``.part`` is hashed, fsynced and
renamed onto its final name in one step, so a final name only ever holds a verified file.
Standard library only (``urllib``).
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from softkd.utils import fsync_dir, sha256_file
from softkd.errors import DataError, UnknownNameError

__all__ = ["SOURCES", "Source", "fetch"]

_CHUNK = 1 << 16


@dataclass(frozen=True)
class Source:
    """Where a dataset's files live (mirrors, tried in order) and the sha256 each file must have."""

    mirrors: tuple[str, ...]
    files: dict[str, str]


# sha256 (and sizes, which match) from tensorflow/datasets, tensorflow_datasets/url_checksums/
# fashion_mnist.txt and mnist.txt; the same values are pinned by many other projects.
# The copies in Debian's dataset-fashion-mnist are re-gzipped (same pixels, different bytes,
# md5 unlike Zalando's), so they cannot serve as the reference.
SOURCES: dict[str, Source] = {
    "fashion-mnist": Source(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files={
            "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
    ),
    "mnist": Source(
        # torchvision's mirror first: yann.lecun.com is often down or asks for a login.
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        files={
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
    ),
}

Progress = Callable[[str, int, int | None], None]


class _Unreachable(Exception):
    """An HTTP error or a failed connection: the next mirror may still have the file."""


def fetch(name: str, dest: str | Path | None = None, *, base_url: str | None = None, timeout: float = 30,
          progress: Progress | None = None) -> Path:
    """Download the files of ``name`` (a key of :data:`SOURCES`) into ``dest`` and return ``dest``.

    ``dest`` defaults to ``user_cache_dir() / name``, where :func:`softkd.data.datasets.find_idx_files`
    looks. Files already there with the right sha256 are not downloaded again; a file there with
    another hash is left alone and reported. ``base_url`` replaces the mirrors (a folder URL
    holding the same files). ``progress(file_name, bytes_done, bytes_total)`` is called after
    every chunk; ``bytes_total`` is None when the server does not say.
    """
    if name not in SOURCES:
        raise UnknownNameError(f"Unknown download '{name}': known downloads are {', '.join(sorted(SOURCES))}.")
    source = SOURCES[name]
    if dest is None:
        from softkd.data.datasets import user_cache_dir  # lazy: datasets imports torch

        dest = user_cache_dir() / name
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    mirrors = (base_url,) if base_url else source.mirrors
    for file_name, sha256 in source.files.items():
        final = dest / file_name
        if final.exists():
            got = sha256_file(final)
            if got != sha256:
                raise DataError(f"'{final}' exists but its sha256 is {got}, expected {sha256}; "
                                f"delete it and fetch {name} again.")
            continue
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + file_name
            try:
                _download(url, dest / f"{file_name}.part", final, sha256, timeout=timeout, progress=progress)
                break
            except _Unreachable as exc:
                failures.append(str(exc))
        else:
            raise DataError(f"Cannot download {file_name} of {name}: {'; '.join(failures)}; "
                            "check the network, or pass a mirror holding the files as base_url.")
    return dest


def _download(url: str, part: Path, final: Path, sha256: str, *, timeout: float,
              progress: Progress | None) -> None:
    """Bring ``part`` up to date from ``url``, verify it and rename it onto ``final``."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "softkd"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:  # nothing past the end: the .part may already be whole
            return _verify_and_rename(part, final, sha256, url)
        raise _Unreachable(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _Unreachable(f"cannot reach {url} ({getattr(exc, 'reason', exc)})") from None

    with response:
        if response.status == 206:
            start = _range_start(response.headers.get("Content-Range"))
            if start != offset and not offset:
                raise _Unreachable(f"{url} answered 206 Partial Content to a request for the whole file")
            if start != offset:  # not the bytes we asked for: start over without a range
                response.close()
                part.unlink()
                return _download(url, part, final, sha256, timeout=timeout, progress=progress)
            done, mode = offset, "ab"
        else:  # 200: the server sends the whole file, whatever the range asked
            done, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = done + int(length) if length and length.isdigit() else None
        with open(part, mode) as out:
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(final.name, done, total)
            except (OSError, http.client.HTTPException):  # reset or timed out mid-body: keep what came
                pass
            out.flush()
            os.fsync(out.fileno())
    if total is not None and done < total:
        raise DataError(f"Download of {url} stopped at {done} of {total} bytes; the partial file "
                        f"'{part}' is kept, run the same command again to resume it.")
    _verify_and_rename(part, final, sha256, url)


def _verify_and_rename(part: Path, final: Path, sha256: str, url: str) -> None:
    got = sha256_file(part)
    if got != sha256:
        part.unlink()
        raise DataError(f"{final.name} from {url} has sha256 {got}, expected {sha256}; the download was "
                        "deleted: run the command again, and if it fails again the mirror serves a different "
                        "file (pass another as base_url).")
    if final.exists():  # someone else finished first: keep their verified copy
        part.unlink()
        return
    os.replace(part, final)
    fsync_dir(final.parent)


def _range_start(content_range: str | None) -> int | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (content_range or "").strip())
    return int(match.group(1)) if match else None


