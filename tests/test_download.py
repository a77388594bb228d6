"""softkd.data.download over real HTTP on loopback: verified arrival, resume, restarts, failures."""

import hashlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from softkd.data import download
from softkd.data.datasets import MNIST_FILES
from softkd.data.download import SOURCES, Source, fetch
from softkd.errors import DataError, UnknownNameError

FILES = {"a.gz": bytes(range(256)) * 400, "b.gz": b"softkd" * 5000}  # 102,400 and 30,000 bytes
HASHES = {name: hashlib.sha256(body).hexdigest() for name, body in FILES.items()}


class _Handler(BaseHTTPRequestHandler):
    """Serves ``FILES`` honouring ``Range``, or misbehaves as ``server.modes[file]`` says."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        state = self.server.state
        name = self.path.rsplit("/", 1)[-1]
        asked = self.headers.get("Range")
        state.requests.append((name, asked))
        mode = state.modes.get(name, "ok")
        if isinstance(mode, int) or name not in FILES:
            self.send_error(mode if isinstance(mode, int) else 404)
            return
        body = FILES[name]
        if mode == "corrupt":
            body = body[:-1] + bytes([body[-1] ^ 1])
        start = int(re.fullmatch(r"bytes=(\d+)-", asked).group(1)) if asked and mode != "ignore-range" else 0
        if start >= len(body) and asked:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "wrong-range" and asked:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(body)}")
        elif start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if mode == "truncate":  # promise everything, send half, hang up; behave next time
            state.modes[name] = "ok"
            self.wfile.write(payload[: len(payload) // 2])
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


class _State:
    def __init__(self, url):
        self.url, self.modes, self.requests = url, {}, []


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = _State(f"http://127.0.0.1:{httpd.server_port}/data/")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def dead_url():
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(autouse=True)
def toy(monkeypatch, dead_url):
    """A registered 'toy' download whose canonical mirror is dead, so only base_url can reach it."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setitem(SOURCES, "toy", Source(mirrors=(dead_url,), files=dict(HASHES)))


def test_files_arrive_verified_with_progress(tmp_path, server):
    seen = []
    assert fetch("toy", tmp_path, base_url=server.url, progress=lambda *a: seen.append(a)) == tmp_path
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == FILES
    assert seen[-1] == ("b.gz", len(FILES["b.gz"]), len(FILES["b.gz"]))
    assert ("a.gz", len(FILES["a.gz"]), len(FILES["a.gz"])) in seen


def test_truncated_transfer_keeps_part_and_resumes_with_range(tmp_path, server):
    server.modes["a.gz"] = "truncate"
    with pytest.raises(DataError, match=r"stopped at 51200 of 102400 bytes.*run the same command again"):
        fetch("toy", tmp_path, base_url=server.url)
    assert (tmp_path / "a.gz.part").stat().st_size == 51200
    assert not (tmp_path / "a.gz").exists()
    fetch("toy", tmp_path, base_url=server.url)
    assert ("a.gz", "bytes=51200-") in server.requests
    assert (tmp_path / "a.gz").read_bytes() == FILES["a.gz"]
    assert not (tmp_path / "a.gz.part").exists()


@pytest.mark.parametrize("mode", ["ignore-range", "wrong-range"])
def test_server_answering_range_with_whole_file_restarts_cleanly(tmp_path, server, mode):
    (tmp_path / "a.gz.part").write_bytes(b"x" * 1000)  # stale bytes that must not survive
    server.modes["a.gz"] = mode
    fetch("toy", tmp_path, base_url=server.url)
    assert ("a.gz", "bytes=1000-") in server.requests
    assert (tmp_path / "a.gz").read_bytes() == FILES["a.gz"]


def test_complete_part_is_verified_when_nothing_is_left_to_send(tmp_path, server):
    (tmp_path / "a.gz.part").write_bytes(FILES["a.gz"])
    fetch("toy", tmp_path, base_url=server.url)  # the server answers 416
    assert (tmp_path / "a.gz").read_bytes() == FILES["a.gz"]


def test_wrong_checksum_deletes_the_download(tmp_path, server):
    server.modes["a.gz"] = "corrupt"
    got = hashlib.sha256(FILES["a.gz"][:-1] + bytes([FILES["a.gz"][-1] ^ 1])).hexdigest()
    with pytest.raises(DataError, match=f"a.gz from .* has sha256 {got}, expected {HASHES['a.gz']}.*run the"):
        fetch("toy", tmp_path, base_url=server.url)
    assert not (tmp_path / "a.gz").exists() and not (tmp_path / "a.gz.part").exists()


@pytest.mark.parametrize("status", [404, 500])
def test_http_errors_name_url_and_status(tmp_path, server, status):
    server.modes["b.gz"] = status
    with pytest.raises(DataError, match=f"{re.escape(server.url)}b.gz answered HTTP {status}"):
        fetch("toy", tmp_path, base_url=server.url)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gz"]


def test_connection_errors_name_every_mirror(tmp_path, dead_url):
    with pytest.raises(DataError, match=f"Cannot download a.gz of toy: cannot reach {re.escape(dead_url)}a.gz"):
        fetch("toy", tmp_path, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_mirrors_are_tried_in_order(tmp_path, server, dead_url, monkeypatch):
    monkeypatch.setitem(SOURCES, "toy", Source(mirrors=(dead_url, server.url), files=dict(HASHES)))
    fetch("toy", tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == FILES


def test_verified_files_are_not_downloaded_again(tmp_path, server):
    fetch("toy", tmp_path, base_url=server.url)
    server.requests.clear()
    fetch("toy", tmp_path, base_url=server.url)
    assert server.requests == []


def test_good_file_survives_a_failed_download(tmp_path, server):
    (tmp_path / "a.gz").write_bytes(FILES["a.gz"])
    server.modes.update({"a.gz": 500, "b.gz": 500})
    with pytest.raises(DataError, match="HTTP 500"):
        fetch("toy", tmp_path, base_url=server.url)
    assert (tmp_path / "a.gz").read_bytes() == FILES["a.gz"]
    assert [name for name, _ in server.requests] == ["b.gz"]


def test_foreign_file_under_final_name_is_reported_not_replaced(tmp_path, server):
    (tmp_path / "a.gz").write_bytes(b"mine")
    with pytest.raises(DataError, match="exists but its sha256 is .* delete it and fetch toy again"):
        fetch("toy", tmp_path, base_url=server.url)
    assert (tmp_path / "a.gz").read_bytes() == b"mine" and server.requests == []


def test_default_destination_is_the_user_cache(tmp_path, server, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fetch("toy", base_url=server.url) == tmp_path / "softkd" / "toy"
    assert (tmp_path / "softkd" / "toy" / "b.gz").read_bytes() == FILES["b.gz"]


def test_unknown_name(tmp_path):
    with pytest.raises(UnknownNameError, match="Unknown download 'cifar': known downloads are fashion-mnist, mnist"):
        fetch("cifar", tmp_path)


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_sources_pin_the_four_archives(name):
    source = download.SOURCES[name]
    assert sorted(source.files) == sorted(f"{stem}.gz" for stem in MNIST_FILES.values())
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in source.files.values())
    assert all(url.startswith("http") and url.endswith("/") for url in source.mirrors)


def test_cli_data_fetch_over_loopback(tmp_path, server):
    from typer.testing import CliRunner

    from softkd.cli import app

    result = CliRunner().invoke(app, ["data", "fetch", "toy", "--dest", str(tmp_path / "d"), "--base-url", server.url])
    assert result.exit_code == 0, result.output
    assert "files verified" in result.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == FILES
    bad = CliRunner().invoke(app, ["data", "fetch", "nope"])
    assert bad.exit_code == 2 and "Unknown download 'nope'" in bad.output
