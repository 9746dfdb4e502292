import keras
import numpy as np
import pytest

from fgkeras.layers import NoBiasDense


def test_has_no_bias_and_maps_zero_to_zero(rng):
    layer = NoBiasDense(5)
    x = rng.normal(size=(3, 4)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    assert [w.name for w in layer.weights] == ["kernel"]
    assert layer.bias is None
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(np.zeros((2, 4)))), 0.0)
    np.testing.assert_allclose(y, x @ keras.ops.convert_to_numpy(layer.kernel), rtol=1e-5)


def test_rejects_a_bias():
    with pytest.raises(ValueError, match="Received: use_bias=True"):
        NoBiasDense(3, use_bias=True)
    with pytest.raises(ValueError, match="`bias_initializer` is not accepted"):
        NoBiasDense(3, bias_initializer="ones")
    assert NoBiasDense(3, use_bias=False).use_bias is False


def test_normalize_kernel_gives_cosines(rng):
    layer = NoBiasDense(6, normalize_kernel=True)
    x = rng.normal(size=(4, 3)).astype("float32")
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y = keras.ops.convert_to_numpy(layer(x))
    w = keras.ops.convert_to_numpy(layer.kernel)
    np.testing.assert_allclose(y, x @ (w / np.linalg.norm(w, axis=0)), rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(y) <= 1.0 + 1e-6)


def test_mixed_float16_is_finite(rng):
    layer = NoBiasDense(3, dtype="mixed_float16", normalize_kernel=True)
    y = layer(rng.normal(size=(2, 4)).astype("float16"))
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(y)))


@pytest.mark.parametrize("normalize_kernel", [False, True])
def test_config_and_keras_round_trip(tmp_path, rng, normalize_kernel):
    layer = NoBiasDense(3, kernel_regularizer="l2", normalize_kernel=normalize_kernel)
    config = layer.get_config()
    assert "use_bias" not in config and "bias_initializer" not in config
    clone = NoBiasDense.from_config(config)
    assert clone.get_config() == config

    inputs = keras.Input((4,))
    model = keras.Model(inputs, NoBiasDense(3, normalize_kernel=normalize_kernel)(inputs))
    x = rng.normal(size=(2, 4)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.layers[-1], NoBiasDense)
    assert loaded.layers[-1].normalize_kernel is normalize_kernel
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
