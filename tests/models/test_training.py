import keras
import numpy as np
import pytest

from fgkeras.models import ShiftedSchedule


def _cosine():
    return keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=10)


def test_shifted_schedule_continues_the_schedule_from_the_offset():
    shifted = ShiftedSchedule(_cosine(), offset=4)
    np.testing.assert_allclose([float(shifted(s)) for s in range(6)],
                               [float(_cosine()(s + 4)) for s in range(6)], rtol=1e-6)
    assert float(shifted(0)) < 1e-3


def test_shifted_schedule_round_trips_inside_an_optimizer():
    optimizer = keras.optimizers.Adam(ShiftedSchedule(_cosine(), offset=3))
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    schedule = restored._learning_rate  # the schedule (`learning_rate` is its current value)
    assert isinstance(schedule, ShiftedSchedule) and schedule.offset == 3
    np.testing.assert_allclose(float(schedule(2)), float(_cosine()(5)), rtol=1e-6)


def test_shifted_schedule_refuses_a_negative_offset():
    with pytest.raises(ValueError, match="`offset` must be >= 0"):
        ShiftedSchedule(_cosine(), offset=-1)
