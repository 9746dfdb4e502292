"""Bias-free classifier head (HTG "no-bias softmax")."""

import keras
from keras import ops

_BIAS_ARGUMENTS = ("bias_initializer", "bias_regularizer", "bias_constraint")


@keras.saving.register_keras_serializable(package="fgkeras")
class NoBiasDense(keras.layers.Dense):
    """A `Dense` layer without bias: `outputs = activation(inputs @ W)` (HTG, Sec. 4.1, eq. 10).

    With no bias every decision boundary of the softmax passes through the origin, so each
    class owns a cone and keeps a separate projection on the unit hypersphere, which is
    what the L2-normalised triplet branch sees. `NoBiasDense(K)` followed by sparse
    softmax cross-entropy on its logits is the paper's no-bias softmax loss.

    Args:
        units: number of outputs (classes K), a positive int.
        activation: activation applied to the outputs; None (logits) by default.
        kernel_initializer, kernel_regularizer, kernel_constraint: as in `keras.layers.Dense`.
        normalize_kernel: if True, every column of W is L2-normalised before the product
            (cosine classifier: with L2-normalised inputs the outputs are cosines in [-1, 1]).
            Not available together with quantization.
        **kwargs: other `keras.layers.Dense` / `Layer` arguments (`name`, `dtype`, `lora_rank`,
            ...). `use_bias=False` is accepted and ignored; `use_bias=True` and `bias_*`
            arguments raise a `ValueError`.
    Input: (..., features). Output: (..., units).
    """

    def __init__(
        self,
        units,
        activation=None,
        kernel_initializer="glorot_uniform",
        kernel_regularizer=None,
        kernel_constraint=None,
        normalize_kernel=False,
        **kwargs,
    ):
        use_bias = kwargs.pop("use_bias", False)
        if use_bias:
            raise ValueError(
                "NoBiasDense never has a bias; use keras.layers.Dense for a biased layer. "
                f"Received: use_bias={use_bias}"
            )
        for name in _BIAS_ARGUMENTS:
            if name in kwargs:
                raise ValueError(
                    f"NoBiasDense has no bias, so `{name}` is not accepted. "
                    f"Received: {name}={kwargs[name]}"
                )
        super().__init__(
            units,
            activation=activation,
            use_bias=False,
            kernel_initializer=kernel_initializer,
            kernel_regularizer=kernel_regularizer,
            kernel_constraint=kernel_constraint,
            **kwargs,
        )
        self.normalize_kernel = bool(normalize_kernel)

    def call(self, inputs, training=None):
        if not self.normalize_kernel:
            return super().call(inputs, training=training)
        kernel = ops.cast(self.kernel, "float32")
        kernel = kernel * ops.rsqrt(
            ops.maximum(ops.sum(ops.square(kernel), axis=0, keepdims=True), 1e-24)
        )
        outputs = ops.matmul(inputs, ops.cast(kernel, self.compute_dtype))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def quantize(self, mode=None, **kwargs):
        if self.normalize_kernel:
            raise NotImplementedError(
                "NoBiasDense(normalize_kernel=True) cannot be quantized. "
                f"Received: mode={mode}"
            )
        return super().quantize(mode, **kwargs)

    def get_config(self):
        config = super().get_config()
        for name in ("use_bias", *_BIAS_ARGUMENTS):
            config.pop(name, None)
        return {**config, "normalize_kernel": self.normalize_kernel}
