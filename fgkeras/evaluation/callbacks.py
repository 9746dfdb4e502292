"""Model selection during `fit`: retrieval metrics on classes held out from training."""

import json
import logging
import math
import os

import keras
import numpy as np

from fgkeras.evaluation.embed import embed_dataset
from fgkeras.evaluation.metrics import retrieval_metrics

logger = logging.getLogger(__name__)


class RetrievalEvaluation(keras.callbacks.Callback):
    """Embeds a validation set every `every` epochs and logs its retrieval metrics.

    The validation set holds classes that the model does not train on (retrieval of unseen
    classes is what the embedder is for), searched leave-one-out as in
    `fgkeras.evaluation.retrieval_metrics`. The figures are written into the epoch's `logs`
    as `val_recall@K` (one per `recall_ks`) and `val_map@r`, so the callbacks that run after
    this one read them unchanged: `keras.callbacks.EarlyStopping(monitor="val_recall@1",
    mode="max")`, `ModelCheckpoint(..., monitor="val_recall@1", mode="max",
    save_best_only=True)`, `TensorBoard`, `History`. Keras runs callbacks in list order
    (`History` and the progress bar last), so put this one before those that read it.

    The model evaluated is `model.embedder` when the trained model has one (the fgkeras
    baselines and games), else the model itself, or the `embedder` given. One instance can
    serve several `fit` calls (HTG's two phases): each call selects its own best epoch, and
    `records` accumulates every evaluation.

    A run resumed from a checkpoint (`fgkeras.models.fit_resumable`) keeps its model selection:
    `save_state` and `load_state` carry `best`, `best_epoch`, the best weights and `records`
    through the checkpoints, so the resumed run restores the same best epoch as one never stopped.

    Args:
        dataset: a `tf.data.Dataset` of dicts with "image" and "label" (batched or not),
            e.g. `ImageSet.as_dataset(image_size, batch_size)`; at least two images of a class.
        every: evaluate every `every` epochs, and at the last epoch of each `fit`.
        recall_ks: the K of `val_recall@K`.
        map_at_r: whether to log `val_map@r`.
        monitor: the logged figure that picks the best epoch (higher is better).
        restore_best_weights: at the end of each `fit`, set the trained model's weights to
            those of its best evaluated epoch (the optimizer's state is not restored).
        embedder: the model to evaluate, or None for `model.embedder` (or the model).
        verbose: log each evaluation at INFO level.

    Attributes:
        records: one dict per evaluation: `{"model": model name, "epoch": ..., figures...}`.
        best, best_epoch: the best `monitor` value of the last `fit` and its epoch (0-based).
    """

    def __init__(self, dataset, every=1, recall_ks=(1, 2, 4, 8), map_at_r=True, monitor="val_recall@1",
                 restore_best_weights=False, embedder=None, verbose=True):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"`every` must be a positive int. Received: every={every!r}")
        recall_ks = tuple(recall_ks)
        names = [f"val_recall@{k}" for k in recall_ks] + (["val_map@r"] if map_at_r else [])
        if monitor not in names:
            raise ValueError(f"`monitor` must be one of the logged figures {names}. Received: monitor={monitor!r}")
        self.dataset = dataset
        self.every = int(every)
        self.recall_ks = recall_ks
        self.map_at_r = map_at_r
        self.monitor = monitor
        self.restore_best_weights = restore_best_weights
        self.embedder = embedder
        self.verbose = verbose
        self.records = []
        self.best = None
        self.best_epoch = None
        self._best_weights = None

    def _evaluated_model(self):
        if self.embedder is not None:
            return self.embedder
        return getattr(self.model, "embedder", self.model)

    def evaluate(self):
        """The validation figures of the current weights, `{"val_recall@1": ..., ...}`."""
        arrays = embed_dataset(self._evaluated_model(), self.dataset, verbose=False)
        names = [f"recall@{k}" for k in self.recall_ks] + (["map@r"] if self.map_at_r else [])
        if not np.isfinite(arrays["embeddings"]).all():
            logger.warning("RetrievalEvaluation: the embeddings are not finite; every figure is NaN.")
            return {f"val_{name}": math.nan for name in names}
        metrics = retrieval_metrics(arrays["embeddings"], arrays["label"], recall_ks=self.recall_ks,
                                    precision_ks=(), map_ks=(), map_at_r=self.map_at_r, verbose=False)
        return {f"val_{name}": metrics[name] for name in names}

    def on_train_begin(self, logs=None):
        self.best, self.best_epoch, self._best_weights = None, None, None

    def on_epoch_end(self, epoch, logs=None):
        last = self.params.get("epochs") if self.params else None
        if (epoch + 1) % self.every and epoch + 1 != last:
            return
        figures = self.evaluate()
        if logs is not None:
            logs.update(figures)  # the dict every later callback of this epoch reads
        self.records.append({"model": self.model.name, "epoch": epoch, **figures})
        if self.verbose:
            logger.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
        value = figures[self.monitor]
        if not math.isnan(value) and (self.best is None or value > self.best):
            self.best, self.best_epoch = value, epoch
            if self.restore_best_weights:
                self._best_weights = self.model.get_weights()

    def save_state(self, directory):
        """Writes the selection so far (best figure, epoch and weights, records) into `directory`."""
        with open(os.path.join(directory, "selection.json"), "w", encoding="utf-8") as f:
            json.dump({"best": self.best, "best_epoch": self.best_epoch, "records": self.records}, f, default=float)
        if self._best_weights is not None:
            np.savez(os.path.join(directory, "best_weights.npz"), *self._best_weights)

    def load_state(self, directory):
        """Reads what `save_state` wrote: the selection continues where the checkpoint left it."""
        with open(os.path.join(directory, "selection.json"), encoding="utf-8") as f:
            state = json.load(f)
        self.best, self.best_epoch, self.records = state["best"], state["best_epoch"], state["records"]
        weights = os.path.join(directory, "best_weights.npz")
        if os.path.exists(weights):
            with np.load(weights) as arrays:
                self._best_weights = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
        else:
            self._best_weights = None

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self._best_weights is not None:
            logger.info("Restoring the weights of epoch %d (%s %.4f)", self.best_epoch + 1, self.monitor, self.best)
            self.model.set_weights(self._best_weights)
