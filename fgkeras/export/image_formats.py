"""The image formats the exports decode, and the first bytes that identify each.

One table serves both checks of "is this an encoded image?": the in-graph one of the exported
signatures (`fgkeras.export.saved_model`, TF string ops, for a stock `tensorflow_model_server`)
and the server's own one before anything is decoded (`fgkeras.serving.images`). A format is
recognised when every one of its `(offset, bytes)` signatures is found at its offset; WebP's
RIFF container needs two ("RIFF" at 0, "WEBP" at 8).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class ImageFormat:
    """One format `tf.io.decode_image` reads.

    Attributes:
        name: how messages name it ("JPEG", "PNG", ...).
        signatures: `((offset, bytes), ...)`: all must match (a format may have several entries,
            one per flavour: GIF87a and GIF89a).
    """

    name: str
    signatures: tuple

    @property
    def length(self):
        """Bytes needed to test the signatures."""
        return max(offset + len(magic) for offset, magic in self.signatures)

    def matches(self, data):
        """True when the bytes `data` start like this format."""
        return all(data[offset:offset + len(magic)] == magic for offset, magic in self.signatures)


IMAGE_FORMATS = (
    ImageFormat("JPEG", ((0, b"\xff\xd8\xff"),)),
    ImageFormat("PNG", ((0, b"\x89PNG\r\n\x1a\n"),)),
    ImageFormat("GIF", ((0, b"GIF87a"),)),
    ImageFormat("GIF", ((0, b"GIF89a"),)),
    ImageFormat("BMP", ((0, b"BM"),)),
    ImageFormat("WebP", ((0, b"RIFF"), (8, b"WEBP"))),
)

FORMAT_NAMES = tuple(dict.fromkeys(f.name for f in IMAGE_FORMATS))
SIGNATURE_LENGTH = max(f.length for f in IMAGE_FORMATS)


def format_of(data):
    """The name of the format the bytes `data` start like (`FORMAT_NAMES`), or None."""
    for image_format in IMAGE_FORMATS:
        if image_format.matches(data):
            return image_format.name
    return None


def names_text():
    """"JPEG, PNG, GIF, BMP or WebP": the formats, for messages."""
    return f"{', '.join(FORMAT_NAMES[:-1])} or {FORMAT_NAMES[-1]}"
