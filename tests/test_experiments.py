import os

import keras
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


def test_sgd_gives_htg_and_the_baselines_the_same_momentum_and_beta_1_reaches_the_optimizer():
    quick = ("train.steps_per_epoch=1", "train.validation_classes=0")
    model, _ = experiments.train(_smoke("train.optimizer=sgd", "train.epochs=1", *quick), verbose=0)
    assert model.optimizer.momentum == 0.9  # the baselines had none
    config = _smoke("train.method=htg", "train.optimizer=sgd", "train.momentum=0.5", *quick)
    game, _ = experiments.train(config, verbose=0)
    assert [o.momentum for o in (game.f_optimizer, game.g_optimizer, game.d_optimizer)] == [0.5] * 3
    optimizer = experiments.make_optimizer(_smoke("train.beta_1=0.5", "train.weight_decay=0.01").train)
    assert (optimizer.beta_1, optimizer.weight_decay) == (0.5, 0.01)
    with pytest.raises(ValueError, match="`optimizer` must be one of"):
        experiments.make_optimizer(_smoke("train.optimizer=lion").train)


def test_validation_split_holds_out_classes_by_seed_alone():
    train, _ = experiments.load_data(_smoke().data)
    fit, held_out = experiments.validation_split(train, 0.25, seed=3)
    again, held_out_again = experiments.validation_split(train, 0.25, seed=3)
    _, other = experiments.validation_split(train, 0.25, seed=4)
    names = lambda s: {s.class_names[c] for c in s.classes}  # noqa: E731
    assert names(held_out) == names(held_out_again) and names(held_out) != names(other)
    assert not names(fit) & names(held_out) and names(fit) | names(held_out) == names(train)
    assert len(held_out.classes) == round(0.25 * len(train.classes))
    assert set(fit.labels) == set(range(len(fit.classes)))  # renumbered for a classifier head
    assert experiments.validation_split(train, 0.0, seed=3) == (train, None)
    with pytest.raises(ValueError, match=r"`train.validation_classes` must be in \[0, 1\)"):
        experiments.validation_split(train, 1.0, seed=3)
    with pytest.raises(ValueError, match="fewer than 2 to train on"):
        experiments.validation_split(train.split_by_classes([0, 1, 2]), 0.2, seed=3)


def test_the_held_out_classes_never_appear_in_the_training_stream(monkeypatch):
    config = _smoke("train.epochs=1", "train.steps_per_epoch=1")
    train, _ = experiments.load_data(config.data)
    streams = []

    def recording(config, train_set, start=0):
        streams.append(experiments_training_dataset(config, train_set, start))
        return streams[-1]

    experiments_training_dataset = experiments.training_dataset
    monkeypatch.setattr(experiments, "training_dataset", recording)
    experiments.train(config, train_set=train, verbose=0)
    _, held_out = experiments.validation_split(train, config.train.validation_classes, config.train.seed)
    held_out_images = {image.tobytes() for image in held_out.images}
    all_images = {image.tobytes() for image in train.images}
    seen = [image.tobytes() for batch in streams[0].take(20) for image in batch["image"].numpy()]
    assert set(seen) <= all_images  # the comparison is on the same pixels
    assert not set(seen) & held_out_images


def test_train_logs_the_held_out_figures_and_keeps_the_best_epoch():
    config = _smoke("train.epochs=3")
    model, history = experiments.train(config, verbose=0)
    recalls = history.history["val_recall@1"]
    assert len(recalls) == 3 and {"val_recall@8", "val_map@r"} <= set(history.history)
    train, _ = experiments.load_data(config.data)
    _, held_out = experiments.validation_split(train, config.train.validation_classes, config.train.seed)
    assert experiments.evaluate(model.embedder, held_out, config)["recall@1"] == pytest.approx(max(recalls))
    _, history = experiments.train(_smoke("train.validation_classes=0", "train.epochs=1"), verbose=0)
    assert "val_recall@1" not in history.history


def test_htg_is_selected_in_both_phases_and_logs_both():
    config = _smoke("train.method=htg", "train.epochs=3", "train.warmup_epochs=1")
    game, history = experiments.train(config, verbose=0)
    assert len(history.history["val_recall@1"]) == 3  # the basic model's epoch, then the game's two
    assert len(history.history["softmax_loss"]) == 1 and len(history.history["f_loss"]) == 2
    train, _ = experiments.load_data(config.data)
    _, held_out = experiments.validation_split(train, config.train.validation_classes, config.train.seed)
    assert experiments.evaluate(game.embedder, held_out, config)["recall@1"] == pytest.approx(
        max(history.history["val_recall@1"][1:]))  # the game's best epoch


def test_a_local_preset_with_frozen_batch_norm_and_a_slower_backbone(tmp_path):
    from fgkeras.models import MultiRateAdam, build_backbone

    config = _smoke("train.epochs=1", "train.steps_per_epoch=1", "model.freeze_bn=true",
                    "train.backbone_lr_multiplier=0.1", "train.validation_classes=0")
    pretrained = build_backbone("resnet18", width=config.model.width, image_size=config.data.image_size)
    pretrained.save_to_preset(str(tmp_path / "preset"))
    config = configs.override(config, [f"model.preset={tmp_path / 'preset'}"])
    embedder = experiments.build_embedder(config)
    assert all(np.array_equal(a, b) for a, b in zip(embedder.backbone.get_weights(), pretrained.get_weights()))
    model, _ = experiments.train(config, verbose=0)
    norms = [(mine, theirs) for mine, theirs in zip(model.embedder.backbone.layers, pretrained.layers)
             if isinstance(mine, keras.layers.BatchNormalization)]
    assert norms and not any(mine.trainable for mine, _ in norms)
    for mine, theirs in norms:  # γ, β and the moving statistics kept from the preset
        assert all(np.array_equal(a, b) for a, b in zip(mine.get_weights(), theirs.get_weights()))
    assert isinstance(model.optimizer, MultiRateAdam)
    backbone_paths = {v.path for v in model.embedder.backbone.trainable_variables}
    assert set(model.optimizer.rate_multipliers) == backbone_paths
    assert set(model.optimizer.rate_multipliers.values()) == {0.1}


def _event_steps(log_dir):
    """`{(sub-folder, tag): [steps]}` of every scalar summary written under `log_dir`."""
    import glob
    import os

    import tensorflow as tf

    steps = {}
    for path in glob.glob(os.path.join(str(log_dir), "**", "events.out.tfevents.*"), recursive=True):
        folder = os.path.basename(os.path.dirname(path))
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                steps.setdefault((folder, value.tag), []).append(event.step)
    return steps


def test_tensorboard_logs_both_htg_phases_players_and_the_held_out_recall_on_one_epoch_count(tmp_path):
    config = _smoke("train.method=htg", "train.epochs=3", "train.warmup_epochs=1", "train.tensorboard=true",
                    f"train.log_dir={tmp_path}")
    experiments.train(config, verbose=0)
    steps = _event_steps(tmp_path)
    assert sorted(steps[("validation", "epoch_recall@1")]) == [0, 1, 2]  # both phases, one count
    assert steps[("train", "epoch_softmax_loss")] == [0]  # phase 1: the basic model
    for player in ("f_loss", "g_loss", "d_loss"):  # phase 2: each player of the game, after it
        assert sorted(steps[("train", f"epoch_{player}")]) == [1, 2]


def test_tensorboard_is_off_by_default_and_defaults_under_runs_tensorboard():
    config = _smoke()
    assert experiments.tensorboard_callbacks(config) == []
    config.train.tensorboard = True
    assert experiments.tensorboard_log_dir(config) == "runs/tensorboard/baseline"


def test_the_training_stream_fits_under_mirrored_strategy(mirrored_strategy):
    # Keras averages the first batch across replicas to build the model; a bool column made
    # that fail ("AddN … bool"), so the stream carries only what the trainers read.
    config = _smoke("train.method=triplet_batch_hard")
    train, _ = experiments.load_data(config.data)
    stream = experiments.training_dataset(config, train)
    assert set(stream.element_spec) == {"image", "label", "view"}
    with mirrored_strategy.scope():
        model = experiments.build_model(config, train.num_classes)
        model.compile(optimizer=experiments.make_optimizer(config.train))
        before = [np.asarray(w) for w in model.trainable_weights]
        history = model.fit(stream, epochs=1, steps_per_epoch=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.allclose(a, np.asarray(b)) for a, b in zip(before, model.trainable_weights))


@pytest.mark.parametrize("method", ["triplet_batch_hard", "htg"])
def test_train_distribute_mirrored_trains_every_replica_through_fit(mirrored_strategy, method):
    config = _smoke(f"train.method={method}", "train.distribute=mirrored", "train.epochs=2",
                    "train.warmup_epochs=1", "train.steps_per_epoch=1")
    model, history = experiments.train(config, verbose=0)
    assert model.distribute_strategy is mirrored_strategy and mirrored_strategy.num_replicas_in_sync == 2
    losses = [key for key in history.history if key.endswith("loss")]
    assert losses and all(np.isfinite(history.history[key]).all() for key in losses)
    assert "val_recall@1" in history.history  # model selection ran under the strategy too


def test_train_distribute_names_its_choices_and_needs_tf_config_for_workers(monkeypatch):
    with pytest.raises(ValueError, match="one of .*'mirrored'.*Received: 'gpus'"):
        experiments.distribution_strategy("gpus")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        experiments.distribution_strategy("multi_worker")
    assert experiments.distribution_strategy("none").num_replicas_in_sync == 1


def test_int8_calibration_images_are_never_among_the_parity_images(monkeypatch, tmp_path):
    from fgkeras import export
    from fgkeras.models import build_embedder

    config = _smoke()
    _, gallery = experiments.load_data(config.data)
    seen = {}

    def variants(embedder, directory, image_size, representative_images, modes):
        seen["calibration"] = representative_images
        return {mode: os.path.join(directory, f"{mode}.tflite") for mode in modes}

    def parity(embedder, paths, images, labels, saved_model):
        seen["parity"], seen["labels"] = images, labels
        return {}

    monkeypatch.setattr(export, "export_tflite_variants", variants)
    monkeypatch.setattr(export, "tflite_parity", parity)
    embedder = build_embedder(width=0.25, embedding_dim=8, image_size=config.data.image_size)
    experiments.export_artifacts(embedder, gallery, config, str(tmp_path), tflite_modes=("int8",), force=True)
    calibration = {image.tobytes() for image in seen["calibration"]}
    parity_images = [image.tobytes() for image in seen["parity"]]
    assert len(calibration) >= 32 and len(parity_images) == len(seen["labels"]) >= 32
    assert not calibration & set(parity_images)


def _mixed_precision_config(method, tmp_path):
    """A smoke-sized config of `method` at 32 px with `train.mixed_precision=true`: 2 epochs of 1 step
    (HTG: 1 of its basic model, 1 of the game; FGGAN: after 1 step of S's pre-training and 1 of G's warm-up)."""
    if method == "viewgan":
        from fgkeras.evaluation.viewgan import viewgan_smoke

        config = viewgan_smoke(configs.get_config("viewgan"))
    elif method == "fggan":
        config = configs.override(configs.smoke(configs.get_config("fggan")), [
            "fggan.pretrain_steps=1", "fggan.generator_warmup_steps=1", f"fggan.cache_dir={tmp_path}"])
    else:
        config = configs.smoke(configs.get_config("baseline"))
        config.train.method = method
    return configs.override(config, ["train.mixed_precision=true", "train.epochs=2", "train.warmup_epochs=1",
                                     "train.steps_per_epoch=1", "train.validation_classes=0",
                                     "data.image_size=32"])


@pytest.mark.parametrize("method", ["basic", "softmax", "htg", "fggan", "viewgan"])
def test_mixed_precision_trains_every_method_with_float32_losses_and_variables(method, tmp_path, monkeypatch):
    """`train.mixed_precision=true`: every trainer computes in `experiments.dtype_policy`'s compute
    dtype (bfloat16 on any device) and keeps its variables and every player's loss in float32.

    Mutations tried: ViewGAN trained outside the dtype policy (what `train_viewgan` did before: its
    convolutions computed in float32) fails the compute-dtype assertion; FGGAN's softmax on S's
    bfloat16 logits without the cast to float32 fails the loss-dtype assertion (S's loss in bfloat16).
    """
    # Every player's loss reaches its optimizer through `scale_loss` (the LossScaleOptimizer hook):
    # record the dtype of each one there, at trace time.
    loss_dtypes = []
    scale_loss = keras.optimizers.Optimizer.scale_loss

    def recording_scale_loss(optimizer, loss):
        loss_dtypes.append(keras.backend.standardize_dtype(loss.dtype))
        return scale_loss(optimizer, loss)

    monkeypatch.setattr(keras.optimizers.Optimizer, "scale_loss", recording_scale_loss)
    with experiments.dtype_policy(True):
        policy = keras.config.dtype_policy()
    assert policy.compute_dtype in ("float16", "bfloat16") and policy.variable_dtype == "float32"
    model, history = experiments.train(_mixed_precision_config(method, tmp_path), verbose=0)
    assert keras.config.dtype_policy().name == "float32"  # restored after training

    losses = {key: values for key, values in history.history.items() if key.endswith("loss")}
    assert losses and all(np.isfinite(values).all() for values in losses.values()), losses
    assert loss_dtypes and set(loss_dtypes) == {"float32"}, loss_dtypes
    floats = [v for v in model.variables if "float" in str(v.dtype)]
    assert floats and {str(v.dtype) for v in floats} == {"float32"}
    convolutions = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Conv2D)]
    assert convolutions and {layer.compute_dtype for layer in convolutions} == {policy.compute_dtype}
