"""Encoded-image checks: headers of every format, GIF and WebP animations, decode bombs, the pixel
budget of a request, and the one table of formats shared with the export's in-graph check."""

import io

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from fgkeras.export.image_formats import IMAGE_FORMATS, format_of
from fgkeras.export.saved_model import _is_known_image_format, decode_batch
from fgkeras.serving import Limits, ServingError
from fgkeras.serving.images import ImageError, check_image, image_header
from fgkeras.serving.signatures import check_images


def _pil(frames, kind, **kwargs):
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, kind, save_all=len(images) > 1, append_images=images[1:], **kwargs)
    return buffer.getvalue()


def _frames(count, height=30, width=50, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def gif(screen, frames, trailer=True):
    """A GIF of a `screen` (width, height) and `frames` [(left, top, width, height)], each with a stub
    of LZW data (enough for the header walk; not decodable)."""
    data = bytearray(b"GIF89a" + screen[0].to_bytes(2, "little") + screen[1].to_bytes(2, "little") + b"\x80\0\0")
    data += b"\0\0\0\xff\xff\xff"  # a global colour table of 2 entries
    data += b"\x21\xf9\x04\0\0\0\0\0"  # a graphic control extension
    for left, top, width, height in frames:
        data += b"\x2c" + b"".join(v.to_bytes(2, "little") for v in (left, top, width, height)) + b"\0"
        data += b"\x02\x02\x4c\x01\0"  # minimum code size 2, one sub-block, end
    return bytes(data + (b"\x3b" if trailer else b""))


def _samples():
    pixels = _frames(1)[0]
    return {
        "PNG": tf.io.encode_png(pixels).numpy(),
        "JPEG": tf.io.encode_jpeg(pixels).numpy(),
        "progressive JPEG": tf.io.encode_jpeg(pixels, progressive=True).numpy(),
        "GIF": _pil([pixels], "GIF"),
        "BMP": _pil([pixels], "BMP"),
        "WebP lossy": _pil([pixels], "WEBP", quality=80),
        "WebP lossless": _pil([pixels], "WEBP", lossless=True),
        "WebP VP8X": b"RIFF\0\0\0\0WEBPVP8X" + b"\0" * 8 + (49).to_bytes(3, "little") + (29).to_bytes(3, "little"),
    }


@pytest.mark.parametrize("kind", list(_samples()))
def test_image_header_reads_width_and_height(kind):
    header = image_header(_samples()[kind])
    assert (header.width, header.height, header.frames) == (50, 30, 1)


def test_image_header_matches_the_decoder_on_real_files():
    for seed, shape in enumerate([(7, 300, 3), (300, 7, 1), (64, 65, 3)]):
        pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
        for data in (tf.io.encode_png(pixels).numpy(), tf.io.encode_jpeg(pixels).numpy(),
                     _pil([np.repeat(pixels, 3 // shape[2], axis=2)], "GIF")):
            decoded = tf.io.decode_image(data).shape
            assert image_header(data)[1:3] == (decoded[-2], decoded[-3])


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello world", "is not a JPEG, PNG, GIF, BMP or WebP"),
    (b"\x89PNG\r\n\x1a\n\0\0", "truncated or malformed PNG"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "truncated JPEG"),
    (b"\xff\xd8\xff\xda\x00\x08", "no frame header"),
    (b"GIF89a\x01\0\x01\0", "truncated GIF"),
    (b"RIFF\0\0\0\0WEBPVP8 ", "truncated or malformed WebP"),
])
def test_image_header_refuses_non_images_and_damaged_headers(data, message):
    with pytest.raises(ImageError, match=message):
        image_header(data)


def test_check_image_limits_dimensions():
    bomb = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big")
    with pytest.raises(ImageError, match="60000 x 60000"):
        check_image(bomb, max_side=4096, max_pixels=1 << 24)
    png = _samples()["PNG"]
    assert check_image(png, max_side=50, max_pixels=1500).format == "PNG"
    with pytest.raises(ImageError, match="at most 49 pixels a side"):
        check_image(png, max_side=49, max_pixels=1500)


def test_a_gif_frame_larger_than_its_screen_is_refused():
    # TensorFlow's decoder decompresses each frame at its own size before clipping it to the screen:
    # this one would be 2 GB of raster behind a 1 x 1 screen
    bomb = gif((1, 1), [(0, 0, 1, 1), (0, 0, 46000, 46000)])
    with pytest.raises(ImageError, match=r"frame 1 \(46000 x 46000 at 0, 0\) does not fit its 1 x 1 screen"):
        check_image(bomb, max_side=4096, max_pixels=4096 * 4096)
    with pytest.raises(ImageError, match="does not fit"):
        check_image(gif((100, 100), [(90, 0, 20, 10)]), max_side=4096, max_pixels=4096 * 4096)


def test_gif_frames_are_counted_into_its_pixels_and_limited():
    many = gif((4096, 4096), [(0, 0, 4096, 4096)] * 3)
    assert image_header(many) == ("GIF", 4096, 4096, 3)
    with pytest.raises(ImageError, match="of 3 frames"):
        check_image(many, max_side=4096, max_pixels=4096 * 4096)
    small = gif((10, 10), [(0, 0, 10, 10)] * 20)
    assert check_image(small, max_side=4096, max_pixels=4096 * 4096, max_frames=20).pixels == 2000
    with pytest.raises(ImageError, match="20 frames; the server takes at most 19"):
        check_image(small, max_side=4096, max_pixels=4096 * 4096, max_frames=19)
    # no trailer after a whole frame is the end (TensorFlow decodes it); a cut inside a frame is not
    assert image_header(gif((10, 10), [(0, 0, 10, 10)], trailer=False)).frames == 1
    with pytest.raises(ImageError, match="truncated GIF"):
        image_header(gif((10, 10), [(0, 0, 10, 10)], trailer=False)[:-2])
    with pytest.raises(ImageError, match="truncated GIF"):
        image_header(gif((10, 10), [], trailer=False))
    with pytest.raises(ImageError, match="without any frame"):
        image_header(gif((10, 10), []))


def test_animated_gifs_are_read_and_decoded_to_their_first_frame_animated_webps_refused():
    frames = _frames(3)
    animated_gif, animated_webp = _pil(frames, "GIF"), _pil(frames, "WEBP", lossless=True)
    assert image_header(animated_gif) == ("GIF", 50, 30, 3)
    assert tf.io.decode_image(animated_gif).shape == (3, 30, 50, 3)
    # the export's decoder takes the first frame of a GIF animation: such a request is served
    assert decode_batch(tf.constant([animated_gif]), 16).shape == (1, 16, 16, 3)
    # ... but fails on any animated WebP ("WebP Animation must be 4 channel RGBA"): refused up front
    with pytest.raises(tf.errors.InvalidArgumentError, match="RGBA"):
        decode_batch(tf.constant([animated_webp]), 16)
    with pytest.raises(ImageError, match="is an animated WebP"):
        image_header(animated_webp)


def test_one_table_of_formats_for_the_server_and_the_graph():
    samples = [*_samples().values(), b"", b"GIF88a....", b"RIFF\0\0\0\0WEBX", b"\xff\xd8", b"BN", b"\x89PNG",
               b"RIFF\0\0\0\0WEBP", b"GIF87a", b"%PDF-1.4"]
    in_graph = [bool(_is_known_image_format(tf.constant(s))) for s in samples]  # one at a time, as decode_batch
    in_python = [format_of(s) is not None for s in samples]
    assert in_graph == in_python
    assert sum(in_python) == len(_samples()) + 2
    assert {f.name for f in IMAGE_FORMATS} == {"JPEG", "PNG", "GIF", "BMP", "WebP"}


def test_check_images_keeps_a_pixel_budget_per_request():
    images = np.array([_samples()["PNG"]] * 4, dtype=object)  # 1,500 pixels each
    assert check_images(images, "images", Limits(max_pixels_per_request=6000)) == 6000
    with pytest.raises(ServingError) as error:
        check_images(images, "images", Limits(max_pixels_per_request=5999))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0..3] decode to 6000 pixels, over the server's max_pixels_per_request of 5999" in error.value.message
    animated = np.array([gif((10, 10), [(0, 0, 10, 10)] * 30)], dtype=object)
    with pytest.raises(ServingError, match="max_pixels_per_request"):
        check_images(animated, "images", Limits(max_pixels_per_request=2999))
    with pytest.raises(ServingError, match=r"images\[0\] is an animated GIF of 30 frames"):
        check_images(animated, "images", Limits(max_animation_frames=29))
    with pytest.raises(ValueError, match="max_pixels_per_request"):
        Limits(max_pixels_per_request=0)
