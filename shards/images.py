"""Decode every image once, check it, optionally resize / re-encode it, and say why when it is skipped.

    settings = ImageSettings(image_ext="jpg", max_side=512)
    data, info = prepare_image(raw_bytes, settings)      # raises SkipSample("undecodable") etc.

An image already in the target format that needs no resize is stored byte for byte (no second
lossy JPEG generation); everything else is encoded once to `settings.image_ext`.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from typing import Optional, Union

from PIL import Image, ImageFile

# PIL format name -> the extension the sample is stored under (MPO: multi-picture JPEG from cameras)
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}
IMAGE_EXTS = ("jpg", "png")


class SkipSample(Exception):
    """A sample that is not written; `reason` is the key it is counted under in manifest.skipped."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageSettings:
    image_ext: str = "jpg"  # what every stored image is: jpg | png
    reencode: bool = False  # True: encode every image again, even one already in image_ext
    max_side: Optional[int] = None  # longest side after writing (aspect kept); None: no resize
    min_side: Optional[int] = None  # images whose shorter side is below this are skipped (too_small)
    jpeg_quality: int = 90

    def __post_init__(self):
        if self.image_ext not in IMAGE_EXTS:
            raise ValueError(f"image_ext must be one of {IMAGE_EXTS}, got {self.image_ext!r}")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")

    def as_dict(self) -> dict:
        return asdict(self)


def _target_size(size: tuple[int, int], max_side: Optional[int]) -> Optional[tuple[int, int]]:
    """The size to resize to, or None when the image already fits."""
    width, height = size
    if not max_side or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _encodable(image: Image.Image, ext: str) -> Image.Image:
    """JPEG stores L/RGB, PNG also alpha; anything else (P, CMYK, I;16, 1, ...) becomes RGB."""
    keep = ("L", "RGB") if ext == "jpg" else ("L", "RGB", "RGBA", "LA")
    return image if image.mode in keep else image.convert("RGB")


def encode_image(image: Image.Image, ext: str, jpeg_quality: int = 90) -> bytes:
    """Lossless PNG or JPEG at `jpeg_quality`, in memory."""
    image = _encodable(image, ext)
    buffer = io.BytesIO()
    if ext == "png":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    return buffer.getvalue()


def _undecodable(err: Exception) -> SkipSample:
    if isinstance(err, Image.DecompressionBombError):
        return SkipSample("too_large", str(err))
    return SkipSample("undecodable", f"{type(err).__name__}: {err}")


def open_image(data: bytes) -> Image.Image:
    """Image.open reads the header only: size and format, no pixels yet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data; all mean the same
        raise _undecodable(err) from None


def load_pixels(image: Image.Image, target: Optional[tuple[int, int]] = None) -> Image.Image:
    """Decode every pixel (truncated files fail here). A JPEG that will be shrunk to `target` is
    decoded at a reduced DCT scale (draft): full decoding of large photos dominates build time."""
    # a truncated file must fail here even if a reader module set PIL's global tolerance
    tolerant, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        if target is not None and image.format in ("JPEG", "MPO"):
            image.draft(image.mode, target)
        image.load()
    except Exception as err:  # noqa: BLE001
        raise _undecodable(err) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant
    return image


def prepare_image(source: Union[bytes, Image.Image], settings: ImageSettings) -> tuple[bytes, dict]:
    """(bytes to store under `settings.image_ext`, info) for raw file bytes or a pixel image.

    info holds the original `width`, `height`, `format` and, when resized, `stored_size`.
    Raises SkipSample (undecodable, too_large, too_small) for an image that must not be written.
    """
    from_pixels = isinstance(source, Image.Image)
    image = source if from_pixels else open_image(source)
    width, height = image.size
    if settings.min_side and min(width, height) < settings.min_side:
        raise SkipSample("too_small", f"{width}x{height} < {settings.min_side}")
    target = _target_size(image.size, settings.max_side)
    info = {"width": width, "height": height}
    if not from_pixels:
        info["format"] = image.format
        load_pixels(image, target)
        if target is None and not settings.reencode and FORMAT_EXT.get(image.format) == settings.image_ext:
            return source, info  # verified, stored byte for byte
    if target is not None:
        image = _encodable(image, settings.image_ext).resize(target, Image.Resampling.LANCZOS)
        info["stored_size"] = list(target)
    return encode_image(image, settings.image_ext, settings.jpeg_quality), info
