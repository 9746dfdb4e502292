"""fgkeras: fine-grained image retrieval in Keras 3.

Importing the package registers every fgkeras layer, loss and model with Keras, so that a
`.keras` file that names them loads after `import fgkeras` alone. That loads TensorFlow: first,
TF_CPP_MIN_LOG_LEVEL defaults to 2 (errors only) unless you set it, so that TensorFlow's
native info and warning lines stay out of your terminal (set it to 0 to see them).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fgkeras import layers, losses, models  # noqa: E402  (registers the classes with Keras)

__version__ = "0.1.0"
__all__ = ["layers", "losses", "models"]
