import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from fgkeras.layers import L2Normalize
from fgkeras.losses import BatchHardTripletLoss
from fgkeras.losses import RandomTripletLoss
from fgkeras.losses import TripletLoss
from fgkeras.losses import batch_hard_triplet_loss
from fgkeras.losses import pairwise_squared_distances
from fgkeras.losses import random_triplet_loss
from fgkeras.losses import triplet_loss

MARGIN = 0.1


def unit_vectors(degrees):
    radians = np.deg2rad(np.asarray(degrees, dtype="float64"))
    return np.stack([np.cos(radians), np.sin(radians)], axis=-1).astype("float32")


# Class 0 at 0 and 60 degrees, class 1 at 90 and 180 degrees. With d = 2 - 2 cos(angle):
#   anchor 0: hardest positive d(0,1) = 1, hardest negative d(0,2) = 2    -> [1 - 2 + m]+ = 0
#   anchor 1: hardest positive 1, hardest negative d(1,2) = 2 - sqrt 3    -> 1 - (2 - sqrt 3) + m
#   anchor 2: hardest positive d(2,3) = 2, hardest negative d(2,1) = same -> 2 - (2 - sqrt 3) + m
#   anchor 3: hardest positive 2, hardest negative d(3,1) = 3             -> [2 - 3 + m]+ = 0
FOUR_POINTS = unit_vectors([0, 60, 90, 180])
FOUR_LABELS = np.array([0, 0, 1, 1])
FOUR_POINTS_LOSS = ((1 - (2 - np.sqrt(3)) + MARGIN) + (2 - (2 - np.sqrt(3)) + MARGIN)) / 4


def hinge(d_ap, d_an, margin=MARGIN):
    return max(d_ap - d_an + margin, 0.0)


def numpy_distances(embeddings):
    e = embeddings.astype("float64")
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    return ((e[:, None] - e[None]) ** 2).sum(-1)


def test_pairwise_squared_distances_match_numpy(rng):
    x = rng.normal(size=(6, 5)).astype("float32")
    d = keras.ops.convert_to_numpy(pairwise_squared_distances(x))
    np.testing.assert_allclose(d, ((x[:, None] - x[None]) ** 2).sum(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.diag(d), 0.0)
    duplicated = pairwise_squared_distances(np.repeat(x[:1] * 1000.0, 3, axis=0))
    assert np.all(keras.ops.convert_to_numpy(duplicated) >= 0.0)


def test_batch_hard_on_hand_worked_example():
    value = batch_hard_triplet_loss(FOUR_LABELS, FOUR_POINTS, margin=MARGIN)
    np.testing.assert_allclose(value, FOUR_POINTS_LOSS, rtol=1e-5)
    # Embeddings are L2-normalised inside: the scale of the inputs does not matter.
    scaled = FOUR_POINTS * np.array([[3.0], [0.5], [7.0], [2.0]], dtype="float32")
    for value in (
        batch_hard_triplet_loss(FOUR_LABELS, scaled),
        BatchHardTripletLoss()(FOUR_LABELS, FOUR_POINTS),
    ):
        np.testing.assert_allclose(value, FOUR_POINTS_LOSS, rtol=1e-5)


def test_anchors_without_positive_are_excluded_from_the_mean():
    # A fifth point of its own class at -75 degrees: farther than every current hardest
    # negative, so the four anchors keep their values; counted in the mean it would give 4/5.
    points = np.concatenate([FOUR_POINTS, unit_vectors([-75])])
    labels = np.array([0, 0, 1, 1, 2])
    np.testing.assert_allclose(batch_hard_triplet_loss(labels, points), FOUR_POINTS_LOSS, rtol=1e-5)
    np.testing.assert_allclose(
        BatchHardTripletLoss()(labels.reshape(-1, 1), points), FOUR_POINTS_LOSS, rtol=1e-5
    )
    per_anchor = keras.ops.convert_to_numpy(BatchHardTripletLoss(reduction=None)(labels, points))
    assert per_anchor[-1] == 0.0


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [5, 5, 5, 5]], ids=["no-positive", "no-negative"])
@pytest.mark.parametrize("loss_fn", [batch_hard_triplet_loss, random_triplet_loss])
def test_no_valid_anchor_gives_zero_and_finite_gradient(loss_fn, labels):
    x = tf.constant(FOUR_POINTS)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss_fn(np.array(labels), x)
    assert float(value) == 0.0
    assert np.all(np.isfinite(tape.gradient(value, x).numpy()))


@pytest.mark.parametrize("margin", [0, -0.5])
def test_margin_must_be_positive(margin):
    message = f"`margin` must be > 0. Received: margin={margin}"
    for make in (BatchHardTripletLoss, RandomTripletLoss, TripletLoss):
        with pytest.raises(ValueError, match=message):
            make(margin=margin)
    with pytest.raises(ValueError, match=message):
        batch_hard_triplet_loss(FOUR_LABELS, FOUR_POINTS, margin=margin)
    with pytest.raises(ValueError, match=message):
        random_triplet_loss(FOUR_LABELS, FOUR_POINTS, margin=margin)
    with pytest.raises(ValueError, match=message):
        triplet_loss(FOUR_POINTS, FOUR_POINTS, FOUR_POINTS, margin=margin)


def test_random_triplet_values_are_enumerated_triplets(rng):
    labels = np.array([0, 0, 0, 1, 1, 2, 3])  # anchors 5 and 6 have no positive
    embeddings = rng.normal(size=(7, 4)).astype("float32")
    d = numpy_distances(embeddings)
    loss = RandomTripletLoss(seed=7, reduction=None)
    valid = np.array([1, 1, 1, 1, 1, 0, 0], dtype=bool)
    for _ in range(5):
        # reduction=None: per-anchor values scaled by batch / valid anchors (see module docstring).
        per_anchor = keras.ops.convert_to_numpy(loss(labels, embeddings))
        per_anchor = per_anchor * valid.sum() / len(labels)
        assert np.all(per_anchor[~valid] == 0.0)
        for i in np.flatnonzero(valid):
            positives = [j for j in range(7) if labels[j] == labels[i] and j != i]
            negatives = [j for j in range(7) if labels[j] != labels[i]]
            pairs = itertools.product(positives, negatives)
            candidates = [hinge(d[i, p], d[i, n]) for p, n in pairs]
            assert np.min(np.abs(np.array(candidates) - per_anchor[i])) < 1e-5


def test_random_triplet_samples_every_valid_triplet():
    # Anchor 0 has positives {1, 2} and negatives {3, 4, 5}: six distinct values (margin 4 >= any
    # d(a, n) - d(a, p), so no hinge clips), each scaled by batch / valid anchors = 1.
    embeddings = unit_vectors([0, 10, 25, 120, 150, 175])
    labels = np.array([0, 0, 0, 1, 1, 1])
    d = numpy_distances(embeddings)
    expected = {round(d[0, p] - d[0, n] + 4.0, 4) for p in (1, 2) for n in (3, 4, 5)}
    loss = RandomTripletLoss(margin=4.0, seed=0, reduction=None)
    seen = {round(float(loss(labels, embeddings)[0]), 4) for _ in range(100)}
    assert seen == expected


def test_random_triplet_is_deterministic_for_a_seed(rng):
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    embeddings = rng.normal(size=(8, 4)).astype("float32")
    first = [float(RandomTripletLoss(seed=3)(labels, embeddings)) for _ in range(2)]
    assert first[0] == first[1]
    assert float(random_triplet_loss(labels, embeddings, seed=3)) == float(
        random_triplet_loss(labels, embeddings, seed=3)
    )
    loss = RandomTripletLoss(seed=3)
    draws = {float(loss(labels, embeddings)) for _ in range(10)}
    assert len(draws) > 1  # the held generator advances


def test_random_triplet_in_graph_mode(rng):
    labels = np.array([0, 0, 1, 1, 2, 2], dtype="float32")
    embeddings = rng.normal(size=(6, 4)).astype("float32")
    loss = RandomTripletLoss(seed=1)
    graph_loss = tf.function(
        loss.__call__, input_signature=[tf.TensorSpec([None]), tf.TensorSpec([None, 4])]
    )
    values = {float(graph_loss(labels, embeddings)) for _ in range(10)}
    assert all(np.isfinite(v) for v in values) and len(values) > 1


def test_triplet_loss_on_explicit_triplets():
    a, p, n = unit_vectors([0]), unit_vectors([90]), unit_vectors([180])
    np.testing.assert_allclose(triplet_loss(a, p, n), 0.0)  # 2 - 4 + 0.1 < 0
    np.testing.assert_allclose(triplet_loss(a, n, p), 2.1, rtol=1e-6)  # 4 - 2 + 0.1
    # Two stacked triplets, (a, p, n) and (a, n, p): mean of 0 and 2.1.
    stacked = np.stack([np.concatenate(pair) for pair in ([a, a], [p, n], [n, p])], axis=1)
    np.testing.assert_allclose(TripletLoss()(np.zeros(2), stacked), 1.05, rtol=1e-6)


@pytest.mark.parametrize(
    "loss_fn",
    [
        batch_hard_triplet_loss,
        lambda labels, x: random_triplet_loss(labels, x, seed=0),
        lambda labels, x: triplet_loss(x[:2], x[2:4], x[4:6]),
    ],
    ids=["batch_hard", "random", "explicit"],
)
def test_gradients_finite_with_identical_embeddings(loss_fn, rng):
    row = rng.normal(size=(1, 4)).astype("float32")
    # Identical positives (rows 0, 1), identical negatives across classes (rows 2, 4), and a
    # triplet whose anchor equals its positive and its negative.
    x = tf.constant(np.concatenate([row, row, -row, row * 2, -row, row]))
    labels = np.array([0, 0, 1, 1, 2, 2])
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss_fn(labels, x)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(tape.gradient(value, x).numpy()))


@pytest.mark.parametrize("loss_fn", [batch_hard_triplet_loss, random_triplet_loss])
def test_float16_embeddings_give_finite_float32_loss(loss_fn, rng):
    x = (rng.normal(size=(8, 16)) * 300.0).astype("float16")  # squares overflow float16
    labels = np.repeat(np.arange(4), 2)
    value = loss_fn(labels, x)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert np.isfinite(float(value))
    if loss_fn is batch_hard_triplet_loss:
        np.testing.assert_allclose(value, loss_fn(labels, x.astype("float32")), rtol=1e-3)


def embedder(dim=8):
    inputs = keras.Input((16,))
    return keras.Model(inputs, L2Normalize()(keras.layers.Dense(dim)(inputs)))


def pk_batch(rng, classes=4, per_class=4):
    labels = np.repeat(np.arange(classes), per_class)
    x = rng.normal(size=(classes, 16))[labels] + 0.5 * rng.normal(size=(len(labels), 16))
    return x.astype("float32"), labels


@pytest.mark.parametrize(
    "loss", [BatchHardTripletLoss(), RandomTripletLoss(seed=0)], ids=["hard", "random"]
)
def test_fit_two_steps_with_plain_compile(loss, rng):
    keras.utils.set_random_seed(0)
    x, labels = pk_batch(rng)
    model = embedder()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    history = model.fit(x, labels, batch_size=16, epochs=2, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert len(losses) == 2 and np.all(np.isfinite(losses)) and losses[0] > 0
    if isinstance(loss, BatchHardTripletLoss):
        assert losses[1] < losses[0]


def test_keras_reduction_returns_the_function_value(rng):
    # The per-anchor vector trick: compile()/evaluate() report exactly the plain function's value,
    # with a labels batch that has anchors without positives.
    x, labels = pk_batch(rng)
    labels[-1] = 99
    model = embedder()
    model.compile(loss=BatchHardTripletLoss(margin=0.3))
    reported = model.evaluate(x, labels, batch_size=len(x), verbose=0)
    expected = batch_hard_triplet_loss(labels, model.predict(x, verbose=0), margin=0.3)
    np.testing.assert_allclose(reported, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "loss",
    [
        BatchHardTripletLoss(margin=0.2),
        RandomTripletLoss(margin=0.3, seed=4),
        TripletLoss(margin=0.4),
    ],
)
def test_config_and_keras_round_trip(loss, tmp_path, rng):
    clone = type(loss).from_config(loss.get_config())
    assert clone.get_config() == loss.get_config()
    assert keras.losses.deserialize(keras.losses.serialize(loss)).get_config() == loss.get_config()

    model = embedder()
    model.compile(optimizer="sgd", loss=loss)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.loss, type(loss))
    assert loaded.loss.get_config() == loss.get_config()
    x = rng.normal(size=(4, 16)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
