"""Triplet losses on L2-normalised embeddings (HTG, Sec. 3, eq. 1).

    loss(a, p, n) = [d(a, p) - d(a, n) + margin]_+ ,   d(x, y) = || x/||x|| - y/||y|| ||^2

Every function L2-normalises its embeddings first (idempotent on embeddings that are already
normalised, e.g. the output of `fgkeras.layers.L2Normalize`), so d is exactly the paper's
squared distance between l2-normalised features, in [0, 4]. Computation is in float32
whatever the input dtype.

The functions return the scalar batch loss. The `keras.losses.Loss` classes return a
per-sample vector whose mean is that scalar (excluded anchors hold 0, the others are scaled
by batch / number of valid anchors), so Keras's default "sum_over_batch_size" reduction
returns exactly the function's value, sample weights weight anchors, and the loss is
scaled for `tf.distribute` like any built-in loss (Keras skips that scaling for a loss
that is already a scalar).
"""

import numbers

import keras
from keras import ops


def _check_margin(margin):
    if isinstance(margin, numbers.Real) and margin <= 0:
        raise ValueError(f"`margin` must be > 0. Received: margin={margin}")


def _l2_normalize(x):
    x = ops.cast(x, "float32")
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), 1e-24))


def _flat_labels(labels):
    return ops.reshape(labels, (-1,))


def _mean_preserving_vector(per_anchor, valid):
    """Zeros at invalid anchors, the rest scaled so that `mean(vector)` = mean over valid."""
    valid_f = ops.cast(valid, "float32")
    batch = ops.cast(ops.shape(per_anchor)[0], "float32")
    scale = batch / ops.maximum(ops.sum(valid_f), 1.0)
    return ops.where(valid, per_anchor, 0.0) * scale


def pairwise_squared_distances(embeddings):
    """Squared Euclidean distances between all rows of `embeddings`.

    Computed as |a|^2 - 2 a.b + |b|^2 in float32, clamped at 0 against round-off, with exact
    zeros on the diagonal. No square root, so gradients are finite for identical rows.

    Args:
        embeddings: (batch, dim) tensor (not normalised here).
    Returns: (batch, batch) float32 tensor.
    """
    x = ops.cast(embeddings, "float32")
    squared_norms = ops.sum(ops.square(x), axis=-1)
    distances = (
        ops.expand_dims(squared_norms, 1)
        - 2.0 * ops.matmul(x, ops.transpose(x))
        + ops.expand_dims(squared_norms, 0)
    )
    index = ops.arange(ops.shape(x)[0])
    diagonal = ops.expand_dims(index, 1) == ops.expand_dims(index, 0)
    return ops.where(diagonal, 0.0, ops.maximum(distances, 0.0))


def pair_masks(labels):
    """The valid positives and negatives of every anchor of a batch.

    Args:
        labels: (batch,) or (batch, 1) class labels.
    Returns: `(positives, negatives)`, two (batch, batch) boolean masks: row i of `positives`
    marks the images with the label of image i other than i itself, row i of `negatives`
    the images with another label.
    """
    labels = _flat_labels(labels)
    same = ops.expand_dims(labels, 1) == ops.expand_dims(labels, 0)
    index = ops.arange(ops.shape(labels)[0])
    itself = ops.expand_dims(index, 1) == ops.expand_dims(index, 0)
    return ops.logical_and(same, ops.logical_not(itself)), ops.logical_not(same)


def _hinge(positive_distance, negative_distance, margin):
    return ops.relu(positive_distance - negative_distance + margin)


def _batch_hard_vector(labels, embeddings, margin):
    distances = pairwise_squared_distances(_l2_normalize(embeddings))
    positives, negatives = pair_masks(labels)
    hardest_positive = ops.max(ops.where(positives, distances, 0.0), axis=1)
    # Filler larger than every real distance: never the minimum of an anchor that has a negative.
    filler = ops.stop_gradient(ops.max(distances)) + 1.0
    hardest_negative = ops.min(ops.where(negatives, distances, filler), axis=1)
    valid = ops.logical_and(ops.any(positives, axis=1), ops.any(negatives, axis=1))
    per_anchor = _hinge(hardest_positive, hardest_negative, margin)
    return _mean_preserving_vector(per_anchor, valid)


def _random_choice(mask, noise):
    """Index of a uniformly random True entry per row (arbitrary if the row has none)."""
    return ops.expand_dims(ops.argmax(ops.where(mask, noise, -1.0), axis=1), 1)


def _random_triplet_vector(labels, embeddings, margin, seed):
    distances = pairwise_squared_distances(_l2_normalize(embeddings))
    positives, negatives = pair_masks(labels)
    batch = ops.shape(distances)[0]
    noise = keras.random.uniform((2, batch, batch), seed=seed)
    positive = ops.take_along_axis(distances, _random_choice(positives, noise[0]), axis=1)
    negative = ops.take_along_axis(distances, _random_choice(negatives, noise[1]), axis=1)
    valid = ops.logical_and(ops.any(positives, axis=1), ops.any(negatives, axis=1))
    per_anchor = _hinge(ops.squeeze(positive, 1), ops.squeeze(negative, 1), margin)
    return _mean_preserving_vector(per_anchor, valid)


def _triplet_vector(anchor, positive, negative, margin):
    anchor, positive, negative = (_l2_normalize(t) for t in (anchor, positive, negative))
    positive_distance = ops.sum(ops.square(anchor - positive), axis=-1)
    negative_distance = ops.sum(ops.square(anchor - negative), axis=-1)
    return _hinge(positive_distance, negative_distance, margin)


def batch_hard_triplet_loss(labels, embeddings, margin=0.1):
    """Batch-hard triplet loss (OHEM baseline, Hermans et al. 2017).

    For every anchor: its farthest positive (same label, not itself) and its nearest
    negative (other label) in the batch. The loss is the mean hinge over the anchors that
    have at least one positive and one negative; 0 (not NaN) if there is none.

    Args:
        labels: (batch,) or (batch, 1) class labels (integers, or floats holding integers).
        embeddings: (batch, dim) embeddings; L2-normalised here.
        margin: the margin m of eq. (1), > 0.
    Returns: scalar float32 loss.
    """
    _check_margin(margin)
    return ops.mean(_batch_hard_vector(labels, embeddings, margin))


def random_triplet_loss(labels, embeddings, margin=0.1, seed=None):
    """Triplet loss with random sampling (the random-triplet baseline).

    For every anchor, one positive and one negative drawn uniformly among the valid ones in
    the batch; mean hinge over the anchors that have both (0 if none). Works in graph mode.

    Args:
        labels: (batch,) or (batch, 1) class labels.
        embeddings: (batch, dim) embeddings; L2-normalised here.
        margin: the margin m of eq. (1), > 0.
        seed: a `keras.random.SeedGenerator` (new triplets on every call, the usual choice),
            an int (the same draw on every call for a given batch) or None (global generator).
    Returns: scalar float32 loss.
    """
    _check_margin(margin)
    return ops.mean(_random_triplet_vector(labels, embeddings, margin, seed))


def triplet_loss(anchor, positive, negative, margin=0.1):
    """Triplet loss on explicit triplets: mean of [d(a, p) - d(a, n) + margin]_+ (eq. 1).

    Args:
        anchor, positive, negative: (batch, dim) embeddings; each L2-normalised here.
        margin: the margin m, > 0.
    Returns: scalar float32 loss.
    """
    _check_margin(margin)
    return ops.mean(_triplet_vector(anchor, positive, negative, margin))


class _MarginLoss(keras.losses.Loss):
    def __init__(self, margin=0.1, **kwargs):
        super().__init__(**kwargs)
        _check_margin(margin)
        self.margin = margin

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}


@keras.saving.register_keras_serializable(package="fgkeras")
class BatchHardTripletLoss(_MarginLoss):
    """`batch_hard_triplet_loss` as a Keras loss: `y_true` labels, `y_pred` embeddings.

    `call` returns a per-anchor vector whose mean is the batch loss (see the module
    docstring), so use the default "sum_over_batch_size" reduction.

    Args:
        margin: the margin m, > 0.
    y_true: (batch,) or (batch, 1) labels. y_pred: (batch, dim). Output: scalar.
    """

    def __init__(self, margin=0.1, name="batch_hard_triplet_loss", **kwargs):
        super().__init__(margin=margin, name=name, **kwargs)

    def call(self, y_true, y_pred):
        return _batch_hard_vector(y_true, y_pred, self.margin)


@keras.saving.register_keras_serializable(package="fgkeras")
class RandomTripletLoss(_MarginLoss):
    """`random_triplet_loss` as a Keras loss, holding its own `keras.random.SeedGenerator`.

    Fresh triplets are drawn on every call (also inside `tf.function`); two instances built
    with the same integer `seed` draw the same sequence.

    Args:
        margin: the margin m, > 0.
        seed: int or None, seed of the loss's generator.
    y_true: (batch,) or (batch, 1) labels. y_pred: (batch, dim). Output: scalar.
    """

    def __init__(self, margin=0.1, seed=None, name="random_triplet_loss", **kwargs):
        super().__init__(margin=margin, name=name, **kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, y_true, y_pred):
        return _random_triplet_vector(y_true, y_pred, self.margin, self.seed_generator)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="fgkeras")
class TripletLoss(_MarginLoss):
    """`triplet_loss` as a Keras loss for a model that outputs stacked triplets.

    Args:
        margin: the margin m, > 0.
    y_true: ignored (pass any (batch,) array). y_pred: (batch, 3, dim) = [anchor, positive,
    negative] along axis 1. Output: scalar (per-triplet vector before reduction).
    """

    def __init__(self, margin=0.1, name="triplet_loss", **kwargs):
        super().__init__(margin=margin, name=name, **kwargs)

    def call(self, y_true, y_pred):
        return _triplet_vector(y_pred[:, 0], y_pred[:, 1], y_pred[:, 2], self.margin)
