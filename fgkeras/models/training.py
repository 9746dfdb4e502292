"""Pieces shared by every custom `train_step` in fgkeras."""

import keras
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


@keras.saving.register_keras_serializable(package="fgkeras")
class ShiftedSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule(step + offset)`: a later segment of a learning-rate schedule.

    A training phase that continues a budget started by an earlier phase (HTG's game after
    its basic model) gets a fresh optimizer, whose step counter starts at 0; shifting the
    schedule lets it pick up the budget's schedule where the earlier phase left it.

    Args:
        schedule: a `LearningRateSchedule`.
        offset: the number of steps already taken, >= 0.
    """

    def __init__(self, schedule, offset):
        if offset < 0:
            raise ValueError(f"`offset` must be >= 0. Received: offset={offset}")
        self.schedule = schedule
        self.offset = int(offset)

    def __call__(self, step):
        return self.schedule(ops.cast(step, "int64") + self.offset)

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "offset": self.offset}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["schedule"]), config["offset"])
