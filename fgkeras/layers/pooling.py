"""Global poolings that aggregate a convolutional feature map into one descriptor.

The retrieval baselines of the FGGAN comparison (MAC, sum pooling / SPoC, CroW, SCDA) and
GeM. Every layer maps (batch, H, W, C) to (batch, C) (SCDA: (batch, 2 * C)), computes in
float32 whatever the dtype policy, and casts the result back to the compute dtype.
Descriptors are not normalised: follow them with `L2Normalize` for retrieval.
"""

import keras
from keras import ops

_FLOAT32_LOWEST = -3.4028234663852886e38
_TINY = 1e-12


class _GlobalPooling2D(keras.layers.Layer):
    """Shared plumbing: data format, float32 computation, output shape, config.

    Subclasses implement `_pool(x)` on a float32 (batch, H, W, C) tensor.
    """

    output_multiplier = 1

    def __init__(self, data_format=None, **kwargs):
        super().__init__(**kwargs)
        data_format = data_format or keras.config.image_data_format()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(
                "`data_format` must be 'channels_last' or 'channels_first'. "
                f"Received: data_format={data_format}"
            )
        self.data_format = data_format
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        if self.data_format == "channels_first":
            x = ops.transpose(x, (0, 2, 3, 1))
        return ops.cast(self._pool(x), self.compute_dtype)

    def _pool(self, x):
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        channels = input_shape[1] if self.data_format == "channels_first" else input_shape[-1]
        if channels is not None:
            channels *= self.output_multiplier
        return (input_shape[0], channels)

    def get_config(self):
        return {**super().get_config(), "data_format": self.data_format}


def _check_positive(name, value):
    if value <= 0:
        raise ValueError(f"`{name}` must be > 0. Received: {name}={value}")


@keras.saving.register_keras_serializable(package="fgkeras")
class MACPooling2D(_GlobalPooling2D):
    """Maximum activation of convolutions (MAC): the spatial maximum of each channel.

    Args:
        data_format: "channels_last" (default from `keras.config.image_data_format()`)
            or "channels_first".
    Input: (batch, H, W, C). Output: (batch, C).
    """

    def _pool(self, x):
        return ops.max(x, axis=(1, 2))


@keras.saving.register_keras_serializable(package="fgkeras")
class SPoCPooling2D(_GlobalPooling2D):
    """Sum-pooled convolutional features (SPoC, Babenko & Lempitsky 2015), as a spatial mean.

    SPoC is sum pooling; this layer divides the sum by H * W so the descriptor's scale does
    not depend on the input size. After L2 normalisation the two are identical. The
    optional centring prior of the SPoC paper is not applied.

    Args:
        data_format: "channels_last" (default) or "channels_first".
    Input: (batch, H, W, C). Output: (batch, C).
    """

    def _pool(self, x):
        return ops.mean(x, axis=(1, 2))


@keras.saving.register_keras_serializable(package="fgkeras")
class GeMPooling2D(_GlobalPooling2D):
    """Generalised-mean pooling: `(mean_hw max(x, epsilon) ** p) ** (1 / p)` per channel.

    p = 1 is average pooling, p -> inf tends to MAC. Activations are clipped at `epsilon`
    (GeM expects non-negative, post-ReLU inputs). The exponent is a scalar weight created in
    `build`, trainable when `trainable_p` is True; it is kept in float32 (no autocast).

    Args:
        p: initial exponent, > 0.
        trainable_p: whether p is learned.
        epsilon: lower clip of the activations, > 0.
        data_format: "channels_last" (default) or "channels_first".
    Input: (batch, H, W, C). Output: (batch, C).
    """

    def __init__(self, p=3.0, trainable_p=True, epsilon=1e-6, data_format=None, **kwargs):
        super().__init__(data_format=data_format, **kwargs)
        _check_positive("p", p)
        _check_positive("epsilon", epsilon)
        self.initial_p = float(p)
        self.trainable_p = bool(trainable_p)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.p = self.add_weight(
            name="p",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_p),
            trainable=self.trainable_p,
            dtype="float32",
            autocast=False,
        )

    def _pool(self, x):
        p = ops.cast(self.p, "float32")
        x = ops.power(ops.maximum(x, self.epsilon), p)
        return ops.power(ops.mean(x, axis=(1, 2)), 1.0 / p)

    def get_config(self):
        return {
            **super().get_config(),
            "p": self.initial_p,
            "trainable_p": self.trainable_p,
            "epsilon": self.epsilon,
        }


@keras.saving.register_keras_serializable(package="fgkeras")
class CroWPooling2D(_GlobalPooling2D):
    """Cross-dimensional weighted sum pooling (CroW, Kalantidis et al. 2016).

    With X the (H, W, C) map, clipped at 0 (CroW expects post-ReLU activations):

    - spatial weights: S'_ij = sum_k X_ijk, S_ij = (S'_ij / ||S'||_a) ** (1 / b)
      (`a` = a, `b` = b; a = b = 2 in the paper);
    - channel weights from the sparsity of each channel: Q_k = fraction of locations where
      X_ijk > 0, C_k = log((K * epsilon + sum_h Q_h) / (epsilon + Q_k));
    - descriptor f_k = C_k * sum_ij S_ij X_ijk (a sum over locations, as in the paper).

    The paper's post-processing (L2 normalisation, PCA whitening, L2 normalisation) is not
    part of the layer. An all-zero map gives a zero descriptor; values and gradients stay
    finite (gradients flow through the spatial weights, not through the channel counts).

    Args:
        a: power of the norm that normalises the spatial map, > 0.
        b: root applied to the normalised spatial map, > 0.
        epsilon: the paper's epsilon in the channel weights, > 0.
        data_format: "channels_last" (default) or "channels_first".
    Input: (batch, H, W, C). Output: (batch, C).
    """

    def __init__(self, a=2.0, b=2.0, epsilon=1e-6, data_format=None, **kwargs):
        super().__init__(data_format=data_format, **kwargs)
        _check_positive("a", a)
        _check_positive("b", b)
        _check_positive("epsilon", epsilon)
        self.a = a
        self.b = b
        self.epsilon = epsilon

    def _pool(self, x):
        x = ops.maximum(x, 0.0)
        channels = ops.cast(ops.shape(x)[-1], "float32")

        # S' / ||S'||_a is scale invariant: dividing by the peak of S' first keeps the norm
        # >= 1 and every power away from 0, so values and gradients stay finite.
        summed = ops.sum(x, axis=-1, keepdims=True)
        peak = ops.max(summed, axis=(1, 2), keepdims=True)
        relative = ops.where(peak > 0, summed / ops.maximum(peak, _TINY), 1.0)
        relative = ops.maximum(relative, _TINY)
        norm = ops.power(
            ops.sum(ops.power(relative, self.a), axis=(1, 2), keepdims=True), 1.0 / self.a
        )
        spatial = ops.power(relative / norm, 1.0 / self.b)

        nonzero = ops.mean(ops.cast(x > 0, "float32"), axis=(1, 2))
        total = ops.sum(nonzero, axis=-1, keepdims=True)
        channel = ops.log((channels * self.epsilon + total) / (self.epsilon + nonzero))

        return channel * ops.sum(spatial * x, axis=(1, 2))

    def get_config(self):
        return {**super().get_config(), "a": self.a, "b": self.b, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="fgkeras")
class SCDAPooling2D(_GlobalPooling2D):
    """Selective convolutional descriptor aggregation (SCDA, Wei et al. 2017).

    The aggregation map A_ij = sum_k X_ijk selects the locations where A exceeds its
    spatial mean; the selected descriptors are average- and max-pooled and the two are
    concatenated ("avg&maxPool"). Simplification: the plain mask is used, the paper's
    "keep the largest connected component" step is omitted. When no location exceeds
    the mean (a constant map) every location is selected.

    Args:
        data_format: "channels_last" (default) or "channels_first".
    Input: (batch, H, W, C). Output: (batch, 2 * C) = [masked mean (C), masked max (C)].
    """

    output_multiplier = 2

    def _pool(self, x):
        summed = ops.sum(x, axis=-1, keepdims=True)
        mask = summed > ops.mean(summed, axis=(1, 2), keepdims=True)
        empty = ops.logical_not(ops.any(mask, axis=(1, 2), keepdims=True))
        mask = ops.logical_or(mask, empty)

        weights = ops.cast(mask, "float32")
        avg = ops.sum(x * weights, axis=(1, 2)) / ops.sum(weights, axis=(1, 2))
        max_ = ops.max(ops.where(mask, x, _FLOAT32_LOWEST), axis=(1, 2))
        return ops.concatenate([avg, max_], axis=-1)
