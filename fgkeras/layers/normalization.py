"""L2 normalisation of embeddings."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="fgkeras")
class L2Normalize(keras.layers.Layer):
    """Scales vectors to unit L2 norm: `x / max(||x||, epsilon)`.

    Computed as `x * rsqrt(max(sum(x**2), epsilon**2))` with plain ops (square, sum,
    maximum, rsqrt, multiply) rather than `tf.math.l2_normalize`. The TFLite converter fuses
    the single last-axis case into its builtin L2_NORMALIZATION (float parity ~1e-7) and keeps
    other axes as plain builtins; the batch axis is refused, which is the one case that
    converter mis-fuses (a whole-tensor norm turned into a last-axis one). The arithmetic runs
    in float32 whatever the dtype policy (float16 sums of squares overflow above ~256 per
    component) and the result is cast back to the compute dtype. A zero vector maps to a
    zero vector, with finite gradients.

    Args:
        axis: int or list of ints, the axis (axes) along which to normalise; not 0.
        epsilon: lower bound on the norm, > 0.
    Input: any shape. Output: same shape, unit norm along `axis`.
    """

    def __init__(self, axis=-1, epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        if epsilon <= 0:
            raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon}")
        if isinstance(axis, (list, tuple)):
            axis = [int(a) for a in axis]
        elif not isinstance(axis, int):
            raise ValueError(f"`axis` must be an int or a list of ints. Received: axis={axis}")
        self.axis = axis
        self.epsilon = epsilon
        self.supports_masking = True

    def build(self, input_shape):
        axes = self.axis if isinstance(self.axis, list) else [self.axis]
        rank = len(input_shape)
        if any(not -rank <= a < rank for a in axes) or any(a % rank == 0 for a in axes):
            raise ValueError(
                f"`axis` must name non-batch axes of the rank-{rank} input. "
                f"Received: axis={self.axis}"
            )

    def call(self, inputs):
        axis = tuple(self.axis) if isinstance(self.axis, list) else self.axis
        x = ops.cast(inputs, "float32")
        squared_norm = ops.sum(ops.square(x), axis=axis, keepdims=True)
        inv_norm = ops.rsqrt(ops.maximum(squared_norm, self.epsilon**2))
        return ops.cast(x * inv_norm, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "epsilon": self.epsilon}
