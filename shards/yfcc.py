"""YFCC100M: photos listed in the official metadata file, read from a tree, zips, or URLs.

    python shards/build.py yfcc yfcc100m_dataset.bz2 --images /data/yfcc --layout zip --out data/yfcc

Metadata: the official `yfcc100m_dataset` file (plain, .bz2 or .gz), tab-separated, 25 columns,
0-based indices used here (each one an option, `--col-*`):
    0 line number      1 photo/video id   ...   15 page URL   16 download URL   ...
    24 photo/video marker (0 = photo, 1 = video)
Videos are skipped and counted (`video`); a line with too few columns or a non-numeric id/line
number is counted as `bad_line`. Key = photo id (unique in YFCC100M; not checked, which would
need a 100M-entry set in memory).

Image layouts:
    tree  ROOT/<photo id>.jpg
    zip   the original DeeperCluster layout: d = line number zero-padded to 8 digits,
          archive ROOT/d[0:2]/d[2:5].zip, member d[5:8].jpg. Each archive is opened once per
          shard-writing task (the original opened one per image).
    url   the download URL through a pluggable `fetch(url) -> bytes` (default: shards/fetch.py's
          urllib_fetch: http/https only, a byte cap, one deadline per URL, retries with backoff),
          `fetch_workers` URLs at a time per shard-writing process. URLs of another scheme
          (file://...) are never passed to the fetcher: counted as `bad_url`. The fetcher is chosen
          by whoever runs the build (--fetcher), never by a data file.
"""
from __future__ import annotations

import bz2
import contextlib
import functools
import gzip
import itertools
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from .fetch import FetchError, allowed_url, fetch_in_order, urllib_fetch  # noqa: F401 - FetchError, urllib_fetch: re-exported
from .images import SkipSample
from .sources import BuildError, Record, Source, read_file_bytes

LAYOUTS = ("tree", "zip", "url")


@dataclass(frozen=True)
class YfccColumns:
    line: int = 0  # line number: the zip layout's index
    photo_id: int = 1  # the key
    url: int = 16  # photo/video download URL
    marker: int = 24  # 0 = photo, 1 = video


def zip_location(line: int) -> tuple[str, str]:
    """(archive path relative to ROOT, member name) of the photo on metadata line `line`."""
    if not 0 <= line < 10 ** 8:
        raise SkipSample("bad_line", f"line number {line} does not fit 8 digits")
    digits = f"{line:08d}"
    return f"{digits[0:2]}/{digits[2:5]}.zip", f"{digits[5:8]}.jpg"


class ZipArchives:
    """The zip layout reader of one shard task: archives opened on first use and kept open (LRU,
    at most `max_open`), so a shard of consecutive lines opens each of its archives once."""

    def __init__(self, root: str, max_open: int = 32):
        self.root, self.max_open = Path(root), max_open
        self._open: OrderedDict[str, Optional[tuple[zipfile.ZipFile, dict]]] = OrderedDict()

    def _archive(self, relative: str) -> Optional[tuple[zipfile.ZipFile, dict]]:
        if relative in self._open:
            self._open.move_to_end(relative)
            return self._open[relative]
        try:
            archive = zipfile.ZipFile(self.root / relative)
            # archives made with a folder prefix: find members by basename too
            by_basename = {Path(n).name: n for n in archive.namelist()}
            entry = (archive, by_basename)
        except (OSError, zipfile.BadZipFile):
            entry = None  # remembered, so a missing archive is not retried for each of its photos
        self._open[relative] = entry
        if len(self._open) > self.max_open:
            _, evicted = self._open.popitem(last=False)
            if evicted is not None:
                evicted[0].close()
        return entry

    def read(self, record: Record) -> bytes:
        relative, member = zip_location(record.ref[0])
        entry = self._archive(relative)
        if entry is None:
            raise SkipSample("missing", f"archive {relative}")
        archive, by_basename = entry
        name = by_basename.get(member)
        if name is None:
            raise SkipSample("missing", f"{relative}:{member}")
        try:
            return archive.read(name)
        except (zipfile.BadZipFile, zlib.error, OSError) as err:
            raise SkipSample("bad_archive", f"{relative}:{member}: {err}") from None

    def close(self) -> None:
        for entry in self._open.values():
            if entry is not None:
                entry[0].close()
        self._open.clear()


def open_text(path: Path):
    """Metadata as text, transparently decompressed (.bz2 as distributed, .gz)."""
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", errors="replace")


def _callable_name(fn: Callable) -> str:
    fn = fn.func if isinstance(fn, functools.partial) else fn
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class YfccSource(Source):
    kind = "yfcc"
    default_name = "yfcc"
    default_shard_size = 10000
    image_ext = "jpg"

    def __init__(self, metadata: str, images: Optional[str] = None, layout: str = "tree",
                 columns: YfccColumns = YfccColumns(), fetch: Optional[Callable[[str], bytes]] = None,
                 limit: Optional[int] = None, start: int = 0, fetch_workers: int = 1):
        super().__init__(limit)
        if start < 0:
            raise BuildError(f"start must be >= 0, got {start}")
        self.start = start  # skip this many metadata lines first (job-array slices, shards/ingest.py)
        if layout not in LAYOUTS:
            raise BuildError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.metadata, self.layout, self.columns = str(Path(metadata).resolve()), layout, columns
        if not Path(self.metadata).is_file():
            raise BuildError(f"YFCC metadata file {metadata} not found")
        if layout in ("tree", "zip"):
            if not images or not Path(images).is_dir():
                raise BuildError(f"--images ROOT (an existing folder) is required for layout {layout!r}, "
                                 f"got {images!r}")
        self.images = str(Path(images).resolve()) if images else None
        self.fetch = fetch or urllib_fetch
        if fetch_workers < 1:
            raise BuildError(f"--fetch-workers must be >= 1, got {fetch_workers}")
        self.fetch_workers = fetch_workers

    def records(self) -> Iterator[Record]:
        cols = self.columns
        with open_text(Path(self.metadata)) as lines:
            for count, line in enumerate(itertools.islice(lines, self.start, None)):
                if self.limit is not None and count >= self.limit:
                    break
                fields = line.rstrip("\r\n").split("\t")
                if fields == [""]:
                    continue  # blank line
                try:
                    photo_id, line_number = fields[cols.photo_id], int(fields[cols.line])
                    url, marker = fields[cols.url], fields[cols.marker].strip()
                except (IndexError, ValueError):
                    self.skipped["bad_line"] += 1
                    continue
                if not photo_id.isdigit():
                    self.skipped["bad_line"] += 1
                elif marker == "1":
                    self.skipped["video"] += 1
                else:
                    yield Record(photo_id, (line_number, url), None,
                                 {"photo_id": photo_id, "line": line_number, "url": url})

    @contextlib.contextmanager
    def open_reader(self):
        if self.layout == "url":
            yield UrlReader(self)
            return
        if self.layout == "tree":
            yield self
            return
        archives = ZipArchives(self.images)
        try:
            yield archives
        finally:
            archives.close()

    def read(self, record: Record) -> bytes:
        if self.layout == "tree":
            return read_file_bytes(Path(self.images) / f"{record.key}.jpg")
        url = record.ref[1]
        if not allowed_url(url):  # file://, ftp://...: whatever the fetcher, nothing is opened
            raise SkipSample("bad_url", f"{url!r}: only http and https URLs are fetched")
        try:
            return self.fetch(url)
        except Exception as err:  # noqa: BLE001 - any fetcher failure is a counted skip
            raise SkipSample("fetch_error", f"{url}: {err}") from None

    def describe(self) -> dict:
        described = {"type": self.kind, "metadata": self.metadata, "images": self.images,
                     "layout": self.layout, "columns": asdict(self.columns)}
        if self.layout == "url":
            described["fetcher"] = _callable_name(self.fetch)
        if self.start:  # only when set: unsliced builds keep their fingerprints (shard reuse)
            described["start"] = self.start
        return described


class UrlReader:
    """The url layout's reader of one shard task: read_all fetches the shard's URLs concurrently
    (source.fetch_workers threads), in record order, so shards do not depend on the timing."""

    def __init__(self, source: YfccSource):
        self.source = source

    def read(self, record: Record) -> bytes:
        return self.source.read(record)

    def read_all(self, records: list) -> Iterator[tuple[Record, object]]:
        """(record, bytes or the SkipSample it was skipped with), in order."""
        yield from fetch_in_order(self.source.read, records, self.source.fetch_workers)
