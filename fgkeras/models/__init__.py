"""Backbones, the retrieval embedder, the baselines and the adversarial methods."""

from fgkeras.models.backbones import BACKBONES, build_backbone, feature_maps
from fgkeras.models.baselines import BASELINES, MetricLearner, build_baseline
from fgkeras.models.embedder import Embedder, build_embedder
from fgkeras.models.htg import HardTripletGAN, KeypointEmbedder, build_htg, train_htg
from fgkeras.models.training import ShiftedSchedule

__all__ = [
    "BACKBONES",
    "BASELINES",
    "Embedder",
    "HardTripletGAN",
    "KeypointEmbedder",
    "MetricLearner",
    "ShiftedSchedule",
    "build_backbone",
    "build_baseline",
    "build_embedder",
    "build_htg",
    "feature_maps",
    "train_htg",
]
