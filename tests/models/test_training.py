import keras
import numpy as np
import pytest

from fgkeras.models import (
    MultiRateAdam,
    NonFiniteLossError,
    ShiftedSchedule,
    StopOnNonFiniteLoss,
    make_optimizer,
    rate_multipliers_for,
)


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


@pytest.mark.parametrize("name, cls", [("adam", keras.optimizers.Adam), ("adamw", keras.optimizers.AdamW),
                                       ("sgd", keras.optimizers.SGD)])
def test_make_optimizer_builds_each_name(name, cls):
    optimizer = make_optimizer(name, 1e-3)
    assert type(optimizer) is cls and float(optimizer.learning_rate) == pytest.approx(1e-3)


def test_make_optimizer_passes_every_setting():
    adam = make_optimizer("adam", 2e-4, beta_1=0.5, beta_2=0.99, weight_decay=1e-4, clipnorm=1.0)
    assert (adam.beta_1, adam.beta_2, adam.weight_decay, adam.clipnorm) == (0.5, 0.99, 1e-4, 1.0)
    assert make_optimizer("sgd", 0.1).momentum == 0.9  # the same default momentum for every method
    assert make_optimizer("sgd", 0.1, momentum=0.0).momentum == 0.0
    assert make_optimizer("adamw", 1e-3).weight_decay == pytest.approx(0.004)  # Keras's AdamW default
    assert make_optimizer("adam", 1e-3).weight_decay is None
    schedule = _cosine()
    assert make_optimizer("adam", schedule)._learning_rate is schedule


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "lion"}, "`optimizer` must be one of"),
    ({"name": "sgd", "momentum": 1.0}, "`momentum` must be in"),
    ({"name": "adam", "beta_1": -0.1}, "`beta_1` must be in"),
    ({"name": "adam", "rate_multipliers": {"w": -1.0}}, "`rate_multipliers` must be >= 0"),
])
def test_make_optimizer_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(learning_rate=1e-3, **kwargs)


def _two_variables():
    slow = keras.Variable(np.ones(3, "float32"), name="slow")
    fast = keras.Variable(np.ones(3, "float32"), name="fast")
    return slow, fast


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_rate_multipliers_scale_the_step_of_the_named_variables(name):
    slow, fast = _two_variables()
    optimizer = make_optimizer(name, 0.1, momentum=0.0, weight_decay=0.0,
                               rate_multipliers=rate_multipliers_for([slow], 0.1))
    optimizer.build([slow, fast])
    gradient = np.full(3, 0.5, "float32")
    optimizer.apply([gradient, gradient], [slow, fast])
    slow_step, fast_step = 1 - np.asarray(slow), 1 - np.asarray(fast)
    assert np.all(fast_step > 0)
    np.testing.assert_allclose(slow_step, 0.1 * fast_step, rtol=1e-4)


def test_rate_multipliers_survive_serialization():
    slow, _ = _two_variables()
    optimizer = make_optimizer("adam", 1e-3, beta_1=0.5, rate_multipliers=rate_multipliers_for([slow], 0.1))
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, MultiRateAdam) and restored.beta_1 == 0.5
    assert restored.rate_multipliers == {slow.path: 0.1}


def test_rate_multipliers_refuse_shared_paths():
    first, second = keras.Variable(np.ones(2), name="w"), keras.Variable(np.ones(2), name="w")
    optimizer = make_optimizer("sgd", 0.1, rate_multipliers=rate_multipliers_for([first], 0.1))
    with pytest.raises(ValueError, match="several variables share the paths"):
        optimizer.build([first, second])


def test_rate_multipliers_hold_under_mirrored_strategy(mirrored_strategy):
    import tensorflow as tf

    with mirrored_strategy.scope():
        slow, fast = _two_variables()
        optimizer = make_optimizer("sgd", 0.1, momentum=0.0, rate_multipliers=rate_multipliers_for([slow], 0.1))
        optimizer.build([slow, fast])

    @tf.function
    def step():
        def apply():
            gradient = tf.fill([3], 0.5)
            optimizer.apply([gradient, gradient], [slow, fast])
        mirrored_strategy.run(apply)

    step()
    np.testing.assert_allclose(1 - np.asarray(slow), 0.1 * (1 - np.asarray(fast)), rtol=1e-4)
    assert np.all(1 - np.asarray(fast) > 0)


def test_a_model_compiled_with_rate_multipliers_round_trips_through_a_keras_file(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="body"), keras.layers.Dense(2, name="head")])
    body = model.get_layer("body").trainable_variables
    model.compile(optimizer=make_optimizer("sgd", 0.1, momentum=0.5, rate_multipliers=rate_multipliers_for(body, 0.1)),
                  loss="mse")
    model.fit(np.ones((4, 4)), np.zeros((4, 2)), epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    assert type(restored.optimizer).__name__ == "MultiRateSGD" and restored.optimizer.momentum == 0.5
    assert restored.optimizer.rate_multipliers == {v.path: 0.1 for v in body}


class _Game(keras.Model):
    """Two players whose losses are scripted: D's becomes NaN at step `bad_step` (0-based, epoch 2)."""

    def __init__(self, bad_step):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.bad_step = bad_step
        self.steps = keras.Variable(0, dtype="int32", trainable=False)

    def train_step(self, data):
        self.steps.assign_add(1)
        bad = self.steps == self.bad_step + 1
        return {"g_loss": 1.0, "d_loss": keras.ops.where(bad, float("nan"), 2.0), "accuracy": float("nan")}


def test_a_non_finite_loss_stops_fit_naming_the_player_and_the_step():
    game = _Game(bad_step=4)  # epoch 2 (of 3 steps each), its second step
    game.compile()
    data = np.zeros((3, 2), "float32")
    with pytest.raises(NonFiniteLossError, match=r"the discriminator D \(d_loss\) is nan at epoch 2, step 2"):
        game.fit(data, data, batch_size=1, epochs=3, verbose=0, callbacks=[StopOnNonFiniteLoss()])
    assert int(game.steps.numpy()) == 5  # stopped at once: no step after the bad one


def test_finite_losses_train_to_the_end_whatever_else_is_logged():
    game = _Game(bad_step=10**6)  # never; "accuracy" is NaN but no loss
    game.compile()
    data = np.zeros((3, 2), "float32")
    game.fit(data, data, batch_size=1, epochs=2, verbose=0, callbacks=[StopOnNonFiniteLoss()])
    assert int(game.steps.numpy()) == 6


def test_experiments_train_stops_a_diverging_run_with_the_players_name():
    from fgkeras import configs, experiments

    config = configs.smoke(configs.get_config("baseline"))
    config.train.learning_rate = float("inf")  # the first step makes every weight NaN
    config.train.validation_classes = 0
    with pytest.raises(NonFiniteLossError, match=r"the model \(loss\) is nan at epoch 1, step 2"):
        experiments.train(config, verbose=0)
