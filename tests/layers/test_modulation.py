import keras
import numpy as np
import pytest

from fgkeras.layers import AdaptiveIdentityModulation, ConditionalBatchNormalization, IdentityModulation


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


def _inputs(rng, batch=4, size=3, channels=5, dim=6):
    features = rng.normal(size=(batch, size, size, channels)).astype("float32")
    f_id = rng.normal(size=(batch, dim)).astype("float32")
    return features, f_id


ALL = [ConditionalBatchNormalization, IdentityModulation, AdaptiveIdentityModulation]


@pytest.mark.parametrize("cls", ALL)
def test_shapes_and_gamma_beta_per_sample_and_channel(rng, cls):
    features, f_id = _inputs(rng)
    layer = cls(hidden_units=7)
    out = layer([features, f_id], training=True)
    assert out.shape == features.shape
    gamma, beta = layer.scales(features, f_id)
    assert gamma.shape == beta.shape == (4, 5)


@pytest.mark.parametrize("cls", ALL)
def test_gamma_and_beta_depend_on_f_id(rng, cls):
    features, f_id = _inputs(rng)
    layer = cls()
    layer([features, f_id])
    gamma, beta = (_numpy(t) for t in layer.scales(features, f_id))
    gamma2, beta2 = (_numpy(t) for t in layer.scales(features, f_id[::-1]))
    assert not np.allclose(gamma, gamma2) and not np.allclose(beta, beta2)
    # the output is B̂ re-scaled by them (training mode: batch statistics)
    mean, var = features.mean(axis=(0, 1, 2)), features.var(axis=(0, 1, 2))
    normalized = (features - mean) / np.sqrt(var + layer.epsilon)
    expected = normalized * gamma[:, None, None, :] + beta[:, None, None, :]
    np.testing.assert_allclose(_numpy(layer([features, f_id], training=True)), expected, rtol=1e-3, atol=1e-4)


def test_zero_mlps_are_plain_batch_normalisation(rng):
    features, f_id = _inputs(rng)
    layer = IdentityModulation()
    layer([features, f_id])
    for mlp in (layer.gamma_mlp, layer.beta_mlp):
        mlp.set_weights([np.zeros_like(w) for w in mlp.get_weights()])
    mean, var = features.mean(axis=(0, 1, 2)), features.var(axis=(0, 1, 2))
    np.testing.assert_allclose(_numpy(layer([features, f_id], training=True)),
                               (features - mean) / np.sqrt(var + layer.epsilon), rtol=1e-3, atol=1e-4)


def test_im_does_not_read_the_feature_map_but_aim_does(rng):
    features, f_id = _inputs(rng)
    other = features + rng.normal(size=(4, 1, 1, 5)).astype("float32") * 3  # other spatial means
    im, aim = IdentityModulation(), AdaptiveIdentityModulation()
    for layer in (im, aim):
        layer([features, f_id])
    np.testing.assert_allclose(_numpy(im.scales(features, f_id)[0]), _numpy(im.scales(other, f_id)[0]))
    assert not np.allclose(_numpy(aim.scales(features, f_id)[0]), _numpy(aim.scales(other, f_id)[0]))


def test_aim_attention_reads_the_mean_before_normalisation(rng):
    features, f_id = _inputs(rng)
    aim = AdaptiveIdentityModulation()
    aim([features, f_id])
    attention = _numpy(aim.feature_attention(features))
    expected = _numpy(aim.attention(features.mean(axis=(1, 2))))
    np.testing.assert_allclose(attention, expected, rtol=1e-6)
    assert np.all((attention > 0) & (attention < 1))
    np.testing.assert_allclose(_numpy(aim.modulating(features, f_id)), f_id * expected, rtol=1e-6)
    # After batch normalisation every sample's spatial mean would be near 0 per channel on average;
    # a shift of one sample's map must change its own attention (not the case on normalised maps
    # only if the shift were removed): the pre-normalisation mean moves with it.
    shifted = features.copy()
    shifted[0] += 5.0
    moved = _numpy(aim.feature_attention(shifted))
    assert not np.allclose(moved[0], attention[0]) and np.allclose(moved[1:], attention[1:])


@pytest.mark.parametrize("cls", ALL)
def test_config_and_keras_file_round_trip(tmp_path, rng, cls):
    features, f_id = _inputs(rng)
    inputs = [keras.Input(features.shape[1:]), keras.Input(f_id.shape[1:])]
    model = keras.Model(inputs, cls(hidden_units=4, name="mod")(inputs))
    model([features, f_id], training=True)  # move the moving statistics once
    expected = _numpy(model([features, f_id]))
    layer = model.get_layer("mod")
    assert cls.from_config(layer.get_config()).get_config() == layer.get_config()
    model.save(tmp_path / "mod.keras")
    restored = keras.saving.load_model(tmp_path / "mod.keras")
    np.testing.assert_allclose(_numpy(restored([features, f_id])), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_units": 0}, "`hidden_units` must be an int >= 1 or None. Received: hidden_units=0"),
    ({"momentum": 1.0}, "`momentum` must be in \\[0, 1\\)"),
    ({"epsilon": 0}, "`epsilon` must be > 0"),
    ({"attention_units": -2}, "`attention_units` must be an int >= 1"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveIdentityModulation(**kwargs)


def test_inputs_must_be_a_map_and_a_vector(rng):
    features, _ = _inputs(rng)
    with pytest.raises(ValueError, match="takes \\[feature map B, condition c\\]"):
        IdentityModulation()([features, features])
