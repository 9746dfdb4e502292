"""The baselines every comparison needs, trained with plain `model.fit`.

A `MetricLearner` trains an `Embedder` with a softmax classifier on the feature
(with or without bias), a triplet loss on the L2-normalised embedding (random or
batch-hard sampling), or both: the "basic model" of HTG (Sec. 4.1) is
no-bias softmax + λ × triplet, with triplets sampled at random "without considering their
hardness" (Sec. 4.2; Table 1, row D); "basic_batch_hard" is the same model with batch-hard
triplets (row E, the OHEM basic model).
"""

import keras
import tensorflow as tf
from keras import ops

from fgkeras import layers as fg_layers
from fgkeras import losses as fg_losses
from fgkeras.models.training import BuiltBeforeFit, replica_scaled, unpack_batch

SOFTMAX_HEADS = ("none", "bias", "no_bias")
TRIPLET_SAMPLINGS = ("none", "random", "batch_hard")

# The named baselines of the papers' tables.
BASELINES = {
    "softmax": {"softmax": "bias", "triplet": "none"},
    "softmax_nobias": {"softmax": "no_bias", "triplet": "none"},
    "triplet_random": {"softmax": "none", "triplet": "random"},
    "triplet_batch_hard": {"softmax": "none", "triplet": "batch_hard"},
    "basic": {"softmax": "no_bias", "triplet": "random"},
    "basic_batch_hard": {"softmax": "no_bias", "triplet": "batch_hard"},
}


@keras.saving.register_keras_serializable(package="fgkeras")
class MetricLearner(BuiltBeforeFit):
    """Trains an embedder with softmax and/or triplet losses by `fit`.

    Calling the model returns the embedder's embeddings, so `predict` and the
    evaluation helpers work on it directly.

    Args:
        embedder: an `fgkeras.models.Embedder`.
        num_classes: K, the number of training classes (needed with a softmax head).
        softmax: "bias" (ordinary softmax), "no_bias" (the HTG no-bias softmax) or "none".
        triplet: "random" (one random positive and negative per anchor),
            "batch_hard" (hardest positive and negative in a P×K batch, the OHEM
            baseline) or "none".
        margin: triplet margin m on squared distances of unit vectors.
        triplet_weight: λ, the weight of the triplet loss against the softmax loss.
        seed: seed of the random triplet sampling.

    Batches are dicts with `image` and `label` (the `fgkeras.data` datasets) or
    `(images, labels)` tuples.
    """

    def __init__(self, embedder, num_classes=None, softmax="no_bias", triplet="batch_hard",
                 margin=0.1, triplet_weight=1.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if softmax not in SOFTMAX_HEADS:
            raise ValueError(f"`softmax` must be one of {SOFTMAX_HEADS}. Received: softmax={softmax!r}")
        if triplet not in TRIPLET_SAMPLINGS:
            raise ValueError(f"`triplet` must be one of {TRIPLET_SAMPLINGS}. Received: triplet={triplet!r}")
        if softmax == "none" and triplet == "none":
            raise ValueError("At least one of `softmax` and `triplet` must be enabled. Received: both 'none'")
        if softmax != "none" and (num_classes is None or num_classes < 2):
            raise ValueError(f"A softmax head needs `num_classes` >= 2. Received: num_classes={num_classes}")
        if margin <= 0:
            raise ValueError(f"`margin` must be > 0. Received: margin={margin}")
        self.embedder = embedder
        self.num_classes = num_classes
        self.softmax = softmax
        self.triplet = triplet
        self.margin = margin
        self.triplet_weight = triplet_weight
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.classifier = None
        if softmax == "bias":
            self.classifier = keras.layers.Dense(num_classes, name="classifier")
        elif softmax == "no_bias":
            self.classifier = fg_layers.NoBiasDense(num_classes, name="classifier")
        if self.classifier is not None:
            self.classifier.build((None, embedder.embedding_dim))
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.softmax_tracker = keras.metrics.Mean(name="softmax_loss")
        self.triplet_tracker = keras.metrics.Mean(name="triplet_loss")

    def build(self, input_shape):
        if not self.embedder.built:
            self.embedder.build(input_shape)
        self.built = True

    def compile(self, optimizer="adam", **kwargs):
        """Compiles, then builds the optimizer on the trainable variables.

        An optimizer built lazily inside the first distributed step fails under
        `MirroredStrategy`, so it is built here when the embedder is built.
        """
        super().compile(optimizer=optimizer, **kwargs)
        if self.embedder.built:
            self.built = True
            self.optimizer.build(self.trainable_variables)

    def compile_from_config(self, config):
        """Restores the compiled state of a saved model (optimizer included)."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    @property
    def metrics(self):
        trackers = [self.loss_tracker]
        if self.classifier is not None:
            trackers.append(self.softmax_tracker)
        if self.triplet != "none":
            trackers.append(self.triplet_tracker)
        return trackers

    def call(self, images, training=False):
        return self.embedder(images, training=training)

    def _compute_losses(self, images, labels, training):
        """Returns (total, softmax, triplet) per-replica mean losses."""
        labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
        features = self.embedder.features(images, training=training)
        softmax_loss = ops.zeros((), "float32")
        triplet_loss = ops.zeros((), "float32")
        if self.classifier is not None:
            logits = ops.cast(self.classifier(features), "float32")
            softmax_loss = ops.mean(
                keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            )
        if self.triplet == "batch_hard":
            embeddings = self.embedder.normalize(features)
            triplet_loss = fg_losses.batch_hard_triplet_loss(labels, embeddings, margin=self.margin)
        elif self.triplet == "random":
            embeddings = self.embedder.normalize(features)
            triplet_loss = fg_losses.random_triplet_loss(
                labels, embeddings, margin=self.margin, seed=self.seed_generator
            )
        total = softmax_loss + self.triplet_weight * triplet_loss
        if self.losses:
            total = total + ops.sum(ops.stack([ops.cast(x, "float32") for x in self.losses]))
        return total, softmax_loss, triplet_loss

    def _track(self, total, softmax_loss, triplet_loss):
        self.loss_tracker.update_state(total)
        self.softmax_tracker.update_state(softmax_loss)
        self.triplet_tracker.update_state(triplet_loss)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        images, labels = unpack_batch(data)
        with tf.GradientTape() as tape:
            total, softmax_loss, triplet_loss = self._compute_losses(images, labels, training=True)
            scaled = self.optimizer.scale_loss(replica_scaled(total))
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return self._track(total, softmax_loss, triplet_loss)

    def test_step(self, data):
        images, labels = unpack_batch(data)
        return self._track(*self._compute_losses(images, labels, training=False))

    def get_config(self):
        return {
            **super().get_config(),
            "embedder": keras.saving.serialize_keras_object(self.embedder),
            "num_classes": self.num_classes,
            "softmax": self.softmax,
            "triplet": self.triplet,
            "margin": self.margin,
            "triplet_weight": self.triplet_weight,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["embedder"] = keras.saving.deserialize_keras_object(config["embedder"])
        return cls(**config)


def build_baseline(name, embedder, num_classes=None, margin=0.1, seed=None, **kwargs):
    """A `MetricLearner` for one of the named `BASELINES`.

    Args:
        name: "softmax", "softmax_nobias", "triplet_random", "triplet_batch_hard", "basic"
            (HTG's basic model: no-bias softmax + random triplets) or "basic_batch_hard".
        embedder: an `fgkeras.models.Embedder`.
        num_classes, margin, seed, **kwargs: see `MetricLearner`; `kwargs` may override the
            baseline's `softmax` and `triplet`.
    """
    if name not in BASELINES:
        raise ValueError(f"`name` must be one of {sorted(BASELINES)}. Received: name={name!r}")
    kwargs = {"name": name, **BASELINES[name], **kwargs}
    return MetricLearner(embedder, num_classes=num_classes, margin=margin, seed=seed, **kwargs)
