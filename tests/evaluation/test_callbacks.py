import os

import keras
import numpy as np
import pytest

from fgkeras.data import ImageSet
from fgkeras.evaluation import RetrievalEvaluation, retrieval_metrics
from fgkeras.models import Embedder, MetricLearner

SIZE = 16


def _coloured(classes, per_class, seed):
    """Images whose class is their colour (plus noise): any conv net tells the classes apart."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(100).integers(0, 256, (max(classes) + 1, 3))
    labels = np.repeat(classes, per_class)
    noise = rng.integers(-8, 9, (len(labels), SIZE, SIZE, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype("uint8")
    return ImageSet(labels=labels, images=images)


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Conv2D(8, 3, strides=2, activation="relu")])
    embedder = Embedder(backbone, embedding_dim=8, name="embedder")
    embedder.build((None, SIZE, SIZE, 3))
    model = MetricLearner(embedder, softmax="none", triplet="batch_hard", seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    return model


@pytest.fixture(scope="module")
def train_stream():
    return _coloured(range(4), 8, seed=1).class_balanced_dataset(classes_per_batch=4, images_per_class=2, seed=0)


@pytest.fixture(scope="module")
def validation():
    return _coloured(range(4, 8), 4, seed=2)


class _Capture(keras.callbacks.Callback):
    """After the evaluation: the logs it wrote, and the figures of the same weights computed apart."""

    def __init__(self, validation):
        super().__init__()
        self.validation = validation
        self.logs, self.expected, self.weights = [], [], []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))
        embeddings = np.asarray(self.model.embedder(self.validation.images, training=False))
        self.expected.append(retrieval_metrics(embeddings, self.validation.labels, recall_ks=(1, 2, 4, 8)))
        self.weights.append([w.copy() for w in self.model.get_weights()])


class _CorruptAtLastEpoch(keras.callbacks.Callback):
    """Zeroes the embedding layer at the end of the last epoch: every image gets the same embedding."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.params["epochs"]:
            layer = self.model.embedder.embedding
            layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])


def test_logs_equal_retrieval_metrics_of_the_held_out_set(train_stream, validation):
    model = _model()
    capture = _Capture(validation)
    evaluation = RetrievalEvaluation(validation.as_dataset(batch_size=5))
    history = model.fit(train_stream, epochs=2, steps_per_epoch=2, verbose=0, shuffle=False, callbacks=[evaluation, capture])
    for logs, expected in zip(capture.logs, capture.expected):
        for name in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"):
            assert logs[f"val_{name}"] == pytest.approx(expected[name], abs=1e-6)
    assert history.history["val_recall@1"] == [logs["val_recall@1"] for logs in capture.logs]
    assert [r["epoch"] for r in evaluation.records] == [0, 1]


def test_restoring_picks_the_best_epoch_not_the_last(train_stream, validation):
    model = _model()
    capture = _Capture(validation)
    evaluation = RetrievalEvaluation(validation.as_dataset(batch_size=8), restore_best_weights=True)
    model.fit(train_stream, epochs=3, steps_per_epoch=2, verbose=0, shuffle=False,
              callbacks=[_CorruptAtLastEpoch(), evaluation, capture])
    recalls = [logs["val_recall@1"] for logs in capture.logs]
    assert recalls[-1] < max(recalls[:-1])  # the corrupted last epoch is the worst
    best = int(np.argmax(recalls))
    assert evaluation.best_epoch == best and evaluation.best == recalls[best]
    final = model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(final, capture.weights[best]))
    assert not all(np.array_equal(a, b) for a, b in zip(final, capture.weights[-1]))
    embeddings = np.asarray(model.embedder(validation.images, training=False))
    assert retrieval_metrics(embeddings, validation.labels)["recall@1"] == pytest.approx(recalls[best])


def test_without_restoring_the_last_weights_stay(train_stream, validation):
    model = _model()
    capture = _Capture(validation)
    model.fit(train_stream, epochs=2, steps_per_epoch=1, verbose=0, shuffle=False,
              callbacks=[_CorruptAtLastEpoch(), RetrievalEvaluation(validation.as_dataset(batch_size=8)), capture])
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), capture.weights[-1]))


def test_keras_callbacks_after_it_monitor_val_recall(train_stream, validation, tmp_path):
    model = _model()
    path = os.path.join(tmp_path, "best.weights.h5")
    checkpoint = keras.callbacks.ModelCheckpoint(path, monitor="val_recall@1", mode="max", save_best_only=True,
                                                 save_weights_only=True)
    stopping = keras.callbacks.EarlyStopping(monitor="val_recall@1", mode="max", patience=1)
    history = model.fit(train_stream, epochs=6, steps_per_epoch=1, verbose=0, shuffle=False,
                        callbacks=[_CorruptAtLastEpoch(), RetrievalEvaluation(validation.as_dataset(batch_size=8)),
                                   checkpoint, stopping])
    assert os.path.exists(path)  # ModelCheckpoint found the figure in the logs
    assert checkpoint.best == max(history.history["val_recall@1"])
    assert stopping.best == max(history.history["val_recall@1"])


def test_every_n_epochs_and_the_last_one(train_stream, validation):
    model = _model()
    evaluation = RetrievalEvaluation(validation.as_dataset(batch_size=8), every=2, recall_ks=(1,), map_at_r=False)
    capture = _Capture(validation)
    model.fit(train_stream, epochs=5, steps_per_epoch=1, verbose=0, shuffle=False, callbacks=[evaluation, capture])
    assert [r["epoch"] for r in evaluation.records] == [1, 3, 4]
    assert ["val_recall@1" in logs for logs in capture.logs] == [False, True, False, True, True]
    assert not any("val_map@r" in logs for logs in capture.logs)


def test_one_instance_selects_per_fit_and_records_every_fit(train_stream, validation):
    evaluation = RetrievalEvaluation(validation.as_dataset(batch_size=8), restore_best_weights=True)
    first, second = _model(0), _model(1)
    first.fit(train_stream, epochs=2, steps_per_epoch=1, verbose=0, shuffle=False, callbacks=[evaluation])
    second.fit(train_stream, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False, callbacks=[evaluation])
    assert len(evaluation.records) == 3 and evaluation.best_epoch == 0
    assert evaluation.best == evaluation.records[-1]["val_recall@1"]
    # The second fit restored its own best weights, not the first model's.
    assert not all(np.array_equal(a, b) for a, b in zip(second.get_weights(), first.get_weights()))


@pytest.mark.parametrize("kwargs, message", [
    ({"every": 0}, "`every` must be a positive int"),
    ({"monitor": "val_recall@3"}, "`monitor` must be one of the logged figures"),
    ({"monitor": "val_map@r", "map_at_r": False}, "`monitor` must be one of the logged figures"),
])
def test_bad_arguments(validation, kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetrievalEvaluation(validation.as_dataset(batch_size=8), **kwargs)
