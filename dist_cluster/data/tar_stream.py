"""The regular files of an uncompressed tar, as (name, bytes), one slice-and-int per 512-byte header.

    with open(path, "rb") as f:
        for name, data in tar_members(f):   # 'dir/abc.png', b'\\x89PNG...'
            ...

Why not tarfile: it builds a TarInfo per member (every field parsed, ~40 us); a 28 px Fashion-MNIST
sample is three members (.png .cls .json), so tarfile alone cost 128 us of the loader's ~410 us per
training image (bench/loader.py). Only what a WebDataset shard needs is parsed here: name (ustar
prefix, GNU long name 'L', pax 'path'), size (octal, GNU base-256, pax 'size'), type, and the
header checksum, so a corrupt header still ends the stream with an error instead of garbage.
Compressed tars (.tar.gz...) are not handled: `is_plain_tar` tells the caller to use tarfile.

Errors: TarHeaderError (a tarfile.HeaderError) for a header that fails its checksum or says
nothing parsable, EOFError for a stream cut inside a header or a member. The end: two zero blocks
(or one, or EOF between members, as tarfile accepts).
"""
from __future__ import annotations

import tarfile
from typing import BinaryIO, Iterator

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bz2, xz, zstd


class TarHeaderError(tarfile.HeaderError):
    """A header block that is not a valid tar header (bad checksum, unparsable number)."""


def is_plain_tar(head: bytes) -> bool:
    """False for the first bytes of a compressed file (gzip, bz2, xz, zstd): tarfile reads those."""
    return not any(head.startswith(magic) for magic in _COMPRESSED_MAGIC)


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (high bit of byte 0 set)."""
    if field[0] & 0x80:  # base-256, two's complement; 0xff first: negative
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarHeaderError(f"bad number field {field!r}") from None


def _check_sum(header: bytes) -> None:
    stored = _number(header[148:156])
    # the checksum field counts as 8 spaces; old tars summed signed bytes, tarfile accepts both
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored != unsigned:
        # a byte over 127 counts as b - 256 in a signed sum (rare: non-ASCII names); the field itself is spaces
        signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127)
        if stored != signed:
            raise TarHeaderError(f"header checksum {stored} != {unsigned}")


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _header_name(header: bytes) -> str:
    name = _text(header[:100])
    if header[257:263] == b"ustar\x00":  # POSIX ustar: a 155-byte prefix (GNU uses those bytes otherwise)
        prefix = _text(header[345:500])
        if prefix:
            name = f"{prefix}/{name}"
    return name


def _pax_records(data: bytes) -> dict[str, str]:
    """'%d %s=%s\\n' records (the length counts the whole record) -> {keyword: value}."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        length = int(data[pos:space]) if data[pos:space].isdigit() else 0
        if space < 0 or length <= space - pos:
            raise TarHeaderError(f"bad pax record at byte {pos}: {data[pos:pos + 32]!r}")
        keyword, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[keyword.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _read_member(fileobj: BinaryIO, size: int, header: bytes) -> bytes:
    data = fileobj.read(size)
    if len(data) < size:
        raise EOFError(f"tar cut inside member {_header_name(header)!r}: {len(data)} of {size} bytes")
    return data


def tar_members(fileobj: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file, in stream order; links, directories and the like are passed over."""
    long_name, pax = None, {}
    while True:
        header = fileobj.read(BLOCK)
        if not header or header == _ZERO_BLOCK:
            return
        if len(header) < BLOCK:
            raise EOFError(f"tar cut inside a header: {len(header)} of {BLOCK} bytes")
        _check_sum(header)
        kind = header[156:157]
        size = int(pax["size"]) if pax.get("size", "").isdigit() else _number(header[124:136])
        if size < 0:
            raise TarHeaderError(f"negative member size {size}")
        data = _read_member(fileobj, size, header)
        fileobj.read(-size % BLOCK)  # padding to the next block; a cut here ends at the next header read
        if kind == b"L":  # GNU long name: the next header's name
            long_name = _text(data)
            continue
        if kind == b"x":  # pax extended header: overrides for the next header
            pax = _pax_records(data)
            continue
        if kind in (b"g", b"K"):  # pax global header, GNU long link name: nothing a shard needs
            continue
        name = pax.get("path") or long_name or _header_name(header)
        long_name, pax = None, {}
        if kind in _REGULAR:
            yield name, data
