import keras
import numpy as np
import pytest

from fgkeras.layers import ConstrainedNonalignment, GlobalNonalignment


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


def _maps(rng, batch=2, height=5, width=4, cy=3, cx=2):
    y = rng.normal(size=(batch, height, width, cy)).astype("float32")
    x = rng.normal(size=(batch, height, width, cx)).astype("float32")
    return y, x


def _naive_cnc(layer, y, x, radius):
    """Eq. (1) position by position: softmax over the window's positions inside the map only."""
    q = _numpy(layer.query(y))
    k = _numpy(layer.key(x))
    v = _numpy(layer.value(x))
    batch, height, width, _ = q.shape
    z = np.zeros((batch, height, width, v.shape[-1]), "float64")
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                window = [(a, c) for a in range(i - radius, i + radius + 1) for c in range(j - radius, j + radius + 1)
                          if 0 <= a < height and 0 <= c < width]
                logits = np.array([q[b, i, j] @ k[b, a, c] for a, c in window], "float64")
                weights = np.exp(logits - logits.max())
                weights /= weights.sum()
                z[b, i, j] = sum(w * v[b, a, c] for w, (a, c) in zip(weights, window))
    return np.concatenate([y, z], axis=-1)


@pytest.mark.parametrize("radius", [0, 1, 2, 7])  # 7: larger than the 5×4 map
def test_cnc_equals_a_naive_loop_including_borders(rng, radius):
    y, x = _maps(rng)
    layer = ConstrainedNonalignment(radius=radius, key_channels=3, value_channels=2)
    got = _numpy(layer([y, x]))
    np.testing.assert_allclose(got, _naive_cnc(layer, y, x, radius), rtol=1e-4, atol=1e-5)
    assert got.shape == (2, 5, 4, 3 + 2)


def test_radius_zero_copies_the_value_at_the_same_position(rng):
    y, x = _maps(rng)
    layer = ConstrainedNonalignment(radius=0)
    np.testing.assert_allclose(_numpy(layer([y, x]))[..., 3:], _numpy(layer.value(x)), rtol=1e-5, atol=1e-6)


def test_border_positions_ignore_outside_the_map(rng):
    # A zero-padded (not masked) window would give the padding logit 0 a weight at the corner.
    y, x = _maps(rng, height=3, width=3)
    layer = ConstrainedNonalignment(radius=1)
    layer([y, x])
    # Make every inside logit very negative: masked padding keeps the weights on the map anyway.
    layer.query.bias.assign(np.full(layer.query.bias.shape, 10.0, "float32"))
    layer.key.bias.assign(np.full(layer.key.bias.shape, -10.0, "float32"))
    np.testing.assert_allclose(_numpy(layer([y, x])), _naive_cnc(layer, y, x, 1), rtol=1e-4, atol=1e-4)


def test_default_radius_is_a_quarter_of_the_map(rng):
    y, x = _maps(rng, height=8, width=8)
    layer = ConstrainedNonalignment()
    layer([y, x])
    assert layer.effective_radius == 2


def test_global_nc_equals_cnc_with_a_window_covering_the_map(rng):
    y, x = _maps(rng)
    cnc = ConstrainedNonalignment(radius=4)
    global_nc = GlobalNonalignment()
    expected = _numpy(cnc([y, x]))
    global_nc([y, x])
    global_nc.set_weights(cnc.get_weights())
    np.testing.assert_allclose(_numpy(global_nc([y, x])), expected, rtol=1e-4, atol=1e-5)
    # and a smaller window really is different
    small = ConstrainedNonalignment(radius=1)
    small([y, x])
    small.set_weights(cnc.get_weights())
    assert not np.allclose(_numpy(small([y, x])), expected, atol=1e-3)


def test_gradients_flow_to_every_projection(rng):
    import tensorflow as tf

    keras.utils.set_random_seed(0)  # the layer's weights, whatever ran before
    y, x = _maps(rng)
    layer = ConstrainedNonalignment(radius=1)
    with tf.GradientTape() as tape:
        out = layer([y, x])
        loss = keras.ops.sum(out[..., 3:] ** 2)
    grads = dict(zip([v.path for v in layer.trainable_variables], tape.gradient(loss, layer.trainable_variables)))
    # K's bias adds Q_p·b to every logit of p's window: the softmax ignores it, so its gradient is 0.
    key_bias = [path for path in grads if path.endswith("key/bias")]
    assert len(key_bias) == 1 and np.allclose(_numpy(grads.pop(key_bias[0])), 0, atol=1e-5)
    assert all(np.all(np.isfinite(_numpy(g))) and np.any(np.abs(_numpy(g)) > 1e-6) for g in grads.values()), grads.keys()


@pytest.mark.parametrize("cls, kwargs", [(ConstrainedNonalignment, {"radius": 1, "key_channels": 4}),
                                         (GlobalNonalignment, {"value_channels": 3})])
def test_config_and_keras_file_round_trip(tmp_path, rng, cls, kwargs):
    y, x = _maps(rng)
    inputs = [keras.Input(y.shape[1:]), keras.Input(x.shape[1:])]
    model = keras.Model(inputs, cls(**kwargs, name="nc")(inputs))
    expected = _numpy(model([y, x]))
    layer = model.get_layer("nc")
    clone = cls.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    model.save(tmp_path / "nc.keras")
    restored = keras.saving.load_model(tmp_path / "nc.keras")
    np.testing.assert_allclose(_numpy(restored([y, x])), expected, rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"radius": -1}, "`radius` must be an int >= 0 or None. Received: radius=-1"),
    ({"radius": 1.5}, "`radius` must be an int"),
    ({"key_channels": 0}, "`key_channels` must be an int >= 1"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConstrainedNonalignment(**kwargs)


def test_maps_of_different_sizes_are_refused(rng):
    y = np.zeros((1, 4, 4, 2), "float32")
    x = np.zeros((1, 8, 8, 2), "float32")
    with pytest.raises(ValueError, match="same, known spatial size"):
        ConstrainedNonalignment(radius=1)([y, x])
