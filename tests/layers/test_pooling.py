import keras
import numpy as np
import pytest
import tensorflow as tf

from fgkeras.layers import CroWPooling2D
from fgkeras.layers import GeMPooling2D
from fgkeras.layers import MACPooling2D
from fgkeras.layers import SCDAPooling2D
from fgkeras.layers import SPoCPooling2D

ALL_POOLINGS = [MACPooling2D, SPoCPooling2D, GeMPooling2D, CroWPooling2D, SCDAPooling2D]


def sparse_feature_map(rng, shape=(2, 16, 16, 3)):
    """Post-ReLU-like activations whose channels have different sparsity."""
    offsets = np.linspace(-1.0, 1.0, shape[-1])
    return np.maximum(rng.normal(size=shape) + offsets, 0.0).astype("float32")


def crow_reference(fmap, a=2.0, b=2.0, epsilon=1e-6):
    descriptors = []
    for image in np.maximum(fmap.astype("float64"), 0.0):
        spatial = image.sum(axis=-1)
        spatial = (spatial / (spatial**a).sum() ** (1.0 / a)) ** (1.0 / b)
        sparsity = (image > 0).mean(axis=(0, 1))
        n_channels = image.shape[-1]
        channel = np.log((n_channels * epsilon + sparsity.sum()) / (epsilon + sparsity))
        descriptors.append(channel * (image * spatial[..., None]).sum(axis=(0, 1)))
    return np.stack(descriptors)


def scda_reference(fmap):
    descriptors = []
    for image in fmap.astype("float64"):
        aggregation = image.sum(axis=-1)
        mask = aggregation > aggregation.mean()
        if not mask.any():
            mask[:] = True
        selected = image[mask]
        descriptors.append(np.concatenate([selected.mean(axis=0), selected.max(axis=0)]))
    return np.stack(descriptors)


def test_mac_and_spoc_match_numpy(rng):
    x = rng.normal(size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(MACPooling2D()(x), x.max(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(SPoCPooling2D()(x), x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_gem_matches_numpy_and_its_limits(rng):
    x = rng.uniform(0.5, 1.0, size=(2, 16, 16, 3)).astype("float32")
    expected = ((x.astype("float64") ** 3).mean(axis=(1, 2))) ** (1 / 3)
    np.testing.assert_allclose(GeMPooling2D(p=3.0)(x), expected, rtol=1e-5)
    np.testing.assert_allclose(GeMPooling2D(p=1.0)(x), x.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(GeMPooling2D(p=500.0)(x), x.max(axis=(1, 2)), rtol=2e-2)
    # Activations are clipped at epsilon, so negative inputs do not give NaN.
    assert np.all(np.isfinite(GeMPooling2D()(-x)))


def test_gem_p_is_a_weight_with_a_finite_gradient(rng):
    x = tf.constant(sparse_feature_map(rng))
    layer = GeMPooling2D(p=2.0)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(layer(x))
    (grad,) = tape.gradient(total, [layer.p.value])
    assert [w.name for w in layer.trainable_weights] == ["p"]
    assert np.isfinite(grad.numpy()) and grad.numpy() != 0.0
    frozen = GeMPooling2D(trainable_p=False)
    frozen(x)
    assert frozen.trainable_weights == [] and len(frozen.non_trainable_weights) == 1


def test_crow_matches_numpy_reference(rng):
    x = sparse_feature_map(rng)
    np.testing.assert_allclose(CroWPooling2D()(x), crow_reference(x), rtol=1e-5)
    np.testing.assert_allclose(
        CroWPooling2D(a=1.0, b=1.0)(x), crow_reference(x, a=1.0, b=1.0), rtol=1e-5
    )


def test_crow_channel_weights_favour_sparse_channels(rng):
    # Same spatial layout in both channels, channel 0 much sparser: the sparse one gets more weight.
    base = rng.uniform(0.5, 1.0, size=(1, 8, 8, 1)).astype("float32")
    sparse = base * (rng.uniform(size=base.shape) < 0.2)
    x = np.concatenate([sparse, base], axis=-1)
    crow = keras.ops.convert_to_numpy(CroWPooling2D()(x))
    plain = keras.ops.convert_to_numpy(SPoCPooling2D()(x))
    assert crow[0, 0] / crow[0, 1] > plain[0, 0] / plain[0, 1]


def test_crow_all_zero_map_is_finite_with_finite_gradients():
    x = tf.zeros((2, 4, 4, 3))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = CroWPooling2D()(x)
        total = tf.reduce_sum(y)
    np.testing.assert_array_equal(y.numpy(), 0.0)
    assert np.all(np.isfinite(tape.gradient(total, x).numpy()))


def test_crow_gradients_finite_with_zero_locations(rng):
    x = tf.constant(sparse_feature_map(rng))
    with tf.GradientTape() as tape:
        tape.watch(x)
        total = tf.reduce_sum(CroWPooling2D()(x))
    assert np.all(np.isfinite(tape.gradient(total, x).numpy()))


def test_scda_matches_numpy_reference(rng):
    x = rng.normal(size=(2, 16, 16, 3)).astype("float32")
    y = SCDAPooling2D()(x)
    assert y.shape == (2, 6)
    np.testing.assert_allclose(y, scda_reference(x), rtol=1e-5, atol=1e-6)


def test_scda_selects_everything_on_a_constant_map():
    x = np.ones((1, 4, 4, 2), dtype="float32")
    np.testing.assert_allclose(SCDAPooling2D()(x), np.ones((1, 4)))


@pytest.mark.parametrize("cls", ALL_POOLINGS)
def test_channels_first_matches_channels_last(cls, rng):
    x = sparse_feature_map(rng)
    np.testing.assert_allclose(
        cls(data_format="channels_first")(np.transpose(x, (0, 3, 1, 2))), cls()(x), rtol=1e-6
    )


@pytest.mark.parametrize("cls", ALL_POOLINGS)
def test_mixed_float16_is_finite(cls, rng):
    x = (sparse_feature_map(rng) * 50.0).astype("float16")
    y = cls(dtype="mixed_float16")(x)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    reference = keras.ops.convert_to_numpy(cls()(x.astype("float32")))
    y = keras.ops.convert_to_numpy(y).astype("float32")
    np.testing.assert_allclose(y, reference, rtol=2e-3)


@pytest.mark.parametrize("cls", ALL_POOLINGS)
def test_symbolic_shape_with_unknown_spatial_size(cls):
    inputs = keras.Input((None, None, 5))
    channels = 10 if cls is SCDAPooling2D else 5
    assert cls()(inputs).shape == (None, channels)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="`p` must be > 0. Received: p=0"):
        GeMPooling2D(p=0)
    with pytest.raises(ValueError, match="`a` must be > 0. Received: a=-1"):
        CroWPooling2D(a=-1)
    with pytest.raises(ValueError, match="`data_format`"):
        MACPooling2D(data_format="NHWC")


@pytest.mark.parametrize("cls", ALL_POOLINGS)
def test_config_and_keras_round_trip(cls, tmp_path, rng):
    layer = cls(name="pool")
    clone = cls.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()

    inputs = keras.Input((16, 16, 3))
    features = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    model = keras.Model(inputs, cls()(features))
    if cls is GeMPooling2D:
        model.layers[-1].p.assign(2.5)  # a trained exponent must survive the round trip
    x = rng.uniform(size=(2, 16, 16, 3)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.layers[-1], cls)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    if cls is GeMPooling2D:
        assert float(loaded.layers[-1].p.numpy()) == 2.5
