import keras
import numpy as np
import pytest
import tensorflow as tf

from fgkeras.models import BASELINES, MetricLearner, build_baseline


def _batch(num_classes=4, per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_classes * per_class, 16, 16, 3)).astype("float32")
    labels = np.repeat(np.arange(num_classes), per_class).astype("int32")
    return images, labels


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_each_baseline_trains_with_plain_fit(name, tiny_embedder):
    images, labels = _batch()
    model = build_baseline(name, tiny_embedder(), num_classes=4, seed=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = [np.array(w) for w in model.embedder.trainable_weights]
    history = model.fit(images, labels, batch_size=16, epochs=2, verbose=0)
    assert all(np.isfinite(v) for v in history.history["loss"])
    after = model.embedder.trainable_weights
    assert any(not np.allclose(b, np.asarray(a)) for b, a in zip(before, after))
    if BASELINES[name]["triplet"] != "none":
        assert "triplet_loss" in history.history
    if BASELINES[name]["softmax"] != "none":
        assert "softmax_loss" in history.history


def test_no_bias_softmax_has_no_bias_and_bias_softmax_has_one(tiny_embedder):
    no_bias = build_baseline("softmax_nobias", tiny_embedder(), num_classes=4)
    bias = build_baseline("softmax", tiny_embedder(), num_classes=4)
    no_bias.build((None, 16, 16, 3))
    bias.build((None, 16, 16, 3))
    assert [w.name for w in no_bias.classifier.weights] == ["kernel"]
    assert sorted(w.name for w in bias.classifier.weights) == ["bias", "kernel"]


def test_fits_on_dict_batches_from_fgkeras_data(tiny_embedder):
    images, labels = _batch()
    dataset = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).batch(16)
    model = build_baseline("triplet_batch_hard", tiny_embedder())
    model.compile(optimizer="adam")
    history = model.fit(dataset, epochs=1, verbose=0, shuffle=False)
    assert history.history["loss"][0] > 0


def test_training_lowers_the_batch_hard_loss(tiny_embedder):
    images, labels = _batch(seed=3)
    model = build_baseline("basic", tiny_embedder(), num_classes=4)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = model.fit(images, labels, batch_size=16, epochs=30, verbose=0)
    assert history.history["loss"][-1] < 0.8 * history.history["loss"][0]


def test_predict_returns_unit_embeddings(tiny_embedder):
    images, _ = _batch()
    model = build_baseline("triplet_random", tiny_embedder(), seed=0)
    out = model.predict(images, verbose=0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_keras_file_round_trip(tmp_path, tiny_embedder):
    images, labels = _batch()
    model = build_baseline("basic", tiny_embedder(), num_classes=4)
    model.compile(optimizer="adam")
    model.fit(images, labels, batch_size=16, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, MetricLearner) and restored.triplet == "random"
    np.testing.assert_allclose(restored.predict(images, verbose=0), model.predict(images, verbose=0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(restored.classifier.kernel, model.classifier.kernel)


@pytest.mark.parametrize("kwargs, message", [
    ({"softmax": "none", "triplet": "none"}, "At least one of"),
    ({"softmax": "bias", "num_classes": None}, "needs `num_classes`"),
    ({"triplet": "hardest"}, "`triplet` must be one of"),
    ({"softmax": "none", "margin": 0.0}, "`margin` must be > 0"),
])
def test_bad_configurations_are_refused(kwargs, message, tiny_embedder):
    with pytest.raises(ValueError, match=message):
        MetricLearner(tiny_embedder(), **kwargs)


def test_unknown_baseline_name(tiny_embedder):
    with pytest.raises(ValueError, match="`name` must be one of"):
        build_baseline("arcface", tiny_embedder())


def _one_step(model, images, labels):
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    model.fit(images, labels, batch_size=len(images), epochs=1, verbose=0, shuffle=False)
    return [np.asarray(w) for w in model.trainable_weights]


def test_mirrored_step_equals_one_device_on_the_same_global_batch(mirrored_strategy, tiny_embedder):
    images, labels = _batch(num_classes=4, per_class=4)
    # Softmax is a per-sample mean, so the global-batch update is well defined on any split.
    single = build_baseline("softmax_nobias", tiny_embedder(seed=5), num_classes=4)
    expected = _one_step(single, images, labels)
    with mirrored_strategy.scope():
        mirrored = build_baseline("softmax_nobias", tiny_embedder(seed=5), num_classes=4)
        got = _one_step(mirrored, images, labels)
    initial = [np.asarray(w) for w in build_baseline(
        "softmax_nobias", tiny_embedder(seed=5), num_classes=4).trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(expected, initial))  # the step did something
    for a, b in zip(expected, got):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_htgs_basic_model_uses_random_triplets_and_the_batch_hard_one_is_named(tiny_embedder):
    # HTG's basic model samples triplets "without considering their hardness" (Sec. 4.2, Table 1 D).
    basic = build_baseline("basic", tiny_embedder(), num_classes=4)
    assert (basic.softmax, basic.triplet) == ("no_bias", "random")
    ohem = build_baseline("basic_batch_hard", tiny_embedder(), num_classes=4)
    assert (ohem.softmax, ohem.triplet) == ("no_bias", "batch_hard")
    assert build_baseline("basic", tiny_embedder(), num_classes=4, triplet="batch_hard").triplet == "batch_hard"
