"""Losses."""

from fgkeras.losses.adversarial import AdversarialTripletLoss
from fgkeras.losses.adversarial import adversarial_triplet_loss
from fgkeras.losses.adversarial import discriminator_loss
from fgkeras.losses.adversarial import fake_loss
from fgkeras.losses.adversarial import generator_loss
from fgkeras.losses.adversarial import identity_loss
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
    "AdversarialTripletLoss",
    "BatchHardTripletLoss",
    "RandomTripletLoss",
    "SoftmaxLoss",
    "TripletLoss",
    "adversarial_triplet_loss",
    "batch_hard_triplet_loss",
    "discriminator_loss",
    "fake_loss",
    "generator_loss",
    "identity_loss",
    "pairwise_squared_distances",
    "random_triplet_loss",
    "softmax_cross_entropy",
    "triplet_loss",
]
