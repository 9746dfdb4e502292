import keras
import numpy as np
import pytest

from fgkeras.layers import L2Normalize


def test_output_has_unit_norm_and_direction_of_input(rng):
    x = rng.normal(size=(4, 8)).astype("float32") * 5.0
    y = keras.ops.convert_to_numpy(L2Normalize()(x))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y, x / np.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-6)


def test_axis_list_normalises_over_several_axes(rng):
    x = rng.normal(size=(2, 3, 4)).astype("float32")
    y = keras.ops.convert_to_numpy(L2Normalize(axis=[1, 2])(x))
    np.testing.assert_allclose(np.sqrt((y**2).sum(axis=(1, 2))), 1.0, rtol=1e-6)


def test_zero_vector_stays_zero_with_finite_gradient():
    import tensorflow as tf

    x = tf.zeros((2, 5))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = L2Normalize()(x)
        total = tf.reduce_sum(y)
    grad = tape.gradient(total, x)
    np.testing.assert_array_equal(y.numpy(), 0.0)
    assert np.all(np.isfinite(grad.numpy()))


def test_float16_policy_computes_in_float32():
    # Squares of 300 overflow float16 (max 65504): a float16 computation would give inf/0.
    x = np.full((2, 4), 300.0, dtype="float16")
    layer = L2Normalize(dtype="mixed_float16")
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y).astype("float32"), 0.5, rtol=1e-3)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="`epsilon` must be > 0. Received: epsilon=0"):
        L2Normalize(epsilon=0)
    with pytest.raises(ValueError, match="`axis`"):
        L2Normalize(axis="last")
    with pytest.raises(ValueError, match="`axis` must name non-batch axes"):
        L2Normalize(axis=[0, 1])(np.ones((2, 3)))
    with pytest.raises(ValueError, match="`axis` must name non-batch axes"):
        L2Normalize(axis=2)(np.ones((2, 3)))


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")
@pytest.mark.parametrize(("shape", "axis"), [((2, 8), -1), ((2, 3, 4), [1, 2]), ((2, 3, 4), 1)])
def test_converts_to_tflite_builtins_with_parity(shape, axis, rng):
    import tensorflow as tf

    inputs = keras.Input(shape[1:], batch_size=shape[0])
    model = keras.Model(inputs, L2Normalize(axis=axis)(inputs))
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    x = rng.normal(size=shape).astype("float32")
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    y = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(y, keras.ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-6)


def test_config_and_keras_round_trip(tmp_path, rng):
    layer = L2Normalize(axis=-1, epsilon=1e-6, name="l2")
    clone = L2Normalize.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()

    inputs = keras.Input((6,))
    model = keras.Model(inputs, L2Normalize(epsilon=1e-6)(keras.layers.Dense(4)(inputs)))
    x = rng.normal(size=(3, 6)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.layers[-1], L2Normalize)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
