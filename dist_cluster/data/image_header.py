"""Pixels an encoded image would decode to, read from its header alone (no pixel data touched).

    image_pixels(png_bytes)   # width x height (GIF: summed over frames); None: header unreadable

Why: a 389 kB PNG can declare 20000 x 20000 pixels, and torchvision's decoders allocate the whole
output (1.2 GB as RGB uint8) before reading a byte of it. The reader checks this count against
data.max_image_pixels before decoding (dist_cluster/data/worker.py).

Parsed here rather than with PIL: Image.open is lazy for PNG/JPEG/GIF, but its WebP plugin hands
the whole file to libwebp's animation decoder, which allocates canvas buffers at open time, and a
GIF's frame count needs a walk over its blocks anyway. The four formats the reader accepts
(worker.IMAGE_EXTS) have small fixed headers; a header that cannot be parsed gives None.
"""
from __future__ import annotations

import struct
from typing import Optional

# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...): they carry the size.
# C4 (DHT), C8 (JPG), CC (DAC) share the range but are not frames.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# markers that stand alone (no length field): TEM, RST0-7
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def image_pixels(data: bytes) -> Optional[int]:
    """Pixels the decoder would produce for `data` (PNG, JPEG, GIF, WebP); None if not parseable."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            return _png(data)
        if data.startswith(b"\xff\xd8"):
            return _jpeg(data)
        if data.startswith((b"GIF87a", b"GIF89a")):
            return _gif(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp(data)
    except (struct.error, IndexError):  # header cut short
        return None
    return None


def _png(data: bytes) -> Optional[int]:
    # signature (8), then the first chunk must be IHDR: length (4), type (4), width, height (4 + 4)
    if data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width * height


def _jpeg(data: bytes) -> Optional[int]:
    """Walk the marker segments up to the first SOF; the size is in it (before any pixel data)."""
    pos = 2
    while pos < len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width * height
        if length < 2:
            return None
        pos += 2 + length
    return None


def _gif(data: bytes) -> Optional[int]:
    """Sum over frames of max(canvas, frame) pixels: torchvision outputs every frame at canvas size,
    and giflib first allocates each frame at the size its descriptor declares (up to 65535^2)."""
    canvas_w, canvas_h, packed = struct.unpack("<HHB", data[6:11])
    canvas = canvas_w * canvas_h
    pos = 13 + ((3 << ((packed & 7) + 1)) if packed & 0x80 else 0)  # global colour table
    total = 0
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then sub-blocks
            pos = _skip_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # image descriptor: left, top, width, height, packed
            width, height, packed = struct.unpack("<HHB", data[pos + 5:pos + 10])
            total += max(canvas, width * height)
            pos += 10 + ((3 << ((packed & 7) + 1)) if packed & 0x80 else 0)  # local colour table
            pos = _skip_sub_blocks(data, pos + 1)  # after the LZW minimum code size byte
        else:
            return None
    return total if total else None


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    """Position after a chain of GIF sub-blocks (length byte + data, ended by a zero length)."""
    while True:
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos


def _webp(data: bytes) -> Optional[int]:
    chunk = data[12:16]
    body = data[20:]
    if chunk == b"VP8 ":  # lossy: 3-byte frame tag, start code 9d 01 2a, then 14-bit width, height
        if body[3:6] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", body[6:10])
        return (width & 0x3FFF) * (height & 0x3FFF)
    if chunk == b"VP8L":  # lossless: signature 0x2f, then width-1 and height-1 on 14 bits each
        if body[0] != 0x2F:
            return None
        bits = int.from_bytes(body[1:5], "little")
        return ((bits & 0x3FFF) + 1) * (((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":  # extended: flags (4), canvas width-1 and height-1 on 24 bits each
        width = int.from_bytes(body[4:7], "little") + 1
        height = int.from_bytes(body[7:10], "little") + 1
        return width * height
    return None
