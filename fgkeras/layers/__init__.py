"""Custom Keras layers."""

from fgkeras.layers.dense import NoBiasDense
from fgkeras.layers.keypoint import KeypointBlock
from fgkeras.layers.keypoint import KeypointMap
from fgkeras.layers.modulation import AdaptiveIdentityModulation
from fgkeras.layers.modulation import ConditionalBatchNormalization
from fgkeras.layers.modulation import IdentityModulation
from fgkeras.layers.nonalignment import ConstrainedNonalignment
from fgkeras.layers.nonalignment import GlobalNonalignment
from fgkeras.layers.normalization import L2Normalize
from fgkeras.layers.pooling import CroWPooling2D
from fgkeras.layers.pooling import GeMPooling2D
from fgkeras.layers.pooling import MACPooling2D
from fgkeras.layers.pooling import SCDAPooling2D
from fgkeras.layers.pooling import SPoCPooling2D

__all__ = [
    "AdaptiveIdentityModulation",
    "ConditionalBatchNormalization",
    "ConstrainedNonalignment",
    "GlobalNonalignment",
    "IdentityModulation",
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
