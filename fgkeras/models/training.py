"""Pieces shared by every custom `train_step` in fgkeras."""

import keras
import numpy as np
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


class BuiltBeforeFit(keras.Model):
    """A `keras.Model` built, with its optimizers, before `fit`: the base of every fgkeras trainer.

    Under a `tf.distribute` strategy, Keras 3.15's `fit` first averages the first batch across
    replicas to build the model symbolically (`_maybe_symbolic_build`); under
    `MultiWorkerMirroredStrategy` that all-reduce fails on a batch that is a dict of tensors
    ("Attempt to convert a value ({'image': PerReplica…}) … to a Tensor"). The fgkeras trainers
    are built in `__init__` and build their optimizers in `compile`, so nothing is left to build:
    the step is skipped when the model and its `optimizer` (if it has one) are built.

    Under `MultiWorkerMirroredStrategy`, Keras 3.15 also reduces each logged figure of a step
    across the workers on its axis 0 (`reduce_per_replica`), which a scalar does not have
    ("Invalid reduction dimension 0 for input with 0 dimensions", tensorflow/tensorflow#72388):
    there the train step's figures are given as vectors of one value, reduced to scalars.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self.built and (self.optimizer is None or self.optimizer.built):
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def make_train_function(self, force=False):
        if (self.train_function is not None and not force) or not isinstance(
                self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return super().make_train_function(force=force)
        step = self.train_step

        def train_step_with_vector_logs(data):
            return {name: ops.reshape(value, (1,)) for name, value in step(data).items()}

        self.train_function = self._make_function(train_step_with_vector_logs)
        return self.train_function


# Whose loss a logged name is, for the message of a non-finite loss.
_LOSS_OWNERS = {"f_loss": "the embedder F", "g_loss": "the generator G", "d_loss": "the discriminator D",
                "n_loss": "the normaliser N", "s_loss": "the semantic embedding S",
                "recon_loss": "the generator G (its feature reconstruction)", "loss": "the model",
                "softmax_loss": "the model (its softmax term)", "triplet_loss": "the model (its triplet term)"}


class NonFiniteLossError(ValueError):
    """A player's loss became NaN or infinite during `fit`."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops `fit` with a `NonFiniteLossError` at the first step where a logged loss is NaN or ±Inf.

    Every `*loss` entry of the step's logs is checked (each player's, in a game), so that a
    diverging player cannot leave a silent NaN model behind; the error names the player, the
    epoch and the step. Keras's own `TerminateOnNaN` checks `loss` alone and stops quietly.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        for name, value in (logs or {}).items():
            if not name.endswith("loss"):
                continue
            value = float(ops.convert_to_numpy(value))
            if not np.isfinite(value):
                owner = _LOSS_OWNERS.get(name, f"'{name}'")
                self.model.stop_training = True
                raise NonFiniteLossError(
                    f"Training stopped: the loss of {owner} ({name}) is {value} at epoch {getattr(self, 'epoch', 0) + 1}, "
                    f"step {batch + 1}. Lower the learning rate, or check the data for broken images; "
                    "the weights are those of that step, not a model to use.")


class ContinuousTensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` whose epoch count continues across successive `fit` calls.

    A recipe of several phases (HTG: the basic model, then the game) calls `fit` once per phase
    with the same callbacks, and each `fit` counts its epochs from 0: plain `TensorBoard` would
    write the second phase over the first one's steps. Here epoch e of a later `fit` is logged at
    step (epochs of the earlier calls) + e, so `val_recall@1` is one curve over the whole budget,
    and each phase's own losses appear from the step where it starts.
    """

    def __init__(self, log_dir="logs", **kwargs):
        super().__init__(log_dir=log_dir, **kwargs)
        self._epoch_offset = 0
        self._epochs_seen = 0

    def on_train_begin(self, logs=None):
        self._epoch_offset += self._epochs_seen
        self._epochs_seen = 0
        super().on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(self._epoch_offset + epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._epochs_seen = epoch + 1
        super().on_epoch_end(self._epoch_offset + epoch, logs)


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


OPTIMIZERS = ("adam", "adamw", "sgd")


class _RateMultipliers:
    """Mixed into a Keras optimizer: some variables step at `multiplier` × the learning rate.

    `rate_multipliers` maps variable paths (`variable.path`) to multipliers; the other
    variables take the optimizer's rate. Paths, not variables, so that the optimizer's
    config serialises (a `.keras` file keeps the recipe). Decoupled weight decay, when on,
    uses the optimizer's rate for every variable.
    """

    def __init__(self, *args, rate_multipliers=None, **kwargs):
        super().__init__(*args, **kwargs)
        multipliers = {str(path): float(value) for path, value in (rate_multipliers or {}).items()}
        bad = {path: value for path, value in multipliers.items() if value < 0}
        if bad:
            raise ValueError(f"`rate_multipliers` must be >= 0. Received: {bad}")
        self.rate_multipliers = multipliers

    def build(self, variables):
        paths = [v.path for v in variables]
        shared = sorted({p for p in paths if p in self.rate_multipliers and paths.count(p) > 1})
        if shared:
            raise ValueError(
                "`rate_multipliers` names variables by path, but several variables share the paths "
                f"{shared}: rename their layers so that each path is unique.")
        super().build(variables)
        # `update_step` may receive the backend's variable (a tf.Variable), which has no path.
        self._multiplier_by_key = {self._var_key(v): self.rate_multipliers[v.path]
                                   for v in variables if v.path in self.rate_multipliers}

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self._multiplier_by_key.get(self._var_key(variable), 1.0)
        if multiplier != 1.0:
            learning_rate = ops.multiply(ops.cast(learning_rate, variable.dtype), multiplier)
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "rate_multipliers": dict(self.rate_multipliers)}


@keras.saving.register_keras_serializable(package="fgkeras")
class MultiRateAdam(_RateMultipliers, keras.optimizers.Adam):
    """`keras.optimizers.Adam` with per-variable rate multipliers (`make_optimizer`)."""


@keras.saving.register_keras_serializable(package="fgkeras")
class MultiRateAdamW(_RateMultipliers, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` with per-variable rate multipliers (`make_optimizer`)."""


@keras.saving.register_keras_serializable(package="fgkeras")
class MultiRateSGD(_RateMultipliers, keras.optimizers.SGD):
    """`keras.optimizers.SGD` with per-variable rate multipliers (`make_optimizer`)."""


def make_optimizer(name, learning_rate, *, beta_1=0.9, beta_2=0.999, momentum=0.9, weight_decay=None,
                   rate_multipliers=None, **kwargs):
    """Every fgkeras method's optimizer, from its name and settings.

    One factory, so that a setting means the same for every method (`--set
    train.optimizer=sgd` gives HTG and the baselines the same momentum) and each method's
    config carries its paper's values (e.g. Adam(2e-4, β1 = 0.5) for a GAN).

    Args:
        name: "adam", "adamw" or "sgd".
        learning_rate: a float or a `keras.optimizers.schedules.LearningRateSchedule`.
        beta_1, beta_2: Adam's and AdamW's moment decays (β1, β2).
        momentum: SGD's momentum (0 for plain SGD).
        weight_decay: decoupled weight decay, or None for none (AdamW: Keras's default, 0.004).
        rate_multipliers: optional `{variable path: multiplier}`: those variables step at
            `multiplier` × the rate (e.g. a pretrained backbone fine-tuned slower than its head;
            see `rate_multipliers_for`).
        **kwargs: passed to the Keras optimizer (`clipnorm`, `epsilon`, `nesterov`, `name` …).
    Returns: a `keras.optimizers.Optimizer` (a `MultiRate*` subclass when `rate_multipliers`
    is given).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"`optimizer` must be one of {list(OPTIMIZERS)} (`name` of `make_optimizer`). "
                         f"Received: {name!r}")
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    if name == "sgd":
        if not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1). Received: momentum={momentum}")
        kwargs["momentum"] = momentum
    else:
        for argument, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0 <= value < 1:
                raise ValueError(f"`{argument}` must be in [0, 1). Received: {argument}={value}")
        kwargs.update(beta_1=beta_1, beta_2=beta_2)
    plain = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD}
    multi_rate = {"adam": MultiRateAdam, "adamw": MultiRateAdamW, "sgd": MultiRateSGD}
    if rate_multipliers:
        return multi_rate[name](learning_rate=learning_rate, rate_multipliers=rate_multipliers, **kwargs)
    return plain[name](learning_rate=learning_rate, **kwargs)


def rate_multipliers_for(variables, multiplier):
    """`{variable.path: multiplier}` for `variables`: the `rate_multipliers` of `make_optimizer`.

    Args:
        variables: the variables to slow down or speed up (e.g. `embedder.backbone.trainable_variables`).
        multiplier: their rate relative to the optimizer's, >= 0.
    """
    if multiplier < 0:
        raise ValueError(f"`multiplier` must be >= 0. Received: multiplier={multiplier}")
    return {v.path: float(multiplier) for v in variables}
