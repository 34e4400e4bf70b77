"""dist_cluster.data.tar_stream against Python's tarfile (the reference reader of the same formats).

    pytest tests/test_tar_stream.py
"""
from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from dist_cluster.data.tar_stream import TarHeaderError, _number, is_plain_tar, tar_members
from dist_cluster.data.worker import read_tar

LONG = "d" * 120 + "/sample-with-a-name-longer-than-the-100-byte-field.png"
NAMES = ["a.png", "a.cls", "dir/b.jpg", "dir/b.json", LONG, "caf\u00e9/\u00fcber.png", "empty.cls"]


def _info(name: str, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    for field, value in fields.items():
        setattr(info, field, value)
    return info


def _tar_bytes(fmt: int, names=NAMES, extras: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = bytes(range(256)) * i + name.encode()  # sizes 0 mod 512 and not
            if name == "empty.cls":
                data = b""
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if extras and i == 1:  # members a shard never holds: passed over, not yielded
                tar.addfile(_info("a_dir", type=tarfile.DIRTYPE))
                tar.addfile(_info("a_link", type=tarfile.SYMTYPE, linkname="a.png"))
    return buf.getvalue()


def _reference(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_members_equal_tarfile(fmt):
    names = [n for n in NAMES if fmt != tarfile.USTAR_FORMAT or n != LONG]  # ustar: name <= 256 B, one '/' cut
    names += ["p" * 90 + "/" + "q" * 60 + ".png"] if fmt == tarfile.USTAR_FORMAT else []  # the 155-byte prefix
    raw = _tar_bytes(fmt, names)
    got = list(tar_members(io.BytesIO(raw)))
    assert got == _reference(raw)
    assert [n for n, _ in got] == names


def test_number_fields_equal_tarfile():
    """Octal and GNU base-256 (sizes over 8 GiB, negative mtimes) decode as tarfile's nti does."""
    for value in (0, 7, 511, 8 ** 11 - 1, 8 ** 11, 2 ** 40 + 3, -5):
        field = tarfile.itn(value, 12, tarfile.GNU_FORMAT)
        assert _number(field) == tarfile.nti(field) == value
    assert _number(b"0000644 \0") == 0o644


def _layout(raw: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return tar.getmembers()  # .offset: header start (a pax member: its 'x' header), .offset_data


def test_cut_tar_gives_the_members_before_the_cut_then_eof():
    raw = _tar_bytes(tarfile.PAX_FORMAT, extras=False)
    whole, layout = _reference(raw), _layout(raw)
    cuts = [(n, m.offset_data + m.size // 2) for n, m in enumerate(layout) if m.size >= 2]  # inside a member
    cuts += [(n, m.offset + 100) for n, m in enumerate(layout)]  # inside a header
    for n, cut in cuts:
        got = []
        with pytest.raises(EOFError):
            for member in tar_members(io.BytesIO(raw[:cut])):
                got.append(member)
        assert got == whole[:n]
    # cut exactly between members: the stream ends there without an error, as tarfile's does
    offsets = [m.offset for m in layout]
    assert list(tar_members(io.BytesIO(b""))) == []  # tarfile: ReadError('empty file'); read_tar: short either way
    for n, offset in enumerate(offsets[1:], start=1):
        assert list(tar_members(io.BytesIO(raw[:offset]))) == whole[:n] == _reference(raw[:offset])


def test_corrupt_header_is_an_error_not_garbage():
    raw = bytearray(_tar_bytes(tarfile.USTAR_FORMAT, NAMES[:3], extras=False))
    second = 512 + 512  # a.png: header + 1 block of data ("a.png" alone, i = 0)
    raw[second + 3] ^= 0x55  # a byte of the second member's name
    got = []
    with pytest.raises(TarHeaderError, match="checksum"):
        for member in tar_members(io.BytesIO(bytes(raw))):
            got.append(member)
    assert [n for n, _ in got] == ["a.png"]


def test_garbled_pax_header_is_a_tar_error_and_a_short_shard(tmp_path):
    """A pax record that does not parse ends the shard like any bad header: counted, never a ValueError."""
    raw = bytearray(_tar_bytes(tarfile.PAX_FORMAT, ["k1.png", "k1.cls", "k2.png", "k2.cls", LONG], extras=False))
    layout = _layout(bytes(raw))
    pax_data = layout[4].offset + 512  # the 'x' header of the long name, then its records
    raw[pax_data:pax_data + 4] = b"zz9 "
    with pytest.raises(TarHeaderError, match="bad pax record"):
        list(tar_members(io.BytesIO(bytes(raw))))
    path = tmp_path / "s.tar"
    path.write_bytes(bytes(raw))
    stats = dict(truncated_shards=0, lost_truncated=0)
    with pytest.warns(UserWarning, match="bad pax record"):  # k2, pending at the error, is dropped as at a cut
        assert [s["__key__"] for s in read_tar(str(path), 3, stats, allow_short=True)] == ["k1"]
    assert stats == dict(truncated_shards=1, lost_truncated=2)


def test_signed_checksum_of_old_tars_is_accepted_like_tarfile():
    """Some old tar writers summed the header as signed bytes: a non-ASCII name then sums differently."""
    raw = bytearray(_tar_bytes(tarfile.GNU_FORMAT, ["caf\u00e9.png"], extras=False))
    header = bytes(raw[:512])
    signed = 256 + sum(b - 256 if b > 127 else b for b in header[:148] + header[156:])
    raw[148:156] = b"%06o\0 " % signed
    assert _reference(bytes(raw)) == list(tar_members(io.BytesIO(bytes(raw)))) != []


def test_read_tar_reads_compressed_shards_through_tarfile(tmp_path):
    raw = _tar_bytes(tarfile.USTAR_FORMAT, ["k1.png", "k1.cls", "k2.png", "k2.cls"], extras=False)
    plain, packed = tmp_path / "s.tar", tmp_path / "s.tar.gz"
    plain.write_bytes(raw)
    packed.write_bytes(gzip.compress(raw))
    assert is_plain_tar(raw[:8]) and not is_plain_tar(packed.read_bytes()[:8])
    stats = dict(truncated_shards=0, lost_truncated=0)
    samples = [list(read_tar(str(path), 2, stats)) for path in (plain, packed)]
    assert samples[0] == samples[1] and [s["__key__"] for s in samples[0]] == ["k1", "k2"]
    assert samples[0][1]["cls"] == dict(_reference(raw))["k2.cls"]
