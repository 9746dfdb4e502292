import keras
import numpy as np
import pytest

from fgkeras.losses import AdversarialTripletLoss
from fgkeras.losses import adversarial_triplet_loss
from fgkeras.losses import discriminator_loss
from fgkeras.losses import fake_loss
from fgkeras.losses import generator_loss
from fgkeras.losses import identity_loss
from fgkeras.losses import triplet_loss

MARGIN = 0.1


def unit(degrees):
    radians = np.deg2rad(np.asarray(degrees, dtype="float64"))
    return np.stack([np.cos(radians), np.sin(radians)], axis=-1).astype("float32")


def numpy_cross_entropy(labels, logits):
    logits = logits.reshape(-1, logits.shape[-1]).astype("float64")
    labels = np.asarray(labels).reshape(-1)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels].mean()


def value(x):
    return float(keras.ops.convert_to_numpy(x))


def test_adversarial_triplet_loss_is_eq_2():
    # d = 2 - 2 cos(angle) between unit vectors.
    anchor = unit([0, 0])
    positive = unit([60, 10])   # d(a, p) = 1 and 2 - 2 cos 10°
    negative = unit([90, 120])  # d(a, n) = 2 and 3
    d_ap = 2 - 2 * np.cos(np.deg2rad([60, 10]))
    d_an = np.array([2.0, 3.0])
    expected = np.maximum(d_an - d_ap + MARGIN, 0).mean()
    assert expected > 0
    np.testing.assert_allclose(value(adversarial_triplet_loss(anchor, positive, negative, MARGIN)),
                               expected, rtol=1e-5)


def test_adversarial_loss_is_the_mirror_of_the_embedder_loss(rng):
    a, p, n = (rng.normal(size=(6, 5)).astype("float32") for _ in range(3))
    np.testing.assert_allclose(value(adversarial_triplet_loss(a, p, n)), value(triplet_loss(a, n, p)), rtol=1e-6)
    # A triplet that F finds easy (n far, p near) is hard for G, and the other way round.
    easy_for_f = (unit([0]), unit([5]), unit([170]))
    assert value(triplet_loss(*easy_for_f)) == 0.0
    assert value(adversarial_triplet_loss(*easy_for_f)) > 3.0


def test_adversarial_loss_is_scale_invariant(rng):
    a, p, n = (rng.normal(size=(4, 3)).astype("float32") for _ in range(3))
    np.testing.assert_allclose(value(adversarial_triplet_loss(a * 7, p * 0.1, n * 3)),
                               value(adversarial_triplet_loss(a, p, n)), rtol=1e-5)


def test_identity_loss_averages_over_the_triplet_slots(rng):
    labels = np.array([[0, 0, 2], [1, 1, 0]])
    logits = rng.normal(size=(2, 3, 4)).astype("float32")  # K = 3 identities + fake
    np.testing.assert_allclose(value(identity_loss(labels, logits)), numpy_cross_entropy(labels, logits),
                               rtol=1e-5)


def test_fake_loss_targets_the_last_class(rng):
    logits = rng.normal(size=(2, 3, 5)).astype("float32")
    np.testing.assert_allclose(value(fake_loss(logits)), numpy_cross_entropy(np.full((2, 3), 4), logits),
                               rtol=1e-5)
    confident_fake = np.tile(np.array([0, 0, 0, 0, 20.0], "float32"), (4, 1))
    confident_real = np.tile(np.array([20.0, 0, 0, 0, 0], "float32"), (4, 1))
    assert value(fake_loss(confident_fake)) < 1e-6
    assert value(fake_loss(confident_real)) > 19


def test_discriminator_loss_is_eq_4(rng):
    labels = np.array([[0, 0, 1], [2, 2, 1]])
    real = rng.normal(size=(2, 3, 4)).astype("float32")
    fake = rng.normal(size=(2, 3, 4)).astype("float32")
    for beta in (1.0, 0.5, 0.0):
        expected = numpy_cross_entropy(labels, real) + beta * numpy_cross_entropy(np.full((2, 3), 3), fake)
        np.testing.assert_allclose(value(discriminator_loss(labels, real, fake, beta=beta)), expected, rtol=1e-5)


def test_generator_loss_is_eq_8(rng):
    labels = np.array([[0, 0, 1], [1, 1, 0]])
    a, p, n = (rng.normal(size=(2, 4)).astype("float32") for _ in range(3))
    fake = rng.normal(size=(2, 3, 3)).astype("float32")
    for gamma in (1.0, 2.0):
        expected = value(adversarial_triplet_loss(a, p, n)) + gamma * numpy_cross_entropy(labels, fake)
        np.testing.assert_allclose(value(generator_loss(labels, a, p, n, fake, gamma=gamma)), expected, rtol=1e-5)


def test_loss_class_matches_the_function_and_round_trips(rng):
    triplets = rng.normal(size=(5, 3, 4)).astype("float32")
    loss = AdversarialTripletLoss(margin=0.3)
    expected = adversarial_triplet_loss(triplets[:, 0], triplets[:, 1], triplets[:, 2], margin=0.3)
    np.testing.assert_allclose(value(loss(np.zeros(5), triplets)), value(expected), rtol=1e-6)
    clone = AdversarialTripletLoss.from_config(loss.get_config())
    assert clone.margin == 0.3 and clone.name == "adversarial_triplet_loss"


@pytest.mark.parametrize("call, message", [
    (lambda: adversarial_triplet_loss(unit([0]), unit([1]), unit([2]), margin=0.0), "`margin` must be > 0"),
    (lambda: AdversarialTripletLoss(margin=-1), "`margin` must be > 0"),
    (lambda: discriminator_loss([0], np.zeros((1, 3)), np.zeros((1, 3)), beta=-1.0), "`beta` must be >= 0"),
    (lambda: generator_loss([[0, 0, 1]], unit([0]), unit([1]), unit([2]), np.zeros((1, 3, 3)), gamma=-0.5),
     "`gamma` must be >= 0. Received: gamma=-0.5"),
])
def test_bad_weights_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
