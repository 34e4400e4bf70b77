"""The url layout's fetcher against hostile servers, all on 127.0.0.1: schemes, size cap, one
deadline per fetch (slow bodies, slow headers, slow TLS handshakes), concurrent fetching.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_fetch.py

Every server here stops sending after a few seconds, so a fetcher without the limits under test
fails these tests in bounded time instead of hanging them.
"""
from __future__ import annotations

import http.server
import io
import json
import socketserver
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_cluster.data.manifest import load_manifest
from shards.build import main as build_main
from shards.fetch import FetchError, fetch_in_order, urllib_fetch

DRIP_STEP, DRIP_BYTES = 0.1, 40  # a byte every 0.1 s for 4 s: past every deadline used here
MARGIN = 0.6  # seconds a fetch may overrun its deadline (timer wake-up, a loaded CI machine)


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    active, peak, lock = 0, 0, threading.Lock()

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict = None, length: bool = True) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's name
        try:
            self._route(self.path)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what the limits are for

    def _route(self, path: str) -> None:
        if path.startswith("/img/"):
            self._send(200, jpeg(int(path.split("/")[2].split(".")[0])), {"Content-Type": "image/jpeg"})
        elif path.startswith("/slow/"):  # for concurrency: count the requests in progress
            with Handler.lock:
                Handler.active += 1
                Handler.peak = max(Handler.peak, Handler.active)
            time.sleep(0.3)
            with Handler.lock:
                Handler.active -= 1
            self._send(200, jpeg(int(path.split("/")[2].split(".")[0])))
        elif path == "/huge-announced":
            self.send_response(200)
            self.send_header("Content-Length", str(50_000_000))
            self.end_headers()
            self.wfile.write(b"\0" * 65536)
        elif path == "/huge-streamed":  # no length: only counting the bytes finds the size
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(80):
                self.wfile.write(b"\0" * 65536)
        elif path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", str(DRIP_BYTES))
            self.end_headers()
            for _ in range(DRIP_BYTES):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(DRIP_STEP)
        elif path.startswith("/redirect/"):
            self._send(302, b"", {"Location": path[len("/redirect/"):]})
        else:
            self._send(404)


class DripServer(socketserver.ThreadingTCPServer):
    """Raw TCP: sends `prefix`, then one byte of `drip` per DRIP_STEP (a slow status line / TLS record)."""
    daemon_threads, allow_reuse_address = True, True

    def __init__(self, prefix: bytes, drip: bytes):
        self.prefix, self.drip = prefix, drip
        super().__init__(("127.0.0.1", 0), DripHandler)


class DripHandler(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            self.request.sendall(self.server.prefix)
            for byte in self.server.drip:
                time.sleep(DRIP_STEP)
                self.request.sendall(bytes([byte]))
        except OSError:
            pass


def _serve(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def http_base():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    _serve(server)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _timed_failure(url: str, match: str, timeout: float = 1.0, **kw) -> float:
    start = time.monotonic()
    with pytest.raises(FetchError, match=match):
        urllib_fetch(url, timeout=timeout, retries=3, backoff=0.05, **kw)
    return time.monotonic() - start


def test_a_normal_image_is_fetched(http_base):
    assert urllib_fetch(f"{http_base}/img/3.jpg", timeout=5) == jpeg(3)


def test_file_and_other_schemes_are_refused(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg(0))
    for url in (secret.as_uri(), secret.as_uri().replace("file:", "FILE:"), "ftp://127.0.0.1/x.jpg",
                "data:image/jpeg;base64,AAAA", str(secret)):
        with pytest.raises(FetchError, match="only http and https"):
            urllib_fetch(url, timeout=2, retries=0)


def test_redirects_to_other_schemes_are_refused(http_base, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg(0))
    for target in (secret.as_uri(), "ftp://127.0.0.1/x.jpg"):
        elapsed = _timed_failure(f"{http_base}/redirect/{target}", "302|only http and https")
        assert elapsed < 1.0  # refused at once, not retried
    assert urllib_fetch(f"{http_base}/redirect//img/4.jpg", timeout=5) == jpeg(4)  # http -> http is fine


def test_bodies_over_the_cap_are_aborted(http_base):
    assert _timed_failure(f"{http_base}/huge-announced", "announced", max_bytes=1_000_000) < 1.0
    assert _timed_failure(f"{http_base}/huge-streamed", "larger than", timeout=5, max_bytes=1_000_000) < 2.0


def test_a_dripping_body_stops_at_the_deadline(http_base):
    """The old fetcher's timeout applied to each read: this body (a byte per 0.1 s) took 4 s."""
    elapsed = _timed_failure(f"{http_base}/drip", "in the fetch timeout", timeout=1.0)
    assert 0.9 < elapsed < 1.0 + MARGIN


@pytest.mark.parametrize("scheme, head, body", [
    ("http", b"HTTP/1.1 200 OK\r\nX-Pad: ", b"a"),  # headers that never end
    ("https", b"\x16\x03\x03\x40\x00", b"\x02"),  # a TLS record announcing 16 kB of handshake
], ids=["headers", "tls-handshake"])
def test_a_dripping_server_stops_at_the_deadline(scheme, head, body):
    """A byte per 0.1 s: the fetch still ends at its one deadline."""
    server = _serve(DripServer(head, body * DRIP_BYTES))
    try:
        elapsed = _timed_failure(f"{scheme}://127.0.0.1:{server.server_address[1]}/x.jpg", "in the fetch timeout",
                                 timeout=1.0)
    finally:
        server.shutdown()
        server.server_close()
    assert elapsed < 1.0 + MARGIN


def test_fetch_in_order_is_concurrent_and_ordered(http_base):
    Handler.peak = 0
    urls = [f"{http_base}/slow/{i}.jpg" for i in range(8)] + [f"{http_base}/missing"]
    start = time.monotonic()
    results = list(fetch_in_order(lambda url: urllib_fetch(url, timeout=5, retries=0), urls, workers=4))
    elapsed = time.monotonic() - start
    assert [url for url, _ in results] == urls
    assert [data for _, data in results[:8]] == [jpeg(i) for i in range(8)]
    assert isinstance(results[8][1], FetchError)  # the failure comes back in its place
    assert Handler.peak == 4 and elapsed < 8 * 0.3 * 0.75  # 4 at a time, never more


def yfcc_line(line: int, photo_id: int, url: str) -> str:
    fields = [f"col{i}" for i in range(25)]
    fields[0], fields[1], fields[16], fields[24] = str(line), str(photo_id), url, "0"
    return "\t".join(fields)


def test_url_build_counts_refused_urls_and_keeps_metadata_order(http_base, tmp_path):
    """file:// lines never reach a fetcher (bad_url); too large, too slow, redirected to a file:
    fetch_error; the rest fetched 4 at a time, written in metadata order."""
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg(99))
    urls = {100 + i: f"{http_base}/slow/{i}.jpg" for i in range(6)}
    urls.update({200: secret.as_uri(), 201: f"{http_base}/huge-announced", 202: f"{http_base}/drip",
                 203: f"{http_base}/redirect/{secret.as_uri()}"})
    (tmp_path / "meta.tsv").write_text("\n".join(yfcc_line(i, pid, url) for i, (pid, url) in
                                                 enumerate(sorted(urls.items()))) + "\n")
    assert build_main(["yfcc", str(tmp_path / "meta.tsv"), "--layout", "url", "--out", str(tmp_path / "out"),
                       "--fetch-workers", "4", "--fetch-timeout", "1", "--fetch-retries", "0",
                       "--max-bytes", "1000000"]) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest.skipped == {"bad_url": 1, "fetch_error": 3}
    with tarfile.open(tmp_path / "out" / manifest.shards[0].name) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    keys = [name.split(".")[0] for name in members if name.endswith(".jpg")]
    assert keys == [str(pid) for pid in range(100, 106)]
    assert all(members[f"{100 + i}.jpg"] == jpeg(i) for i in range(6))
    assert jpeg(99) not in members.values()
    assert json.loads(members["100.json"])["url"] == urls[100]


def test_fetch_options_are_checked(tmp_path):
    (tmp_path / "meta.tsv").write_text(yfcc_line(0, 1, "http://127.0.0.1:9/x.jpg") + "\n")
    with pytest.raises(SystemExit, match="fetch-workers"):
        build_main(["yfcc", str(tmp_path / "meta.tsv"), "--layout", "url", "--out", str(tmp_path / "o"),
                    "--fetch-workers", "0"])
    with pytest.raises(SystemExit, match="--fetcher nosuchmodule_x:get"):
        build_main(["yfcc", str(tmp_path / "meta.tsv"), "--layout", "url", "--out", str(tmp_path / "o"),
                    "--fetcher", "nosuchmodule_x:get"])
    assert Path(tmp_path / "meta.tsv").exists()
