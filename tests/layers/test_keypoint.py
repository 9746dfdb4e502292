import keras
import numpy as np
import pytest

from fgkeras.layers import KeypointBlock
from fgkeras.layers import KeypointMap


def _numpy_spatial_softmax(x, temperature=1.0):
    b, h, w, c = x.shape
    flat = x.reshape(b, h * w, c).astype("float64") / temperature
    e = np.exp(flat - flat.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).reshape(b, h, w, c)


def test_maps_sum_to_one_over_space_per_channel(rng):
    x = rng.normal(size=(2, 5, 3, 4)).astype("float32") * 3
    maps = keras.ops.convert_to_numpy(KeypointMap()(x))
    assert maps.shape == x.shape and maps.dtype == np.float32
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert np.all(maps >= 0)


def test_is_the_softmax_of_eq_11_over_positions_not_channels(rng):
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    for temperature in (1.0, 0.5):
        maps = keras.ops.convert_to_numpy(KeypointMap(temperature)(x))
        np.testing.assert_allclose(maps, _numpy_spatial_softmax(x, temperature), rtol=1e-5, atol=1e-7)
    # Channels are independent: summing over channels does not give 1.
    assert not np.allclose(maps.sum(axis=-1), 1.0)


def test_lower_temperature_gives_peakier_maps(rng):
    x = rng.normal(size=(1, 6, 6, 2)).astype("float32")
    sharp = keras.ops.convert_to_numpy(KeypointMap(0.2)(x))
    smooth = keras.ops.convert_to_numpy(KeypointMap(5.0)(x))
    assert np.all(sharp.max(axis=(1, 2)) > smooth.max(axis=(1, 2)))


def test_large_logits_do_not_overflow():
    x = np.zeros((1, 2, 2, 1), "float32")
    x[0, 1, 0, 0] = 1e4
    maps = keras.ops.convert_to_numpy(KeypointMap()(x))
    np.testing.assert_allclose(maps[0, :, :, 0], [[0, 0], [1, 0]], atol=1e-6)


def test_map_config_and_keras_file_round_trip(tmp_path, rng):
    layer = KeypointMap(temperature=0.5, name="kpm")
    clone = KeypointMap.from_config(layer.get_config())
    assert clone.temperature == 0.5 and clone.name == "kpm"
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, KeypointMap(0.5)(inputs))
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    path = str(tmp_path / "kpm.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored(x), model(x), rtol=1e-6)


def test_block_gives_maps_with_the_shape_of_the_next_stage(rng):
    x = rng.normal(size=(2, 8, 6, 5)).astype("float32")
    block = KeypointBlock(7, strides=2)
    maps = keras.ops.convert_to_numpy(block(x))
    assert maps.shape == (2, 4, 3, 7)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert block.shortcut_conv is not None
    odd = keras.ops.convert_to_numpy(KeypointBlock(3, strides=2)(x[:, :7, :5]))
    assert odd.shape == (2, 4, 3, 3)  # ceil, like the backbone's padded stride-2 stages
    same = KeypointBlock(5, strides=1)
    same(x)
    assert same.shortcut_conv is None  # identity shortcut when the shape does not change


def test_block_maps_are_the_softmax_of_its_logits(rng):
    x = rng.normal(size=(2, 6, 6, 4)).astype("float32")
    block = KeypointBlock(4, strides=2, temperature=0.5)
    maps = keras.ops.convert_to_numpy(block(x))
    logits = keras.ops.convert_to_numpy(block.logits(x))
    np.testing.assert_allclose(maps, _numpy_spatial_softmax(logits, 0.5), rtol=1e-5, atol=1e-7)
    assert np.any(logits < 0)  # no final ReLU: logits keep their sign


def test_block_config_and_keras_file_round_trip(tmp_path, rng):
    block = KeypointBlock(6, strides=2, temperature=2.0, name="kb")
    clone = KeypointBlock.from_config(block.get_config())
    assert (clone.filters, clone.strides, clone.temperature, clone.name) == (6, 2, 2.0, "kb")
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, KeypointBlock(6, strides=2)(inputs))
    x = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.full((2, 4, 4, 6), 1 / 16, "float32"), epochs=1, verbose=0)  # moves BN statistics
    path = str(tmp_path / "block.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored(x), model(x), rtol=1e-5, atol=1e-7)
    assert restored(x[:1]).shape == (1, 4, 4, 6)


@pytest.mark.parametrize("make, message", [
    (lambda: KeypointMap(temperature=0), "`temperature` must be > 0. Received: temperature=0"),
    (lambda: KeypointMap(temperature=-1.0), "`temperature` must be > 0"),
    (lambda: KeypointBlock(0), "`filters` must be > 0. Received: filters=0"),
    (lambda: KeypointBlock(4, strides=0), "`strides` must be > 0"),
    (lambda: KeypointBlock(4, temperature=0.0), "`temperature` must be > 0"),
    (lambda: KeypointMap()(np.ones((2, 3, 4), "float32")), "expects a \\(batch, H, W, C\\) feature map"),
])
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()
