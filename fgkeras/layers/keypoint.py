"""Keypoint maps (HTG, Sec. 4.3): channel-wise spatial softmax and the keypoint block.

A keypoint block is a residual convolution block, like one stage of a ResNet, beside the
backbone. Each channel of its output is read as one type of keypoint, and a softmax over
the spatial positions turns it into that keypoint's density over the image (eq. 11):

    M_cij = exp(P_cij / T) / sum_wh exp(P_cwh / T)

The local feature of a block is then f_c = sum_ij X_cij M_cij: the backbone feature map X
pooled with the keypoint maps (see `fgkeras.models.htg.KeypointEmbedder`).
"""

import keras
from keras import ops


def _check_positive(name, value):
    if value <= 0:
        raise ValueError(f"`{name}` must be > 0. Received: {name}={value}")


@keras.saving.register_keras_serializable(package="fgkeras")
class KeypointMap(keras.layers.Layer):
    """Channel-wise spatial softmax: one attention map per channel (HTG, Sec. 4.3, eq. 11).

    The softmax runs in float32 whatever the dtype policy; the maps are cast back to the
    compute dtype.

    Args:
        temperature: softmax temperature T, > 0. Lower values give peakier maps.
    Input: (batch, H, W, C) feature map. Output: (batch, H, W, C) maps summing to 1 over H×W.
    """

    def __init__(self, temperature=1.0, **kwargs):
        super().__init__(**kwargs)
        _check_positive("temperature", temperature)
        self.temperature = temperature

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                "KeypointMap expects a (batch, H, W, C) feature map. "
                f"Received: input_shape={input_shape}"
            )

    def call(self, inputs):
        shape = ops.shape(inputs)
        logits = ops.cast(inputs, "float32") / self.temperature
        flat = ops.reshape(logits, (shape[0], -1, shape[3]))
        maps = ops.reshape(ops.softmax(flat, axis=1), shape)
        return ops.cast(maps, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="fgkeras")
class KeypointBlock(keras.layers.Layer):
    """A residual convolution block whose output channels become keypoint maps (HTG, Sec. 4.3).

    The block has the layout of a ResNet basic block, conv3×3(stride)–BN–ReLU–conv3×3–BN plus
    a shortcut (conv1×1(stride)–BN when the shape changes), and then a `KeypointMap`. The
    block's last ReLU is left out: the softmax needs logits that can be negative, and a
    ReLU would map every inactive position to the same value.

    It runs beside the backbone stage of the same level: it reads that stage's input
    X^(l-1) and gives maps with the shape of the stage's output X^l.

    Args:
        filters: number of keypoint maps C (the channels of X^l), > 0.
        strides: spatial stride of the block (the stage's downsampling), > 0.
        temperature: softmax temperature of the maps, > 0.
    Input: (batch, H, W, C_in). Output: (batch, ceil(H / strides), ceil(W / strides), filters),
    maps summing to 1 over space per channel.
    """

    def __init__(self, filters, strides=2, temperature=1.0, **kwargs):
        super().__init__(**kwargs)
        _check_positive("filters", filters)
        _check_positive("strides", strides)
        _check_positive("temperature", temperature)
        self.filters = filters
        self.strides = strides
        self.temperature = temperature
        self.conv1 = keras.layers.Conv2D(filters, 3, strides=strides, padding="same",
                                         use_bias=False, name="conv1")
        self.bn1 = keras.layers.BatchNormalization(name="bn1")
        self.conv2 = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name="conv2")
        self.bn2 = keras.layers.BatchNormalization(name="bn2")
        self.shortcut_conv = None
        self.shortcut_bn = None
        self.keypoint_map = KeypointMap(temperature, name="keypoint_map")

    def build(self, input_shape):
        output_shape = self.compute_output_shape(input_shape)
        self.conv1.build(input_shape)
        self.bn1.build(output_shape)
        self.conv2.build(output_shape)
        self.bn2.build(output_shape)
        if self.strides != 1 or input_shape[-1] != self.filters:
            self.shortcut_conv = keras.layers.Conv2D(self.filters, 1, strides=self.strides,
                                                     use_bias=False, name="shortcut_conv")
            self.shortcut_bn = keras.layers.BatchNormalization(name="shortcut_bn")
            self.shortcut_conv.build(input_shape)
            self.shortcut_bn.build(output_shape)
        self.keypoint_map.build(output_shape)

    def logits(self, inputs, training=False):
        """The block's output P^l before the spatial softmax."""
        x = ops.relu(self.bn1(self.conv1(inputs), training=training))
        x = self.bn2(self.conv2(x), training=training)
        shortcut = inputs
        if self.shortcut_conv is not None:
            shortcut = self.shortcut_bn(self.shortcut_conv(inputs), training=training)
        return x + shortcut

    def call(self, inputs, training=False):
        return self.keypoint_map(self.logits(inputs, training=training))

    def compute_output_shape(self, input_shape):
        def reduced(size):
            return None if size is None else -(-size // self.strides)

        return (input_shape[0], reduced(input_shape[1]), reduced(input_shape[2]), self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "strides": self.strides,
            "temperature": self.temperature,
        }
