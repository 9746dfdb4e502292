"""Backbones, the retrieval embedder, the baselines and the adversarial methods."""

from fgkeras.models.backbones import BACKBONES, build_backbone, feature_maps, freeze_batch_norm
from fgkeras.models.baselines import BASELINES, MetricLearner, build_baseline
from fgkeras.models.embedder import Embedder, build_embedder
from fgkeras.models.fggan import CanonicalEmbedder, ViewNormalizingGAN, build_fggan
from fgkeras.models.htg import HardTripletGAN, KeypointEmbedder, build_htg, train_htg
from fgkeras.models.resume import ResumableBackup, fit_resumable
from fgkeras.models.training import (
    OPTIMIZERS,
    ContinuousTensorBoard,
    MultiRateAdam,
    MultiRateAdamW,
    MultiRateSGD,
    NonFiniteLossError,
    ShiftedSchedule,
    StopOnNonFiniteLoss,
    make_optimizer,
    rate_multipliers_for,
)
from fgkeras.models.viewgan import ViewTransformGAN, build_viewgan

__all__ = [
    "BACKBONES",
    "BASELINES",
    "CanonicalEmbedder",
    "ContinuousTensorBoard",
    "Embedder",
    "HardTripletGAN",
    "KeypointEmbedder",
    "MetricLearner",
    "MultiRateAdam",
    "MultiRateAdamW",
    "MultiRateSGD",
    "NonFiniteLossError",
    "OPTIMIZERS",
    "ResumableBackup",
    "ShiftedSchedule",
    "StopOnNonFiniteLoss",
    "ViewTransformGAN",
    "ViewNormalizingGAN",
    "build_backbone",
    "build_baseline",
    "build_embedder",
    "build_fggan",
    "build_htg",
    "build_viewgan",
    "fit_resumable",
    "feature_maps",
    "freeze_batch_norm",
    "make_optimizer",
    "rate_multipliers_for",
    "train_htg",
]
