"""Fetching URLs from a metadata file (YFCC100M's url layout): third-party input, fetched with limits.

    data = urllib_fetch("https://...", timeout=10, retries=3, max_bytes=20_000_000)   # or FetchError
    for item, result in fetch_in_order(read, items, workers=8):   # result: read(item) or its exception

Limits of urllib_fetch (each raises FetchError; YfccSource counts it as fetch_error):
- schemes: http and https only, for the URL and for every redirect. urllib.request.urlopen alone
  opens file:// URLs (a metadata line could read any local file into the shards) and follows
  redirects to ftp://; the opener here has no file, ftp or data handler at all.
- size: at most max_bytes of body, refused from Content-Length when announced, else while reading.
- time: `timeout` bounds the whole call (connection, TLS handshake, redirects, headers, body,
  retries and their backoff). A socket timeout only bounds each read, so one byte every 2 s kept a
  fetch alive indefinitely; here a watchdog timer shuts the fetch's sockets down at the deadline,
  which wakes whatever read is blocked on them. Not covered: DNS resolution (getaddrinfo blocks in
  C and cannot be interrupted from Python), bounded by the resolver's own timeouts.
Not retried: HTTP 4xx other than 408/429, a refused scheme, a body over max_bytes, the deadline.

For very large URL lists (the 100M of YFCC100M), img2dataset is the field's dedicated downloader
(DNS caching, per-host rate limits, resizing); its output can be re-sharded with `build.py folder`.
"""
from __future__ import annotations

import collections
import functools
import http.client
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_MAX_BYTES = 20_000_000  # a YFCC photo at Flickr's largest size is a few MB
_CHUNK = 1 << 16


class FetchError(Exception):
    pass


class _Final(FetchError):
    """A failure another attempt would repeat: not retried."""


def allowed_url(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme.lower() in ALLOWED_SCHEMES


def _check_scheme(url: str) -> None:
    if not allowed_url(url):
        raise _Final(f"{url!r}: only http and https URLs are fetched")


class _Deadline:
    """One fetch's end time; when reached, every socket the fetch opened is shut down."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if not self.expired:
                return
        _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    """Wakes a read blocked on sock (it returns EOF or fails). The plain socket method, also for an
    SSLSocket: SSLSocket.shutdown would first drop its TLS object under the reading thread."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed, or a plain socket detached into an SSLSocket
        pass


def _watch(conn: http.client.HTTPConnection, deadline: _Deadline) -> None:
    """Register the connection's TCP socket with the deadline as soon as it exists."""
    conn.deadline, create = deadline, conn._create_connection

    def create_and_register(*args, **kwargs):
        sock = create(*args, **kwargs)
        deadline.add(sock)
        return sock
    conn._create_connection = create_and_register


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        _watch(self, deadline)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        _watch(self, deadline)

    def connect(self) -> None:
        """HTTPSConnection.connect, with the TLS socket registered before its handshake (which
        wrap_socket would otherwise run before the watchdog could see that socket)."""
        http.client.HTTPConnection.connect(self)  # TCP, and a proxy's CONNECT tunnel
        host = self._tunnel_host or self.host
        sock = self._context.wrap_socket(self.sock, server_hostname=host, do_handshake_on_connect=False)
        self.deadline.add(sock)
        sock.do_handshake()
        self.sock = sock


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, deadline=self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, deadline=self.deadline), req)


class _Redirects(urllib.request.HTTPRedirectHandler):
    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_scheme(newurl)  # urllib itself lets ftp:// through
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """http(s) only: no FileHandler, FTPHandler or DataHandler (build_opener would add them)."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), _HTTPHandler(deadline),
                    _HTTPSHandler(deadline), urllib.request.HTTPDefaultErrorHandler(), _Redirects(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _read_body(response, url: str, deadline: _Deadline, max_bytes: int) -> bytes:
    announced = response.headers.get("Content-Length", "")
    if announced.isdigit() and int(announced) > max_bytes:
        raise _Final(f"{url}: {announced} bytes announced, more than --max-bytes {max_bytes}")
    chunks, size = [], 0
    while True:
        chunk = response.read1(_CHUNK)  # one socket read at most: the deadline is checked between reads
        if deadline.expired:  # the watchdog's shutdown reads as an early EOF: not a complete body
            raise _Final(f"{url}: no complete response in the fetch timeout")
        if not chunk:
            break
        size += len(chunk)
        if size > max_bytes:
            raise _Final(f"{url}: body larger than --max-bytes {max_bytes}")
        chunks.append(chunk)
    if announced.isdigit() and size != int(announced):
        raise FetchError(f"{url}: {size} of {announced} bytes before the connection closed")
    return b"".join(chunks)


def urllib_fetch(url: str, timeout: float = 10.0, retries: int = 3, backoff: float = 0.5,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """GET url within `timeout` seconds in all (see the module docstring); transient failures
    (network, 5xx, 408, 429) are retried with exponential backoff while time is left."""
    _check_scheme(url)
    last_error: Exception = FetchError("no attempt")
    with _Deadline(timeout) as deadline:
        opener = _opener(deadline)
        for attempt in range(retries + 1):
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "dist_cluster-shards"})
                with opener.open(request, timeout=max(deadline.remaining(), 1e-3)) as response:
                    if "photo_unavailable" in response.geturl():
                        # Flickr redirects deleted photos to a placeholder image: not the photo
                        raise _Final(f"{url}: photo unavailable")
                    return _read_body(response, url, deadline, max_bytes)
            except _Final:
                raise
            except urllib.error.HTTPError as err:
                err.close()
                if err.code < 500 and err.code not in (408, 429):
                    raise _Final(f"{url}: HTTP {err.code} {err.reason}") from None
                last_error = err
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
                last_error = err
            if deadline.expired:
                raise _Final(f"{url}: no complete response in the fetch timeout of {timeout} s")
            pause = backoff * 2 ** attempt
            if attempt == retries or pause >= deadline.remaining():
                break
            time.sleep(pause)
    raise FetchError(f"{url}: {last_error!r} after {attempt + 1} attempts")


def _outcome(read: Callable, item):
    try:
        return read(item)
    except Exception as err:  # noqa: BLE001 - handed to the consumer, who decides
        return err


def fetch_in_order(read: Callable, items: Iterable, workers: int) -> Iterator[tuple]:
    """(item, read(item) or the exception it raised) for each item, in the items' order, with up to
    `workers` reads running at once in threads (I/O bound: the GIL is released while waiting).
    At most 2 x workers results are held, so memory stays bounded by 2 x workers x max_bytes."""
    if workers <= 1:
        yield from ((item, _outcome(read, item)) for item in items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="fetch")
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append((item, pool.submit(_outcome, read, item)))
            if len(pending) >= 2 * workers:
                item, future = pending.popleft()
                yield item, future.result()
        while pending:
            item, future = pending.popleft()
            yield item, future.result()
    finally:  # a consumer that stops early: queued reads are dropped, running ones end by their deadline
        pool.shutdown(wait=True, cancel_futures=True)
