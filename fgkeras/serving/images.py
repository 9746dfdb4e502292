"""Encoded-image checks before anything is decoded: format, dimensions from the file header.

`image_header(data)` reads the width and height that a JPEG, PNG, GIF, BMP or WebP file declares
(the formats `tf.io.decode_image` reads) from its first bytes, so an image whose pixels would not
fit the server's limits — a few kilobytes of PNG can declare 60,000 × 60,000 pixels — is refused
before a decoder allocates anything, and bytes that are not an image get a message that says so
rather than a decoder's.
"""

import struct

import numpy as np

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WebP")

# JPEG start-of-frame markers (they carry the dimensions): C0–CF except DHT (C4), JPG (C8), DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length: TEM and RST0–RST7.
_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])


class ImageError(ValueError):
    """Bytes that are not an encoded image of a known format, or whose header is damaged."""


def image_header(data):
    """`(format, width, height)` as declared by the header of an encoded image.

    Raises:
        ImageError: empty, not one of `FORMATS`, or the header is truncated or malformed.
    """
    if not data:
        raise ImageError("is empty (0 bytes)")
    if data[:3] == b"\xff\xd8\xff":
        return ("JPEG", *_jpeg_size(data))
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageError(f"is a truncated or malformed PNG ({len(data)} bytes, no IHDR header)")
        width, height = struct.unpack(">II", data[16:24])
        return "PNG", width, height
    if data[:6] in (b"GIF87a", b"GIF89a"):
        if len(data) < 10:
            raise ImageError(f"is a truncated GIF ({len(data)} bytes)")
        width, height = struct.unpack("<HH", data[6:10])
        return "GIF", width, height
    if data[:2] == b"BM":
        return ("BMP", *_bmp_size(data))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WebP", *_webp_size(data))
    raise ImageError(f"is not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} image "
                     f"({len(data)} bytes starting {bytes(data[:8])!r})")


def check_image(data, max_side, max_pixels):
    """Checks one encoded image against the limits; returns `(format, width, height)`.

    Raises:
        ImageError: as `image_header`, or a dimension is 0 or over the limits.
    """
    kind, width, height = image_header(data)
    if width < 1 or height < 1:
        raise ImageError(f"is a {kind} declaring {width} x {height} pixels")
    if max(width, height) > max_side or width * height > max_pixels:
        raise ImageError(f"is a {width} x {height} {kind}; the server takes at most {max_side} pixels a side "
                         f"and {max_pixels} pixels in all")
    return kind, width, height


def _jpeg_size(data):
    position, end = 2, len(data)
    while position < end:
        if data[position] != 0xFF:
            raise ImageError(f"is a malformed JPEG (no marker at byte {position})")
        while position < end and data[position] == 0xFF:  # fill bytes
            position += 1
        if position >= end:
            break
        marker = data[position]
        position += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header came first
            raise ImageError("is a malformed JPEG (no frame header before the image data)")
        if position + 2 > end:
            break
        (length,) = struct.unpack(">H", data[position:position + 2])
        if length < 2:
            raise ImageError(f"is a malformed JPEG (segment length {length} at byte {position})")
        if marker in _SOF_MARKERS:
            if position + 7 > end:
                break
            height, width = struct.unpack(">HH", data[position + 3:position + 7])
            return width, height
        position += length
    raise ImageError(f"is a truncated JPEG ({len(data)} bytes, the header ends before the frame size)")


def _bmp_size(data):
    if len(data) < 26:
        raise ImageError(f"is a truncated BMP ({len(data)} bytes)")
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height)  # a negative height is a top-down bitmap


def _webp_size(data):
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageError("is a malformed WebP (bad VP8 start code)")
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        if data[20] != 0x2F:
            raise ImageError("is a malformed WebP (bad VP8L signature)")
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    raise ImageError(f"is a truncated or malformed WebP ({len(data)} bytes)")


def encode_png(pixels):
    """PNG bytes of a uint8 `(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)` array."""
    import tensorflow as tf

    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"Image arrays must be uint8. Received dtype {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4) or min(pixels.shape[:2]) < 1:
        raise ValueError(f"Image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4). Received shape "
                         f"{pixels.shape}")
    return tf.io.encode_png(pixels).numpy()
