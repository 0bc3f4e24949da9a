"""The one image decoder: bytes or a file -> RGB PIL image, with limits checked from the header first.

Every place that reads an image (image folders, uploads, the traffic log, ``collect``) goes through
:func:`open_rgb`, so a corrupt file, an unsupported format or an oversized image gets the same error
everywhere. Pixel limits are checked from the header, before any pixel is decoded.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = None  # our own limits below apply, with an error that names them


class CorruptImageError(ValueError):
    """An image that cannot be decoded."""


class ImageLimitError(ValueError):
    """An image that is well-formed but outside a limit (format, pixels): ``kind`` says which."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind  # 'format' or 'pixels'


def image_header(data: bytes | str | Path, name: str = "image") -> tuple[str | None, int, int]:
    """(format, width, height) read from the header only (no pixels decoded)."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data) as img:
            return img.format, img.width, img.height
    except UnidentifiedImageError as exc:
        raise CorruptImageError(f"{name}: cannot decode image (not a known image format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(f"{name}: cannot decode image ({exc})") from exc


def open_rgb(data: bytes | str | Path, name: str | None = None, formats: tuple[str, ...] | None = None,
             max_pixels: int | None = None) -> Image.Image:
    """Decode ``data`` (encoded bytes or a file path) into an RGB image.

    ``formats`` (PIL format names such as 'JPEG', 'PNG') and ``max_pixels`` are checked from the header
    before decoding and raise :class:`ImageLimitError`; anything undecodable raises
    :class:`CorruptImageError` naming ``name`` (default: the path, or 'image').
    """
    name = name or (str(data) if isinstance(data, (str, Path)) else "image")
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with Image.open(source) as img:
            if formats is not None and img.format not in formats:
                raise ImageLimitError(f"{name}: unsupported image format {img.format}; send "
                                      f"{' or '.join(formats)}", "format")
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageLimitError(f"{name}: {img.width}x{img.height} pixels exceeds max_image_pixels "
                                      f"{max_pixels}", "pixels")
            return img.convert("RGB")
    except ImageLimitError:
        raise
    except UnidentifiedImageError as exc:
        raise CorruptImageError(f"{name}: cannot decode image (not a known image format)") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(f"{name}: cannot decode image ({exc})") from exc
