"""Resumable `fit`: a run killed at any moment restarts with the same command and ends as if it had not been.

`keras.callbacks.BackupAndRestore` (Keras 3.15) is the starting point; what it does not do, and
`ResumableBackup` adds:

- It restores the weights and the epoch only. A checkpoint taken mid-epoch (`save_freq=N`) is
  loaded, then that epoch is run again from its first batch, on a data stream that `fit` starts
  again from its beginning: the resumed run trains on batches it has already seen, with weights
  that have already seen them. Here the checkpoint records the step it was taken at; the stream
  is started at that batch (`fit_resumable`), and the steps of the interrupted epoch that were
  done before the checkpoint are passed over without touching the stream or the weights.
- It writes the weights, then the epoch, in place: a kill between the two, or during the write
  of the weights file, leaves a checkpoint that disagrees with itself or does not load. Here a
  checkpoint is one directory, written beside the last one and renamed into place; the older
  one is removed only after that, so a kill leaves one complete checkpoint or the other.
- `Model.save_weights` holds every tracked optimizer's state (a multi-player game's
  `f_optimizer`, `g_optimizer`, … are attributes of the model and are walked with it), but not
  the state of the `keras.random.SeedGenerator`s (random triplets, a generator's noise): without
  it a resumed game draws other random numbers. Here those states are saved beside the weights.
- The state of callbacks that select a model across epochs (`RetrievalEvaluation`'s best epoch
  and best weights) lives in memory: callbacks with `save_state(directory)` and
  `load_state(directory)` methods have their state saved in each checkpoint and loaded with it.
"""

import json
import logging
import os
import re
import shutil

import keras
import numpy as np
import tensorflow as tf

from fgkeras import _files

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^step-(\d{9})-epoch-(\d{6})$")


def _seed_states(model):
    """The variables holding `keras.random.SeedGenerator` states, which `save_weights` leaves out."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


class ResumableBackup(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` that resumes at the step of its checkpoint (see the module docstring).

    Use it through `fit_resumable`, which starts the data stream at `position()`. Checkpoints are
    written at each epoch's end and, with an integer `save_freq`, every `save_freq` steps of the
    whole run (counted over epochs). They live in `backup_dir` as `step-<global step>-epoch-<epoch>/`
    holding `model.weights.h5`, `seeds.npz`, `position.json` and a folder per stateful callback.

    Args:
        backup_dir: the folder of this run's checkpoints (one run, one folder).
        save_freq: "epoch", or an integer N > 0: also every N steps.
        delete_checkpoint: remove `backup_dir` when `fit` ends normally.
        stateful: callbacks with `save_state(directory)` / `load_state(directory)`; their state
            is saved in each checkpoint. Put this callback after them in the `fit` list, so that
            an epoch's checkpoint holds what they did at that epoch's end.
    """

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True, stateful=()):
        if isinstance(save_freq, int) and save_freq < 1:
            raise ValueError(f"`save_freq` must be 'epoch' or an integer >= 1. Received: save_freq={save_freq}")
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint)
        self.stateful = list(stateful)
        self._epoch = 0
        self._resumed = (0, 0)

    def latest(self):
        """The newest complete checkpoint's directory, or None."""
        if not os.path.isdir(self.backup_dir):
            return None
        names = sorted(name for name in os.listdir(self.backup_dir) if _CHECKPOINT.match(name))
        return os.path.join(self.backup_dir, names[-1]) if names else None

    def position(self):
        """`(epoch, steps done in that epoch)` of the newest checkpoint; `(0, 0)` when there is none."""
        latest = self.latest()
        if latest is None:
            return 0, 0
        with open(os.path.join(latest, "position.json"), encoding="utf-8") as f:
            position = json.load(f)
        return position["epoch"], position["batch"]

    def on_train_begin(self, logs=None):
        latest = self.latest()
        self._resumed = self.position()
        if latest is None:
            return
        epoch, done = self._resumed
        steps = self.params.get("steps") if self.params else None
        if steps is not None and done > steps:
            raise ValueError(f"The checkpoint {latest} was taken at step {done} of an epoch, but this `fit` has "
                             f"{steps} steps per epoch: resume with the configuration that made it")
        self.model.load_weights(os.path.join(latest, "model.weights.h5"))
        with np.load(os.path.join(latest, "seeds.npz")) as seeds:
            for i, variable in enumerate(_seed_states(self.model)):
                variable.assign(seeds[f"state_{i}"])
        for i, callback in enumerate(self.stateful):
            callback.load_state(os.path.join(latest, f"callback_{i}"))
        self.model._initial_epoch = epoch
        logger.info("Resuming from %s: epoch %d, step %d of it", latest, epoch + 1, done)
        if done:
            self._pass_over(done)

    def _pass_over(self, count):
        """The next `count` steps of `fit` do nothing: they were done before the checkpoint.

        They touch neither the weights nor the data iterator (the stream already starts after
        them), and log nothing; the epoch's mean losses are those of the steps run after the resume.
        """
        train_function, remaining = self.model.train_function, [count]

        def done_before_the_checkpoint(iterator):
            remaining[0] -= 1
            if remaining[0] == 0:
                self.model.train_function = train_function
            return {}

        self.model.train_function = done_before_the_checkpoint

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq == "epoch":
            return
        done = batch + 1
        if self._epoch == self._resumed[0] and done <= self._resumed[1]:
            return  # a step passed over
        if (self._epoch * self.params["steps"] + done) % self.save_freq == 0:
            self._save(self._epoch, done)

    def on_epoch_end(self, epoch, logs=None):
        self._save(epoch + 1, 0)

    def _save(self, epoch, batch):
        step = epoch * self.params["steps"] + batch
        os.makedirs(self.backup_dir, exist_ok=True)
        staging = _files.make_temp_dir(self.backup_dir, ".staging-")
        self.model.save_weights(os.path.join(staging, "model.weights.h5"))
        np.savez(os.path.join(staging, "seeds.npz"),
                 **{f"state_{i}": np.asarray(v) for i, v in enumerate(_seed_states(self.model))})
        for i, callback in enumerate(self.stateful):
            os.makedirs(os.path.join(staging, f"callback_{i}"))
            callback.save_state(os.path.join(staging, f"callback_{i}"))
        with open(os.path.join(staging, "position.json"), "w", encoding="utf-8") as f:
            json.dump({"epoch": epoch, "batch": batch, "step": step}, f)
        _files.fsync_tree(staging)
        final = os.path.join(self.backup_dir, f"step-{step:09d}-epoch-{epoch:06d}")
        if os.path.exists(final):  # the same point saved again after a resume
            shutil.rmtree(final)
        os.rename(staging, final)
        _files.fsync_dir(self.backup_dir)
        for name in os.listdir(self.backup_dir):  # older checkpoints, and the staging of a killed save
            if name != os.path.basename(final):
                shutil.rmtree(os.path.join(self.backup_dir, name), ignore_errors=True)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and os.path.exists(self.backup_dir):
            shutil.rmtree(self.backup_dir)


def fit_resumable(model, dataset, *, epochs, steps_per_epoch, backup_dir="", backup_every_steps=0,
                  callbacks=None, verbose="auto"):
    """`model.fit` on an infinite stream that resumes, after a kill, where its last checkpoint was taken.

    With `backup_dir` empty this is `model.fit(dataset, ...)`. Otherwise a `ResumableBackup` in
    `backup_dir` is added after `callbacks`; a run restarted with the same arguments loads its
    newest checkpoint and starts the stream at the batch that follows it, so that it ends with the
    weights of a run that was never stopped (the stream must be a function of its batch index, as
    `ImageSet.class_balanced_dataset` is). `backup_dir` is removed when the run ends normally.

    Args:
        model: a compiled Keras model.
        dataset: the stream, a `tf.data.Dataset`, or a function `start -> tf.data.Dataset` giving
            the stream from batch `start` on (cheaper than `dataset.skip(start)`, which computes the
            batches it skips).
        epochs, steps_per_epoch, verbose: as in `fit`.
        backup_dir: the folder of this run's checkpoints ("": none).
        backup_every_steps: also checkpoint every that many steps (0: at epoch ends only).
        callbacks: `fit`'s callbacks; those with `save_state` / `load_state` (`RetrievalEvaluation`)
            have their state saved in the checkpoints.
    Returns: the `History` of `fit`.

    Not kept across a kill: the state of callbacks without `save_state` (`EarlyStopping`'s count of
    epochs without improvement starts again; a `TensorBoard` continues at the resumed epoch), and
    the epoch's mean losses in the logs, which cover the steps run after the resume. Not supported
    under `MultiWorkerMirroredStrategy` yet (a `ValueError`).
    """
    if isinstance(backup_every_steps, bool) or not isinstance(backup_every_steps, int) or backup_every_steps < 0:
        raise ValueError("`backup_every_steps` (`train.backup_every_steps`) must be an integer >= 0 (0: at epoch "
                         f"ends only). Received: backup_every_steps={backup_every_steps!r}")
    stream_from = dataset if callable(dataset) else (lambda start: dataset.skip(start) if start else dataset)
    callbacks = list(callbacks or [])
    start = 0
    if backup_dir and isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise ValueError(
            "`backup_dir` (train.backup_dir) is not supported under MultiWorkerMirroredStrategy yet: every worker "
            "would write the same folder, and the workers must resume from the same step. Received: "
            f"backup_dir={backup_dir!r}")
    if backup_dir:
        backup = ResumableBackup(backup_dir, save_freq=backup_every_steps or "epoch",
                                 stateful=[c for c in callbacks if hasattr(c, "save_state")])
        epoch, done = backup.position()
        start = epoch * steps_per_epoch + done
        callbacks.append(backup)
    return model.fit(stream_from(start), epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=verbose,
                     callbacks=callbacks, shuffle=False)  # the streams are already shuffled
