"""fgkeras: fine-grained image retrieval in Keras 3."""

__version__ = "0.1.0"
