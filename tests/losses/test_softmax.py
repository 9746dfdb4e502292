import keras
import numpy as np
import pytest

from fgkeras.layers import NoBiasDense
from fgkeras.losses import SoftmaxLoss
from fgkeras.losses import softmax_cross_entropy


def test_equals_keras_sparse_categorical_crossentropy(rng):
    logits = rng.normal(size=(6, 5)).astype("float32") * 3.0
    labels = rng.integers(0, 5, size=6)
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    np.testing.assert_allclose(softmax_cross_entropy(labels, logits), expected, rtol=1e-6)
    np.testing.assert_allclose(SoftmaxLoss()(labels.reshape(-1, 1), logits), expected, rtol=1e-6)


def test_hand_worked_value():
    # Two equal logits: -log(1/2). With smoothing 0.5 the target is (0.75, 0.25), same value.
    logits = np.zeros((1, 2), dtype="float32")
    np.testing.assert_allclose(softmax_cross_entropy([1], logits), np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(softmax_cross_entropy([1], logits, 0.5), np.log(2.0), rtol=1e-6)
    # Logits (log 3, 0): p = (3/4, 1/4); label 0, smoothing 0.5: -(.75 log .75 + .25 log .25).
    logits = np.array([[np.log(3.0), 0.0]], dtype="float32")
    expected = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    np.testing.assert_allclose(softmax_cross_entropy([0], logits, 0.5), expected, rtol=1e-6)


def test_label_smoothing_equals_keras_categorical_crossentropy(rng):
    logits = rng.normal(size=(6, 5)).astype("float32")
    labels = rng.integers(0, 5, size=6)
    expected = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)(
        np.eye(5)[labels], logits
    )
    value = SoftmaxLoss(label_smoothing=0.1)(labels, logits)
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_float16_logits_are_finite(rng):
    logits = (rng.normal(size=(4, 3)) * 1000.0).astype("float16")
    value = softmax_cross_entropy(np.array([0, 1, 2, 0]), logits, label_smoothing=0.1)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert np.isfinite(float(value))


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.0])
def test_invalid_label_smoothing(label_smoothing):
    message = (
        f"`label_smoothing` must be in \\[0, 1\\). Received: label_smoothing={label_smoothing}"
    )
    with pytest.raises(ValueError, match=message):
        SoftmaxLoss(label_smoothing=label_smoothing)
    with pytest.raises(ValueError, match=message):
        softmax_cross_entropy([0], np.zeros((1, 2)), label_smoothing=label_smoothing)


def no_bias_classifier(classes=4):
    inputs = keras.Input((8,))
    return keras.Model(inputs, NoBiasDense(classes)(keras.layers.Dense(6)(inputs)))


def test_no_bias_softmax_fit_two_steps(rng):
    keras.utils.set_random_seed(0)
    labels = np.repeat(np.arange(4), 4)
    x = (rng.normal(size=(4, 8))[labels] + 0.1 * rng.normal(size=(16, 8))).astype("float32")
    model = no_bias_classifier()
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=SoftmaxLoss(label_smoothing=0.1))
    losses = model.fit(x, labels, batch_size=16, epochs=2, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[1] < losses[0]


def test_config_and_keras_round_trip(tmp_path, rng):
    loss = SoftmaxLoss(label_smoothing=0.2)
    assert SoftmaxLoss.from_config(loss.get_config()).get_config() == loss.get_config()
    model = no_bias_classifier()
    model.compile(optimizer="sgd", loss=loss)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.loss, SoftmaxLoss) and loaded.loss.label_smoothing == 0.2
    x = rng.normal(size=(3, 8)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
