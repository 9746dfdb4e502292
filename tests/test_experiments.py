import numpy as np
import pytest

from fgkeras import configs, experiments
from fgkeras.models import HardTripletGAN, KeypointEmbedder, MetricLearner


def _smoke(*assignments):
    return configs.override(configs.smoke(configs.get_config("baseline")),
                            ["train.steps_per_epoch=2", *assignments])


def test_load_data_gives_disjoint_classes_and_contiguous_train_labels():
    train, test = experiments.load_data(_smoke().data)
    assert set(np.unique(train.labels)) == set(range(train.num_classes))
    test_names = {test.class_names[c] for c in np.unique(test.labels)}
    assert len(test_names) > 1 and not set(train.class_names) & test_names


def test_train_dispatches_on_the_method():
    config = _smoke("train.method=softmax_nobias")
    model, history = experiments.train(config, verbose=0)
    assert isinstance(model, MetricLearner) and model.softmax == "no_bias"
    assert len(history.history["loss"]) == config.train.epochs


def test_htg_with_kpm_trains_and_evaluates():
    config = _smoke("train.method=htg", "model.kpm=true")
    train, test = experiments.load_data(config.data)
    game, history = experiments.train(config, train_set=train, verbose=0)
    assert isinstance(game, HardTripletGAN) and isinstance(game.embedder, KeypointEmbedder)
    assert {"f_loss", "g_loss", "d_loss"} <= set(history.history)
    metrics = experiments.evaluate(game.embedder, test, config)
    assert 0.0 <= metrics["recall@1"] <= 1.0


def test_compare_reports_one_row_per_method():
    config = _smoke()
    rows = experiments.compare(config, ["triplet_random", "triplet_batch_hard"], verbose=0)
    assert [row["method"] for row in rows] == ["triplet_random", "triplet_batch_hard"]
    assert all(isinstance(row["train_seconds"], int) for row in rows)


def test_htg_budget_must_leave_epochs_for_the_game():
    config = _smoke("train.method=htg", "train.epochs=2", "train.warmup_epochs=2")
    with pytest.raises(ValueError, match="HTG needs `train.epochs` > `train.warmup_epochs`"):
        experiments.train(config, verbose=0)


def test_htg_follows_the_baselines_cosine_over_the_whole_budget():
    config = _smoke("train.method=htg", "train.epochs=3", "train.warmup_epochs=1")
    game, _ = experiments.train(config, verbose=0)
    warmup_steps = config.train.warmup_epochs * config.train.steps_per_epoch
    cosine = experiments.cosine_schedule(config.train)
    schedule = game.f_optimizer._learning_rate
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 1)],
                               [float(cosine(warmup_steps + s)) for s in (0, 1)], rtol=1e-6)
    assert float(game.f_optimizer.learning_rate) < 0.5 * config.train.learning_rate  # decayed by the end


def test_htg_restart_schedule_gives_the_game_its_own_cosine_from_the_full_rate():
    config = _smoke("train.method=htg", "train.epochs=3", "train.warmup_epochs=1", "train.restart_schedule=true")
    game, _ = experiments.train(config, verbose=0)
    schedule = game.f_optimizer._learning_rate
    assert float(schedule(0)) == pytest.approx(config.train.learning_rate)
    assert float(schedule(2 * config.train.steps_per_epoch)) == pytest.approx(0.0, abs=1e-9)


def test_restart_schedule_gives_the_baselines_the_same_warm_restart_as_htg():
    config = _smoke("train.method=triplet_batch_hard", "train.epochs=3", "train.warmup_epochs=1",
                    "train.steps_per_epoch=10", "train.restart_schedule=true")
    model, _ = experiments.train(config, verbose=0)
    schedule, rate = model.optimizer._learning_rate, config.train.learning_rate
    first = config.train.steps_per_epoch  # warm-up: 1 epoch, then the rest: 2 epochs
    assert float(schedule(0)) == pytest.approx(rate)
    assert float(schedule(first - 1)) < 0.1 * rate
    assert float(schedule(first)) == pytest.approx(rate)  # restarted from the full rate
    assert float(schedule(first + 1)) > 0.9 * rate        # and decays over the longer rest
    assert float(schedule(3 * first - 1)) < 0.1 * rate
    with pytest.raises(ValueError, match="0 < warmup_epochs < epochs"):
        experiments.make_optimizer(_smoke("train.epochs=3", "train.warmup_epochs=3", "train.restart_schedule=true").train)
