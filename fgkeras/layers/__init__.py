"""Custom Keras layers."""

from fgkeras.layers.dense import NoBiasDense
from fgkeras.layers.keypoint import KeypointBlock
from fgkeras.layers.keypoint import KeypointMap
from fgkeras.layers.normalization import L2Normalize
from fgkeras.layers.pooling import CroWPooling2D
from fgkeras.layers.pooling import GeMPooling2D
from fgkeras.layers.pooling import MACPooling2D
from fgkeras.layers.pooling import SCDAPooling2D
from fgkeras.layers.pooling import SPoCPooling2D

__all__ = [
    "CroWPooling2D",
    "GeMPooling2D",
    "KeypointBlock",
    "KeypointMap",
    "L2Normalize",
    "MACPooling2D",
    "NoBiasDense",
    "SCDAPooling2D",
    "SPoCPooling2D",
]
