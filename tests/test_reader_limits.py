"""Hostile samples in shards: decompression bombs are skipped from their header, before any decode,
and labels outside the manifest's classes are skipped; both counted, in decode=cpu and =device.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_reader_limits.py
"""
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dist_cluster.config import ConfigError, load_config
from dist_cluster.data import device_decode, worker
from dist_cluster.data.image_header import image_pixels
from dist_cluster.data.loader import ShardLoader, make_loader
from dist_cluster.data.worker import skip_reason
from dist_cluster.evaluation.features import read_labels
from tests.shard_fixtures import encode_image, write_shards

CPU = torch.device("cpu")
BOMB_SIDE = 20000


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid side x side 1-bit grayscale PNG, all black: ~50 kB that decode to side^2 x 3 bytes of
    RGB (1.2 GB at 20000). Written by hand: PIL would need the full image in memory first."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, gray
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def bomb_jpeg(side: int = BOMB_SIDE) -> bytes:
    """A small real JPEG whose frame header is rewritten to declare side x side."""
    data = bytearray(encode_image(np.zeros((16, 16, 3), np.uint8), "jpg"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def _pil(array: np.ndarray, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_image_pixels_reads_every_format_from_its_header():
    rgb = np.random.default_rng(0).integers(0, 256, (23, 37, 3), dtype=np.uint8)
    for fmt, kw in [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("GIF", {}),
                    ("WEBP", {"lossless": False}), ("WEBP", {"lossless": True}),
                    ("WEBP", {"exif": b"Exif\x00\x00MM"})]:  # exif: the extended (VP8X) header
        assert image_pixels(_pil(rgb, fmt, **kw)) == 37 * 23, (fmt, kw)
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb), Image.fromarray(rgb // 2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert image_pixels(buffer.getvalue()) == 3 * 37 * 23  # torchvision decodes every frame
    bomb = bomb_png()
    assert len(bomb) < 100_000 and image_pixels(bomb) == BOMB_SIDE ** 2
    assert image_pixels(bomb_jpeg()) == BOMB_SIDE ** 2
    assert image_pixels(bomb[:20]) is None and image_pixels(b"\xff\xd8\xff\xe0\x00") is None


@pytest.fixture(scope="module")
def bombed(tmp_path_factory):
    """PNG and JPEG shards: 7 good 20 px samples each, and one 20000 x 20000 bomb in the middle."""
    rng = np.random.default_rng(1)
    out = {}
    for fmt, bomb in (("png", bomb_png()), ("jpg", bomb_jpeg())):
        samples = [(f"k{i:02d}", encode_image(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), fmt), b"3")
                   for i in range(7)]
        samples.insert(3, ("bomb", bomb, b"3"))
        root = tmp_path_factory.mktemp(fmt)
        write_shards(root, [samples], name="bombed", fmt=fmt, has_labels=True, classes=[str(c) for c in range(10)])
        out[fmt] = SimpleNamespace(root=root, bomb=bomb, good=[key for key, _, _ in samples if key != "bomb"])
    return out


def _spy(real, bomb: bytes, seen: list):
    """A decoder that records the size of what it is given and refuses the bomb without touching
    it (so the test itself never allocates the 1.2 GB it checks for)."""
    def decode(data, *args, **kw):
        sizes = [len(d) for d in data] if isinstance(data, list) else [len(data)]
        seen.extend(sizes)
        if len(bomb) in sizes:
            raise RuntimeError("the bomb reached the decoder")
        return real(data, *args, **kw)
    return decode


@pytest.mark.parametrize("decode", ["cpu", "device"])
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_bomb_is_skipped_before_decoding(bombed, monkeypatch, decode, fmt):
    shards, seen = bombed[fmt], []
    monkeypatch.setattr(worker, "decode_image", _spy(worker.decode_image, shards.bomb, seen))
    monkeypatch.setattr(device_decode, "decode_jpeg", _spy(device_decode.decode_jpeg, shards.bomb, seen))
    loader = ShardLoader(shards.root, 0, 1, 4, 0, None, shuffle=False, equal_steps=False, decode=decode,
                         device=CPU if decode == "device" else None)
    keys = [k for _, batch_keys, _ in loader for k in batch_keys]
    assert keys == shards.good
    assert len(shards.bomb) not in seen and len(seen) > 0  # never handed to a decoder
    stats = loader.stats
    assert stats["skipped_too_large"] == 1 and stats["skipped_corrupt"] == 0 and stats["samples"] == 7


def test_bomb_does_not_grow_the_reader_memory(bombed):
    """The whole read in a fresh process: its peak RSS stays far below the bomb's 1.2 GB of pixels."""
    # the peak is reset after the imports (/proc/self/clear_refs 5): ru_maxrss alone would carry the
    # parent's peak across fork + exec, and the pytest process grows to GBs over the suite
    script = ("import sys; from dist_cluster.data.loader import ShardLoader\n"
              "open('/proc/self/clear_refs', 'w').write('5')\n"
              "loader = ShardLoader(sys.argv[1], 0, 1, 1, 0, None, shuffle=False, equal_steps=False)\n"
              "n = sum(len(k) for _, k, _ in loader)\n"
              "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
              "print(n, loader.stats.get('skipped_too_large', -1), hwm)")
    out = subprocess.run([sys.executable, "-c", script, str(bombed["png"].root)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1], check=True)
    delivered, too_large, peak_kib = map(int, out.stdout.split())
    assert peak_kib < 900 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"  # torch alone: ~300 MiB
    assert (delivered, too_large) == (7, 1)


def test_pixel_limit_is_configurable_and_reaches_the_workers(bombed):
    cfg = load_config(None, ["data.max_image_pixels=300", "data.num_workers=1", "data.batch_size=2"]).data
    loader = make_loader(cfg, str(bombed["png"].root), 0, 1, None, 0, 0, train=False, device=CPU)
    assert loader.num_workers == 1  # checked in a worker process, not only in this one
    assert loader.cfg["max_image_pixels"] == 300
    assert [k for _, keys, _ in loader for k in keys] == []  # 20 x 20 = 400 > 300: all too large
    assert loader.stats["skipped_too_large"] == 8
    assert load_config().data.max_image_pixels == 50_000_000
    with pytest.raises(ConfigError, match=r"data\.max_image_pixels"):
        load_config(None, ["data.max_image_pixels=-1"])
    sample = {"__key__": "bomb", "png": bombed["png"].bomb, "cls": b"3"}
    assert skip_reason(sample, True, 10, max_pixels=BOMB_SIDE ** 2 - 1) == "skipped_too_large"
    assert skip_reason(sample, True, 10, max_pixels=0) is None  # 0: no limit (not decoded here)


LABELS = {"a": b"-7", "b": b"99999", "c": b"10", "d": b"9", "e": b"0", "f": b" 4\n", "g": b"seven", "h": b"2"}
GOOD = ["d", "e", "f", "h"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """One JPEG shard and one PNG shard with the same keys and labels; 10 classes in the manifest."""
    rng = np.random.default_rng(2)
    roots = {}
    for fmt in ("jpg", "png"):
        samples = [(key, encode_image(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), fmt), cls)
                   for key, cls in LABELS.items()]
        roots[fmt] = tmp_path_factory.mktemp(f"labels_{fmt}")
        write_shards(roots[fmt], [samples], name="labels", fmt=fmt, has_labels=True,
                     classes=[str(c) for c in range(10)])
    return roots


@pytest.mark.parametrize("decode", ["cpu", "device"])
@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_out_of_range_labels_are_skipped_and_counted(labelled, decode, fmt):
    loader = ShardLoader(labelled[fmt], 0, 1, 3, 0, None, shuffle=False, equal_steps=False, decode=decode,
                         device=CPU if decode == "device" else None)
    batches = list(loader)
    assert [k for _, keys, _ in batches for k in keys] == GOOD
    assert torch.cat([labels for _, _, labels in batches]).tolist() == [9, 0, 4, 2]
    stats = loader.stats
    assert stats["skipped_bad_label"] == 3 and stats["skipped_corrupt"] == 1 and stats["samples"] == 4


def test_resume_skips_the_same_bad_labels(labelled):
    """Resume passes over raw samples with the same checks: the batches after the skipped ones are
    those of an uninterrupted epoch, and the bad labels of the skipped part are counted."""
    full = ShardLoader(labelled["png"], 0, 1, 2, 0, None, shuffle=False, equal_steps=True)
    resumed = ShardLoader(labelled["png"], 0, 1, 2, 0, None, shuffle=False, equal_steps=True, skip_batches=1)
    assert [list(k) for _, k, _ in resumed] == [list(k) for _, k, _ in full][1:]
    # the same raw samples read (equal_steps re-reads the shard to fill the 4 steps): the same counts
    assert resumed.stats["skipped_bad_label"] == full.stats["skipped_bad_label"] >= 3


def test_read_labels_skips_and_counts_out_of_range(labelled):
    stats = {}
    assert read_labels(labelled["png"], None, stats) == {"d": 9, "e": 0, "f": 4, "h": 2}
    assert stats == {"skipped_bad_label": 3, "skipped_corrupt": 1}
    manifest = json.loads((labelled["png"] / "manifest.json").read_text())
    manifest["classes"] = []  # no class list: only negative labels are refused
    (labelled["png"] / "manifest.json").write_text(json.dumps(manifest))
    try:
        assert sorted(read_labels(labelled["png"])) == ["b", "c", "d", "e", "f", "h"]
    finally:
        manifest["classes"] = [str(c) for c in range(10)]
        (labelled["png"] / "manifest.json").write_text(json.dumps(manifest))
