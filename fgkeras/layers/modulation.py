"""Identity modulation of ViewGAN's decoder (Xiong et al., ICCV 2019, Sec. 3.1.2, eqs. 2–5).

Every layer here batch-normalises a feature map B without its own affine parameters
(B̂, eq. 2) and re-scales it with γ and β computed per sample from a condition vector:

- `ConditionalBatchNormalization`: γ(c), β(c) of any condition vector c (de Vries et al.).
- `IdentityModulation` (IM, eq. 3): the same with c = f_id, the identity feature.
- `AdaptiveIdentityModulation` (AIM, eqs. 4–5): γ(f_id ⊙ att_B), β(f_id ⊙ att_B) with
  att_B = τ(B_f), B_f the spatial mean of B **before** normalisation and τ an MLP ending in a
  sigmoid.

γ = 1 + MLP_γ(·) and β = MLP_β(·), so that a layer whose MLPs output 0 is plain batch
normalisation (the paper does not say how γ is centred). The batch normalisation is
synchronised across replicas (`synchronized=True`), so that a `tf.distribute` step sees the
statistics of the global batch, as one device does.
"""

import keras
from keras import ops


def _check_units(name, value, allow_none=True):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1{' or None' if allow_none else ''}. "
                         f"Received: {name}={value!r}")


def _mlp(hidden_units, units, name, activation=None):
    """Dense(hidden, ReLU) → Dense(units, activation), or one Dense without `hidden_units`."""
    layers = []
    if hidden_units:
        layers.append(keras.layers.Dense(hidden_units, activation="relu", name=f"{name}_hidden"))
    layers.append(keras.layers.Dense(units, activation=activation, name=f"{name}_out"))
    return keras.Sequential(layers, name=name)


@keras.saving.register_keras_serializable(package="fgkeras")
class ConditionalBatchNormalization(keras.layers.Layer):
    """Batch normalisation re-scaled by γ(c) and β(c) of a per-sample condition vector c.

    B̃ = γ(c) B̂ + β(c), with B̂ the batch-normalised map (no affine parameters of its own),
    γ(c) = 1 + MLP_γ(c) and β(c) = MLP_β(c), one value per channel and sample.

    Args:
        hidden_units: width of the hidden layer of the γ and β MLPs; None: a single Dense each.
        momentum, epsilon: of the batch normalisation (ε of eq. 2).
    Input: [B, c], (batch, H, W, C) and (batch, D). Output: (batch, H, W, C).
    """

    def __init__(self, hidden_units=None, momentum=0.99, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        _check_units("hidden_units", hidden_units)
        if not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1). Received: momentum={momentum}")
        if epsilon <= 0:
            raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon}")
        self.hidden_units = hidden_units
        self.momentum = momentum
        self.epsilon = epsilon

    def _shapes(self, input_shape):
        if (not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2
                or len(input_shape[0]) != 4 or len(input_shape[1]) != 2):
            raise ValueError(
                f"{type(self).__name__} takes [feature map B, condition c], (batch, H, W, C) and "
                f"(batch, D) tensors. Received input shapes: {input_shape}")
        return tuple(input_shape[0]), tuple(input_shape[1])

    def build(self, input_shape):
        map_shape, condition_shape = self._shapes(input_shape)
        channels = int(map_shape[-1])
        self.normalize = keras.layers.BatchNormalization(
            center=False, scale=False, momentum=self.momentum, epsilon=self.epsilon, synchronized=True,
            name="normalize")
        self.normalize.build(map_shape)
        self.gamma_mlp = _mlp(self.hidden_units, channels, "gamma")
        self.beta_mlp = _mlp(self.hidden_units, channels, "beta")
        modulating = self._modulating_shape(map_shape, condition_shape)
        self.gamma_mlp.build(modulating)
        self.beta_mlp.build(modulating)

    def _modulating_shape(self, map_shape, condition_shape):
        return condition_shape

    def modulating(self, features, condition):
        """The vector that γ and β are computed from: the condition itself here."""
        return condition

    def scales(self, features, condition):
        """(γ, β), each (batch, C), for a feature map B and its condition."""
        vector = self.modulating(features, condition)
        return 1.0 + self.gamma_mlp(vector), self.beta_mlp(vector)

    def call(self, inputs, training=False):
        features, condition = inputs
        gamma, beta = self.scales(features, condition)
        normalized = self.normalize(features, training=training)
        return normalized * ops.cast(gamma[:, None, None, :], normalized.dtype) + ops.cast(
            beta[:, None, None, :], normalized.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "hidden_units": self.hidden_units, "momentum": self.momentum,
                "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="fgkeras")
class IdentityModulation(ConditionalBatchNormalization):
    """Identity modulation, IM (ViewGAN eq. 3): B̃ = γ(f_id) B̂ + β(f_id).

    `ConditionalBatchNormalization` conditioned on the identity feature f_id.

    Args:
        hidden_units, momentum, epsilon: see `ConditionalBatchNormalization`.
    Input: [B, f_id], (batch, H, W, C) and (batch, D). Output: (batch, H, W, C).
    """


@keras.saving.register_keras_serializable(package="fgkeras")
class AdaptiveIdentityModulation(ConditionalBatchNormalization):
    """Adaptive identity modulation, AIM (ViewGAN eqs. 4–5).

    B̃ = γ(f_id^att) B̂ + β(f_id^att), f_id^att = f_id ⊙ att_B (eq. 5), att_B = τ(B_f), where B_f
    is the spatial mean of B before normalisation and τ = Dense(ReLU) → Dense(D, sigmoid).

    Args:
        attention_units: width of τ's hidden layer; the channels of B by default.
        hidden_units, momentum, epsilon: see `ConditionalBatchNormalization`.
    Input: [B, f_id], (batch, H, W, C) and (batch, D). Output: (batch, H, W, C).
    """

    def __init__(self, attention_units=None, hidden_units=None, momentum=0.99, epsilon=1e-3, **kwargs):
        super().__init__(hidden_units=hidden_units, momentum=momentum, epsilon=epsilon, **kwargs)
        _check_units("attention_units", attention_units)
        self.attention_units = attention_units

    def build(self, input_shape):
        map_shape, condition_shape = self._shapes(input_shape)
        self.attention = keras.Sequential([
            keras.layers.Dense(self.attention_units or int(map_shape[-1]), activation="relu", name="tau_hidden"),
            keras.layers.Dense(int(condition_shape[-1]), activation="sigmoid", name="tau_out"),
        ], name="attention")
        self.attention.build((map_shape[0], map_shape[-1]))
        super().build(input_shape)

    def feature_attention(self, features):
        """att_B = τ(B_f), (batch, D): B_f is the spatial mean of the un-normalised map."""
        return self.attention(ops.mean(features, axis=(1, 2)))

    def modulating(self, features, condition):
        """f_id^att = f_id ⊙ att_B (eq. 5)."""
        return condition * ops.cast(self.feature_attention(features), condition.dtype)

    def get_config(self):
        return {**super().get_config(), "attention_units": self.attention_units}


__all__ = ["AdaptiveIdentityModulation", "ConditionalBatchNormalization", "IdentityModulation"]
