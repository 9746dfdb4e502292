"""Pieces shared by every custom `train_step` in fgkeras."""

import tensorflow as tf
from keras import ops


def replica_scaled(loss):
    """Scales a per-replica mean loss so that summed replica gradients average.

    Keras sums the gradients of all replicas under `tf.distribute`; dividing each
    replica's mean loss by the number of replicas makes a distributed step take the
    same update as one device on the global batch.
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss if replicas == 1 else loss / ops.cast(replicas, loss.dtype)


def unpack_batch(data):
    """Returns `(images, labels)` from a batch given as a dict or as `(x, y)`.

    Dicts are the elements of `fgkeras.data` datasets (`image`, `label`, …).
    """
    if isinstance(data, dict):
        return data["image"], data["label"]
    if isinstance(data, (tuple, list)) and len(data) >= 2:
        return data[0], data[1]
    raise ValueError(
        "A training batch must be a dict with keys 'image' and 'label' or a tuple "
        f"(images, labels). Received: {type(data).__name__}"
    )
