"""Losses."""

from fgkeras.losses.softmax import SoftmaxLoss
from fgkeras.losses.softmax import softmax_cross_entropy
from fgkeras.losses.triplet import BatchHardTripletLoss
from fgkeras.losses.triplet import RandomTripletLoss
from fgkeras.losses.triplet import TripletLoss
from fgkeras.losses.triplet import batch_hard_triplet_loss
from fgkeras.losses.triplet import pairwise_squared_distances
from fgkeras.losses.triplet import random_triplet_loss
from fgkeras.losses.triplet import triplet_loss

__all__ = [
    "BatchHardTripletLoss",
    "RandomTripletLoss",
    "SoftmaxLoss",
    "TripletLoss",
    "batch_hard_triplet_loss",
    "pairwise_squared_distances",
    "random_triplet_loss",
    "softmax_cross_entropy",
    "triplet_loss",
]
