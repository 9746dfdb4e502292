"""Softmax cross-entropy for the (no-bias) classifier head.

The "no-bias" of HTG's no-bias softmax loss (eq. 10) is the layer,
`fgkeras.layers.NoBiasDense`; the loss is ordinary sparse softmax cross-entropy on its
logits. With `label_smoothing=0` `SoftmaxLoss` equals
`keras.losses.SparseCategoricalCrossentropy(from_logits=True)`; it exists because that
class has no label smoothing for integer labels.
"""

import numbers

import keras
from keras import ops


def _check_label_smoothing(label_smoothing):
    if isinstance(label_smoothing, numbers.Real) and not 0 <= label_smoothing < 1:
        raise ValueError(
            f"`label_smoothing` must be in [0, 1). Received: label_smoothing={label_smoothing}"
        )


def _softmax_cross_entropy_vector(labels, logits, label_smoothing):
    log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    labels = ops.cast(ops.reshape(labels, (-1, 1)), "int32")
    nll = -ops.squeeze(ops.take_along_axis(log_probs, labels, axis=-1), -1)
    if not label_smoothing:
        return nll
    uniform = -ops.mean(log_probs, axis=-1)
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def softmax_cross_entropy(labels, logits, label_smoothing=0.0):
    """Mean sparse softmax cross-entropy from logits, with optional label smoothing.

    The target is (1 - label_smoothing) * one_hot(labels) + label_smoothing / K.

    Args:
        labels: (batch,) or (batch, 1) integer class ids in [0, K).
        logits: (batch, K) unnormalised scores (e.g. `NoBiasDense(K)` outputs).
        label_smoothing: in [0, 1).
    Returns: scalar float32 loss.
    """
    _check_label_smoothing(label_smoothing)
    return ops.mean(_softmax_cross_entropy_vector(labels, logits, label_smoothing))


@keras.saving.register_keras_serializable(package="fgkeras")
class SoftmaxLoss(keras.losses.Loss):
    """`softmax_cross_entropy` as a Keras loss (per-sample values, Keras reduction).

    Args:
        label_smoothing: in [0, 1).
    y_true: (batch,) or (batch, 1) class ids. y_pred: (batch, K) logits. Output: scalar.
    """

    def __init__(self, label_smoothing=0.0, name="softmax_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        _check_label_smoothing(label_smoothing)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        return _softmax_cross_entropy_vector(y_true, y_pred, self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
