"""Backbones, the retrieval embedder, the baselines and the adversarial methods."""

from fgkeras.models.backbones import BACKBONES, build_backbone, feature_maps
from fgkeras.models.baselines import BASELINES, MetricLearner, build_baseline
from fgkeras.models.embedder import Embedder, build_embedder

__all__ = [
    "BACKBONES",
    "BASELINES",
    "Embedder",
    "MetricLearner",
    "build_backbone",
    "build_baseline",
    "build_embedder",
    "feature_maps",
]
