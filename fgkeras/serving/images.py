"""Encoded-image checks before anything is decoded: format, dimensions and frames from the file.

`image_header(data)` reads what a JPEG, PNG, GIF, BMP or WebP file (the formats
`tf.io.decode_image` reads, `fgkeras.export.image_formats`) declares — its width, height and,
for an animation, its number of frames — so an image whose pixels would not fit the server's
limits is refused before a decoder allocates anything, and bytes that are not an image get a
message that says so rather than a decoder's. A few kilobytes can declare billions of pixels:

- a PNG or BMP header states any width and height below 2^31, a JPEG below 2^16, a WebP up to 2^24;
- a GIF's logical screen says little: TensorFlow's GIF decoder (giflib's `DGifSlurp`) first
  decompresses every frame at the frame's *own* size, then paints each one on a screen-sized
  canvas. A 1 x 1 screen can hold a 46,000 x 46,000 frame (2 GB of raster from under 1 MB of
  LZW data), and 16 MiB holds ~2,700 frames of 4096 x 4096 (16 MiB of raster each, all kept).

So every GIF frame is read: it must lie inside the logical screen (legitimate encoders never
write a frame that sticks out; TensorFlow would clip it after decompressing it whole), and the
frames are counted. Animated GIFs are accepted — the exported signatures decode their first
frame (`decode_image(expand_animations=False)`) — but an animation costs what the decoder may
materialise, *frames × screen* pixels (`ImageHeader.pixels`), which is what the per-image and
per-request pixel limits are checked against, and it may have at most `max_frames` frames.
Animated WebPs are refused: TensorFlow decodes a WebP animation to RGBA only, so the export's
3-channel `decode_image` fails on every one of them.
"""

import struct
import typing

import numpy as np

from fgkeras.export.image_formats import FORMAT_NAMES, format_of, names_text

FORMATS = FORMAT_NAMES

# JPEG start-of-frame markers (they carry the dimensions): C0–CF except DHT (C4), JPG (C8), DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length: TEM and RST0–RST7.
_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])


class ImageError(ValueError):
    """Bytes that are not an encoded image of a known format, or whose header is damaged."""


class ImageHeader(typing.NamedTuple):
    """What an encoded image declares.

    Attributes:
        format: one of `FORMATS`.
        width, height: of the image (of the canvas, for an animation).
        frames: 1, or the frames of an animated GIF.
    """

    format: str
    width: int
    height: int
    frames: int = 1

    @property
    def pixels(self):
        """Pixels a decoder may materialise: frames × width × height."""
        return self.frames * self.width * self.height


def image_header(data):
    """The `ImageHeader` of encoded image bytes (every frame of a GIF is read).

    Raises:
        ImageError: empty, not one of `FORMATS`, or the header is truncated or malformed.
    """
    if not data:
        raise ImageError("is empty (0 bytes)")
    kind = format_of(data)
    if kind == "JPEG":
        return ImageHeader("JPEG", *_jpeg_size(data))
    if kind == "PNG":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageError(f"is a truncated or malformed PNG ({len(data)} bytes, no IHDR header)")
        width, height = struct.unpack(">II", data[16:24])
        return ImageHeader("PNG", width, height)
    if kind == "GIF":
        return _gif_header(data)
    if kind == "BMP":
        return ImageHeader("BMP", *_bmp_size(data))
    if kind == "WebP":
        return _webp_header(data)
    raise ImageError(f"is not a {names_text()} image ({len(data)} bytes starting {bytes(data[:8])!r})")


def check_image(data, max_side, max_pixels, max_frames=1000):
    """Checks one encoded image against the limits; returns its `ImageHeader`.

    Args:
        data: the encoded bytes.
        max_side: largest width or height (of every frame).
        max_pixels: largest `ImageHeader.pixels` (frames × width × height).
        max_frames: most frames of an animation.

    Raises:
        ImageError: as `image_header`, or a dimension is 0, or it is over the limits.
    """
    header = image_header(data)
    kind, width, height, frames = header
    if width < 1 or height < 1:
        raise ImageError(f"is a {kind} declaring {width} x {height} pixels")
    if frames > max_frames:
        raise ImageError(f"is an animated {kind} of {frames} frames; the server takes at most {max_frames}")
    if max(width, height) > max_side or header.pixels > max_pixels:
        shape = f"{width} x {height} {kind}" if frames == 1 else f"{width} x {height} {kind} of {frames} frames"
        raise ImageError(f"is a {shape} ({header.pixels} pixels decoded); the server takes at most {max_side} "
                         f"pixels a side and {max_pixels} pixels in all")
    return header


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


def _gif_header(data):
    """Walks a GIF's blocks: the screen, then every frame's descriptor (their LZW data is skipped)."""
    end = len(data)
    if end < 13:
        raise ImageError(f"is a truncated GIF ({end} bytes)")
    width, height, flags = struct.unpack("<HHB", data[6:11])
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    frames = 0
    while True:
        if position >= end:
            if frames and position == end:  # no trailer after a whole frame: giflib reads it as the end
                break
            raise ImageError(f"is a truncated GIF ({end} bytes, no trailer after {frames} frame(s))")
        block = data[position]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: a label, then data sub-blocks
            position = _skip_sub_blocks(data, position + 2, frames)
        elif block == 0x2C:  # image descriptor: a frame
            if position + 10 > end:
                raise ImageError(f"is a truncated GIF ({end} bytes, inside the descriptor of frame {frames})")
            descriptor = data[position + 1:position + 10]
            left, top, frame_width, frame_height, frame_flags = struct.unpack("<HHHHB", descriptor)
            if left + frame_width > width or top + frame_height > height:
                raise ImageError(f"is a GIF whose frame {frames} ({frame_width} x {frame_height} at {left}, {top}) "
                                 f"does not fit its {width} x {height} screen")
            frames += 1
            position += 10 + (3 << ((frame_flags & 7) + 1) if frame_flags & 0x80 else 0)
            position = _skip_sub_blocks(data, position + 1, frames)  # after the LZW minimum code size
        else:
            raise ImageError(f"is a malformed GIF (block 0x{block:02x} at byte {position})")
    if frames == 0:
        raise ImageError("is a GIF without any frame")
    return ImageHeader("GIF", width, height, frames)


def _skip_sub_blocks(data, position, frames):
    """The position after a chain of GIF data sub-blocks (size byte, data) ending with size 0."""
    end = len(data)
    while position < end:
        size = data[position]
        position += 1 + size
        if size == 0:
            return position
    raise ImageError(f"is a truncated GIF ({end} bytes, ending inside a data block; {frames} frame(s) begun)")


def _bmp_size(data):
    if len(data) < 26:
        raise ImageError(f"is a truncated BMP ({len(data)} bytes)")
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height)  # a negative height is a top-down bitmap


def _webp_header(data):
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageError("is a malformed WebP (bad VP8 start code)")
        width, height = struct.unpack("<HH", data[26:30])
        return ImageHeader("WebP", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and len(data) >= 25:
        if data[20] != 0x2F:
            raise ImageError("is a malformed WebP (bad VP8L signature)")
        (bits,) = struct.unpack("<I", data[21:25])
        return ImageHeader("WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        if data[20] & 0x02:
            raise ImageError(f"is an animated WebP ({width} x {height}), which the exported signatures cannot decode "
                             "(TensorFlow decodes WebP animations to RGBA only); send one frame")
        return ImageHeader("WebP", width, height)
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
