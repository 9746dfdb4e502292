"""Runs an experiment configuration end to end: data → fit → evaluation.

These are the functions the CLI calls; library users can call them too.
"""

import contextlib
import functools
import json
import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf

from fgkeras import data as fg_data
from fgkeras import evaluation
from fgkeras import models
from fgkeras.configs import ExperimentConfig

logger = logging.getLogger(__name__)

DEMO_METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")


def load_data(config):
    """Returns `(train, test)` ImageSets for a `DataConfig`: disjoint classes.

    The train set's labels are renumbered 0..K-1 (a classifier head needs them so);
    the test set holds the classes that retrieval is evaluated on.
    """
    train, test = _load_splits(config)
    return train.relabeled(), test


def _load_splits(config):
    if config.source == "synthetic":
        synthetic = fg_data.SyntheticVehicles(
            seed=config.seed, image_size=config.image_size, num_makes=config.num_makes,
            models_per_make=config.models_per_make, images_per_class=config.images_per_class,
            part_scale=config.part_scale, pose_jitter=config.pose_jitter, clutter=config.clutter,
            occlusion_prob=config.occlusion_prob, stock_view=config.stock_view,
        )
        return synthetic.imageset(config.train_split), synthetic.imageset(config.test_split)
    if config.source == "csv":
        return (fg_data.read_csv(config.path, split=config.train_split),
                fg_data.read_csv(config.path, split=config.test_split))
    if config.source == "folder":
        everything = fg_data.image_folder(config.path)
        half = everything.num_classes // 2
        train = everything.split_by_classes(np.arange(half))
        test = everything.split_by_classes(np.arange(half, everything.num_classes))
        return train, test
    if config.source == "tfds":
        return (fg_data.tfds_images(config.tfds_name, split=config.train_split, image_size=config.image_size),
                fg_data.tfds_images(config.tfds_name, split=config.test_split, image_size=config.image_size))
    raise ValueError(
        "`data.source` must be one of 'synthetic', 'csv', 'folder', 'tfds'. "
        f"Received: {config.source!r}"
    )


def build_embedder(config):
    """A fresh embedder as `config.model` describes it (`model.preset` may be a local file).

    With `model.freeze_bn` the backbone's batch normalisations are frozen
    (`fgkeras.models.freeze_batch_norm`).
    """
    embedder = models.build_embedder(
        backbone=config.model.backbone, width=config.model.width,
        embedding_dim=config.model.embedding_dim, pooling=config.model.pooling,
        image_size=config.data.image_size, preset=config.model.preset or None,
    )
    if config.model.freeze_bn:
        models.freeze_batch_norm(embedder.backbone)
    return embedder


def build_model(config, num_classes):
    """The baseline trainer named by `config.train.method`, on a fresh embedder."""
    embedder = build_embedder(config)
    return models.build_baseline(
        config.train.method, embedder, num_classes=num_classes, margin=config.train.margin,
        triplet_weight=config.train.triplet_weight, seed=config.train.seed,
    )


def backbone_rate_multipliers(train_config, embedder):
    """`rate_multipliers` of `make_optimizer` for `train.backbone_lr_multiplier` (None at 1)."""
    if train_config.backbone_lr_multiplier == 1.0:
        return None
    return models.rate_multipliers_for(embedder.backbone.trainable_variables, train_config.backbone_lr_multiplier)


def validation_split(train_set, fraction, seed):
    """Holds out `fraction` of the classes of `train_set` for model selection.

    The held-out classes are drawn by `seed` alone, so every method trained on the same set
    with the same seed is selected on the same classes. At least 2 classes are held out
    (retrieval within one class tells nothing), and at least 2 are left to train on.

    Args:
        train_set: the training `ImageSet`.
        fraction: in [0, 1); 0 holds nothing out.
        seed: an integer seed.
    Returns:
        `(fit_set, validation_set)`: the classes to train on, renumbered 0..K'-1, and the
        held-out ones (labels kept); `(train_set, None)` when `fraction` is 0.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"`train.validation_classes` must be in [0, 1). Received: {fraction}")
    if fraction == 0:
        return train_set, None
    classes = train_set.classes
    count = max(2, int(round(fraction * len(classes))))
    if len(classes) - count < 2:
        raise ValueError(
            f"Holding out {count} of the {len(classes)} training classes for model selection leaves "
            f"fewer than 2 to train on. Received: train.validation_classes={fraction}; set it to 0 to "
            "train on every class")
    held_out = np.sort(np.random.default_rng(seed).choice(classes, size=count, replace=False))
    keep = np.isin(train_set.labels, held_out, invert=True)
    return train_set.subset(keep).relabeled(), train_set.subset(~keep)


def selection_callbacks(config, validation_set):
    """The callbacks of model selection on `validation_set` (held-out classes), or [] for None.

    A `RetrievalEvaluation` every `train.validation_every` epochs that restores the best
    epoch's weights (`train.restore_best`), and with `train.patience` > 0 an `EarlyStopping`
    on its `val_recall@1`. They go first in the callback list, so that every later callback
    reads the figures.
    """
    if validation_set is None:
        return []
    dataset = validation_set.as_dataset(image_size=config.data.image_size,
                                        batch_size=config.eval.batch_size).cache()
    callbacks = [evaluation.RetrievalEvaluation(dataset, every=config.train.validation_every,
                                                restore_best_weights=config.train.restore_best)]
    if config.train.patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_recall@1", mode="max",
                                                       patience=config.train.patience))
    return callbacks


def tensorboard_log_dir(config):
    """Where `train.tensorboard` writes: `train.log_dir`, or `runs/tensorboard/<config name>`."""
    return config.train.log_dir or os.path.join("runs", "tensorboard", config.name)


def tensorboard_callbacks(config):
    """`[ContinuousTensorBoard]` when `train.tensorboard` is on, else [].

    It goes after the model-selection callbacks (they write `val_recall@1` … into the epoch's
    logs first) and counts epochs across the `fit` calls of a multi-phase recipe (HTG).
    """
    if not config.train.tensorboard:
        return []
    log_dir = tensorboard_log_dir(config)
    logger.info("TensorBoard logs in %s", log_dir)
    return [models.ContinuousTensorBoard(log_dir=log_dir, write_graph=False)]


def cosine_schedule(train_config, initial_rate=None):
    """Every method's schedule: cosine decay over the whole budget, from `learning_rate`."""
    total_steps = train_config.epochs * train_config.steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_rate if initial_rate is not None else train_config.learning_rate, max(total_steps, 1))


def restart_schedule(train_config):
    """What `train.restart_schedule` gives a method that is not HTG: a cosine over the first
    `warmup_epochs`, then a fresh one from `learning_rate` over the rest — the warm restart HTG's
    game gets, without the game, so that the two can be compared fairly."""
    first = train_config.warmup_epochs * train_config.steps_per_epoch
    rest = (train_config.epochs - train_config.warmup_epochs) * train_config.steps_per_epoch
    if first < 1 or rest < 1:
        raise ValueError(
            "`train.restart_schedule` restarts the learning rate after `train.warmup_epochs`, so it needs "
            f"0 < warmup_epochs < epochs. Received: warmup_epochs={train_config.warmup_epochs}, "
            f"epochs={train_config.epochs}")
    return keras.optimizers.schedules.CosineDecayRestarts(
        train_config.learning_rate, first_decay_steps=first, t_mul=rest / first, m_mul=1.0)


def optimizer_factory(train_config, rate_multipliers=None):
    """`learning_rate -> optimizer`: `train.optimizer` with the config's settings (`make_optimizer`).

    Every method gets its optimizers from here (HTG calls it once per player), so that a setting
    such as `train.momentum` means the same for all of them.

    Args:
        train_config: a `TrainConfig`.
        rate_multipliers: `{variable path: multiplier}`, e.g. a slower pretrained backbone.
    """
    return functools.partial(
        models.make_optimizer, train_config.optimizer, beta_1=train_config.beta_1,
        beta_2=train_config.beta_2, momentum=train_config.momentum,
        weight_decay=train_config.weight_decay or None, rate_multipliers=rate_multipliers)


def make_optimizer(train_config, rate_multipliers=None):
    """`train_config.optimizer` on `cosine_schedule(train_config)` (or `restart_schedule`)."""
    schedule = restart_schedule(train_config) if train_config.restart_schedule else cosine_schedule(train_config)
    return optimizer_factory(train_config, rate_multipliers)(schedule)


@contextlib.contextmanager
def dtype_policy(mixed_precision):
    """Sets Keras's global dtype policy to mixed_bfloat16 for the block, then restores it."""
    previous = keras.config.dtype_policy()
    if mixed_precision:
        keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# What the trainers read of a batch (ViewGAN also reads the view).
TRAINING_KEYS = ("image", "label", "view")


def training_dataset(config, train_set, start=0):
    """The infinite P×K class-balanced stream that every method trains on, from batch `start`.

    Its batches keep only `TRAINING_KEYS`: under a `tf.distribute` strategy, Keras's `fit`
    averages every tensor of the first batch across replicas to build the model
    (`_maybe_symbolic_build`, Keras 3.15), which fails on the boolean `is_stock` column
    ("AddN … bool").
    """
    augment = fg_data.Augment.standard() if config.data.augment else None
    stream = train_set.class_balanced_dataset(
        classes_per_batch=config.train.classes_per_batch,
        images_per_class=config.train.images_per_class,
        image_size=config.data.image_size, seed=config.train.seed, augment=augment, start=start,
    )
    return stream.map(lambda batch: {key: batch[key] for key in TRAINING_KEYS if key in batch})


DISTRIBUTIONS = ("none", "mirrored", "multi_worker")


@functools.cache
def distribution_strategy(kind):
    """The `tf.distribute` strategy that `train.distribute` names, one per process and kind.

    "mirrored" replicates over the logical GPUs, or the logical CPUs where there is no GPU
    (a CPU split with `tf.config.set_logical_device_configuration` stands in for GPUs);
    "multi_worker" reads the cluster from `TF_CONFIG`. A strategy is made once per process:
    two over the same devices would reuse the same collective keys.
    """
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"`train.distribute` must be one of {DISTRIBUTIONS}. Received: {kind!r}")
    if kind == "none":
        return tf.distribute.get_strategy()
    if kind == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError("train.distribute=multi_worker needs TF_CONFIG (the cluster and this worker's task); "
                             "see docs/scale_out.md")
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


def backup_settings(train_config):
    """`{backup_dir, backup_every_steps}` of `fgkeras.models.fit_resumable`, from `train.backup_*`."""
    return {"backup_dir": train_config.backup_dir, "backup_every_steps": train_config.backup_every_steps}


def train(config, train_set=None, verbose="auto", callbacks=None):
    """Trains the configured method; returns `(model, history)`.

    A NaN or infinite loss of any player stops it with a `NonFiniteLossError` that names the
    player and the step (`fgkeras.models.StopOnNonFiniteLoss`).

    With `train.backup_dir`, a run killed at any point and started again with the same
    arguments resumes from its last checkpoint and ends with the weights of a run never
    stopped (`fgkeras.models.fit_resumable`; HTG resumes in the phase it was killed in).

    `train.validation_classes` of the training classes are held out of the training stream
    (`validation_split`) and the model is selected on them (`selection_callbacks`): the
    history has their `val_recall@K` and `val_map@r`, and with `train.restore_best` the model
    returned has the weights of its best epoch.

    Args:
        config: an `ExperimentConfig`.
        train_set: the training ImageSet; loaded from `config.data` when None.
        callbacks: more Keras callbacks; they run after the evaluation (and after TensorBoard,
            with `train.tensorboard`), so they can monitor `val_recall@1`.

    Everything is built and fitted in the scope of `distribution_strategy(train.distribute)`.
    """
    with distribution_strategy(config.train.distribute).scope():
        return _train(config, train_set, verbose, callbacks)


def _train(config, train_set, verbose, callbacks):
    guard = models.StopOnNonFiniteLoss()  # a diverging player stops the run, naming itself
    if config.train.method == "viewgan":  # G on view pairs of the synthetic vehicles (#14)
        from fgkeras.evaluation.viewgan import train_viewgan
        return train_viewgan(config, verbose=verbose,
                             callbacks=[guard, *tensorboard_callbacks(config), *(callbacks or [])])
    if train_set is None:
        train_set, _ = load_data(config.data)
    train_set, validation_set = validation_split(train_set, config.train.validation_classes, config.train.seed)
    callbacks = [guard, *selection_callbacks(config, validation_set), *tensorboard_callbacks(config),
                 *(callbacks or [])]
    keras.utils.set_random_seed(config.train.seed)
    if config.train.method == "fggan":
        return _train_fggan(config, train_set, verbose, callbacks)
    if config.train.method == "htg":
        return _train_htg(config, train_set, verbose, callbacks)
    with dtype_policy(config.train.mixed_precision):
        model = build_model(config, num_classes=train_set.num_classes)
        model.compile(optimizer=make_optimizer(config.train, backbone_rate_multipliers(config.train, model.embedder)))
        history = models.fit_resumable(
            model, functools.partial(training_dataset, config, train_set), epochs=config.train.epochs,
            steps_per_epoch=config.train.steps_per_epoch, verbose=verbose, callbacks=callbacks,
            **backup_settings(config.train))
    return model, history


def _train_htg(config, train_set, verbose, callbacks):
    """HTG's recipe: the basic model, then the adversarial game (`fgkeras.models.train_htg`)."""
    budget = config.train
    game_epochs = budget.epochs - budget.warmup_epochs
    if game_epochs < 1:
        raise ValueError(
            "HTG needs `train.epochs` > `train.warmup_epochs` (the game gets the difference). "
            f"Received: epochs={budget.epochs}, warmup_epochs={budget.warmup_epochs}"
        )
    warmup_steps = budget.warmup_epochs * budget.steps_per_epoch
    if budget.decay_epochs:  # the paper's step decay, phase by phase
        warmup_rate, game_rate = budget.warmup_learning_rate, budget.learning_rate
    elif budget.restart_schedule:  # a cosine per phase, each from its full rate
        warmup_rate = keras.optimizers.schedules.CosineDecay(budget.warmup_learning_rate, max(warmup_steps, 1))
        game_rate = keras.optimizers.schedules.CosineDecay(budget.learning_rate, game_epochs * budget.steps_per_epoch)
    else:  # the baselines' cosine over the whole budget: the basic model, then the game, on it
        warmup_rate = cosine_schedule(budget, budget.warmup_learning_rate)
        game_rate = models.ShiftedSchedule(cosine_schedule(budget), warmup_steps)
    # One History for both phases: both phases' figures end up in `game.history`.
    history = keras.callbacks.History()
    with dtype_policy(budget.mixed_precision):
        embedder = build_embedder(config)
        game = models.train_htg(
            embedder, functools.partial(training_dataset, config, train_set), train_set.num_classes,
            warmup_epochs=budget.warmup_epochs, epochs=game_epochs, steps_per_epoch=budget.steps_per_epoch,
            warmup_learning_rate=warmup_rate, learning_rate=game_rate,
            optimizer=optimizer_factory(budget, backbone_rate_multipliers(budget, embedder)),
            decay_epochs=budget.decay_epochs, warmup_triplets=budget.warmup_triplets, kpm=config.model.kpm,
            kpm_levels=tuple(config.model.kpm_levels.split(",")), margin=budget.margin, mu=budget.mu,
            beta=budget.beta, gamma=budget.gamma, triplets=budget.triplets, seed=budget.seed,
            verbose=verbose, callbacks=[*(callbacks or []), history], **backup_settings(budget),
        )
    return game, history


def pretrained_semantic(config, train_set, verbose="auto"):
    """FGGAN's S and its no-bias softmax head, pre-trained on `train_set`'s real images (#13).

    The weights are cached under `fggan.cache_dir`, in a folder named by a hash of everything
    they depend on (data, model, pre-training steps and rate, batch shape, seed, the training
    set's size and classes), so that every variant and every run with the same data and seed
    starts from the same S, trained once. Returns `(semantic, classifier)`.
    """
    import hashlib

    from fgkeras import _files
    from fgkeras.layers import NoBiasDense

    settings, budget = config.fggan, config.train
    recipe = {"data": config.to_dict()["data"], "model": config.to_dict()["model"], "steps": settings.pretrain_steps,
              "learning_rate": settings.pretrain_learning_rate, "seed": budget.seed,
              "batch": [budget.classes_per_batch, budget.images_per_class],
              "train_set": [len(train_set), train_set.num_classes]}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(settings.cache_dir, digest)
    semantic = build_embedder(config)
    classifier = NoBiasDense(train_set.num_classes, name="classifier")
    classifier.build((None, semantic.embedding_dim))
    if os.path.isfile(os.path.join(folder, "classifier.npy")):
        logger.info("FGGAN: S from the cache %s", folder)
        semantic.load_weights(os.path.join(folder, "semantic.weights.h5"))
        classifier.kernel.assign(np.load(os.path.join(folder, "classifier.npy")))
        return semantic, classifier
    trained = models.fggan.pretrain_semantic(
        semantic, training_dataset(config, train_set), train_set.num_classes, settings.pretrain_steps,
        optimizer=models.make_optimizer("adam", settings.pretrain_learning_rate), verbose=verbose)
    classifier.kernel.assign(trained.kernel)
    os.makedirs(settings.cache_dir, exist_ok=True)
    temporary = _files.make_temp_dir(settings.cache_dir, f".{digest}-")
    semantic.save_weights(os.path.join(temporary, "semantic.weights.h5"))
    np.save(os.path.join(temporary, "classifier.npy"), np.asarray(classifier.kernel))
    _files.fsync_tree(temporary)
    try:
        os.rename(temporary, folder)
    except OSError:  # another run cached the same S first: keep its copy
        import shutil

        shutil.rmtree(temporary, ignore_errors=True)
    _files.fsync_dir(settings.cache_dir)
    return semantic, classifier


def fggan_pairs(config, train_set):
    """The stream of (user photo, canonical photo) pairs that FGGAN's game fits on.

    `fgkeras.data.canonical_pairs` of `train_set` in global batches of `train.classes_per_batch`
    × `train.images_per_class` pairs, canonical view `fggan.canonical_view`, seeded by `train.seed`.
    """
    return fg_data.canonical_pairs(
        train_set, batch_size=config.train.classes_per_batch * config.train.images_per_class,
        canonical_view=config.fggan.canonical_view, image_size=config.data.image_size, seed=config.train.seed)


def _train_fggan(config, train_set, verbose, callbacks):
    """FGGAN (#13): the cached pre-trained S, then the game on (user photo, canonical photo) pairs."""
    budget, settings = config.train, config.fggan
    with dtype_policy(budget.mixed_precision):
        semantic, classifier = pretrained_semantic(config, train_set, verbose)
        game = models.build_fggan(
            semantic, train_set.num_classes, config.data.image_size, variant=budget.variant,
            base_width=settings.width, skips=settings.generator_skips, residual=settings.generator_residual,
            classifier=classifier, recon_layer=settings.recon_layer, lam=settings.lam,
            semantic_weight=settings.semantic_weight, positive_pair=settings.positive_pair, feature=settings.feature)
        factory = optimizer_factory(budget)
        rates = {player: budget.learning_rate for player in game.players}
        if settings.semantic_learning_rate and "semantic" in rates:
            rates["semantic"] = settings.semantic_learning_rate
        game.compile(**{f"{player[0]}_optimizer": factory(rate) for player, rate in rates.items()})
        pairs = fggan_pairs(config, train_set)
        models.fggan.pretrain_generator(game.generator, pairs, settings.generator_warmup_steps,
                                        optimizer=factory(budget.learning_rate), verbose=verbose)
        history = models.fit_resumable(game, pairs, epochs=budget.epochs, steps_per_epoch=budget.steps_per_epoch,
                                       verbose=verbose, callbacks=callbacks, **backup_settings(budget))
    return game, history


def evaluate(embedder, test_set, config):
    """Retrieval metrics of `embedder` on `test_set` (leave-one-out over its images)."""
    dataset = test_set.as_dataset(image_size=config.data.image_size, batch_size=config.eval.batch_size)
    arrays = evaluation.embed_dataset(embedder, dataset)
    return evaluation.retrieval_metrics(arrays["embeddings"], arrays["label"])


def train_and_evaluate(config, method, train_set, test_set, verbose="auto"):
    """Trains `method` with `config`'s data, backbone and budget; returns `(row, model)`.

    The row is `{"method": method, "train_seconds": ..., **retrieval_metrics}` on the
    test classes. With `train.tensorboard` each method logs in its own `<log_dir>/<method>`, and
    with `train.backup_dir` each checkpoints in its own `<backup_dir>/<method>`.
    """
    method_config = ExperimentConfig.from_dict(config.to_dict())
    method_config.train.method = method
    if method_config.train.tensorboard:  # one TensorBoard run per method of the comparison
        method_config.train.log_dir = os.path.join(tensorboard_log_dir(config), method)
    if method_config.train.backup_dir:  # one backup folder per method: a resumed comparison finds each its own
        method_config.train.backup_dir = os.path.join(config.train.backup_dir, method)
    logger.info("training %s", method)
    start = time.perf_counter()
    model, _ = train(method_config, train_set=train_set, verbose=verbose)
    seconds = time.perf_counter() - start
    metrics = evaluate(model.embedder, test_set, method_config)
    return {"method": method, "train_seconds": int(round(seconds)), **metrics}, model


def compare(config, methods, train_set=None, test_set=None, verbose="auto"):
    """Trains each method with the same data, backbone and budget; returns rows of metrics."""
    if train_set is None or test_set is None:
        train_set, test_set = load_data(config.data)
    return [train_and_evaluate(config, method, train_set, test_set, verbose)[0] for method in methods]


def run_demo(config, out_dir, methods=("triplet_random", "triplet_batch_hard", "htg"), export=True,
             verbose="auto", export_method=None):
    """The demo: trains the baselines and HTG side by side, prints and saves a table, exports.

    Writes `results.json` (config, rows) and `results.md` (the table) in `out_dir`, each method's
    embedder as `embedders/<method>.keras` (what `fgkeras report` draws from; `results.json` names
    them under "embedders", and the best's under "embedder"), and with `export` the artefacts of
    the best method by Recall@1, or of `export_method` when given (see `export_artifacts`).
    Returns `(results, table)`.
    """
    os.makedirs(out_dir, exist_ok=True)
    train_set, test_set = load_data(config.data)
    rows, best, embedders = [], None, {}
    for method in methods:
        row, model = train_and_evaluate(config, method, train_set, test_set, verbose)
        rows.append(row)
        embedders[method] = save_embedder(model.embedder, out_dir, os.path.join("embedders", f"{method}.keras"))
        better = best is None or row["recall@1"] > best[0]["recall@1"]
        if method == export_method or (export_method is None and better):
            best = (row, model)
    table = evaluation.format_table(rows, keys=["method", *DEMO_METRICS, "train_seconds"])
    results = {"config": config.to_dict(), "rows": rows, "embedders": embedders,
               "embedder": embedders[best[0]["method"]]}
    if export:
        artefacts = export_artifacts(best[1].embedder, test_set, config, out_dir, name="vehicles")
        results["export"] = {"method": best[0]["method"], "pushed": artefacts["push"].pushed,
                             "reason": artefacts["push"].reason, "saved_model": artefacts["saved_model"],
                             "index": artefacts.get("index"), "tflite": artefacts.get("tflite"),
                             "tflite_parity": artefacts.get("tflite_parity")}
        if artefacts["push"].pushed:
            # A query from a class the gallery does not hold yet: a new arrival.
            query = next(iter(train_set.as_dataset(image_size=config.data.image_size)))["image"].numpy()
            results["served"] = serve_and_query(os.path.dirname(artefacts["saved_model"]),
                                                os.path.dirname(artefacts["index"]), query)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    return results, table


def save_embedder(embedder, out_dir, relative_path="embedder.keras"):
    """Saves `embedder` as `out_dir/relative_path` (a `.keras` file that loads after `import fgkeras`);
    returns `relative_path`, which is what a run's `results.json` records."""
    path = os.path.join(out_dir, relative_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    embedder.save(path)
    return relative_path


def gallery_ids(imageset):
    """String ids of an image set's items: file paths when it has them, else `<class>/<index>`."""
    if imageset.paths is not None:
        return [str(p) for p in imageset.paths]
    names = imageset.class_names
    return [f"{names[label] if names else label}/{i:06d}" for i, label in enumerate(imageset.labels)]


def export_artifacts(embedder, gallery, config, out_dir, name="fgkeras", flavour="exact", k=10,
                     tflite_modes=("fp32", "dynamic", "int8"), force=False):
    """Everything a deployment needs, from one trained embedder.

    Embeds `gallery`, evaluates it, builds an index of it, and writes under `out_dir`:
    `saved_models/<name>/<version>/` (embed + search signatures on image bytes, warmup
    requests, model card; pushed only if the blessing gate passes), `indexes/<name>/<version>/`
    (that version's own index of the gallery, which the gRPC server serves and updates; it records
    the model that made its vectors, and holds the items upserted live into an earlier version
    too, from the inventory's log), and
    `tflite/<name>/embedder_<mode>.tflite` with `parity.json`.

    Returns:
        dict with `push` (the `PushResult`), `metrics`, and the paths written.
    """
    from fgkeras import export, index

    dataset = gallery.as_dataset(image_size=config.data.image_size, batch_size=config.eval.batch_size)
    arrays = evaluation.embed_dataset(embedder, dataset)
    metrics = evaluation.retrieval_metrics(arrays["embeddings"], arrays["label"])
    gallery_index = index.ExactIndex().build(arrays["embeddings"], gallery_ids(gallery))
    root = os.path.join(out_dir, "saved_models", name)
    pushed = export.export_and_push(
        embedder, root, config.data.image_size, metrics, index=gallery_index, k=k, flavour=flavour,
        name=name, data=config.data, config=config, force=force,
    )
    result = {"push": pushed, "metrics": metrics, "saved_model": pushed.path}
    if not pushed.pushed:
        return result
    from fgkeras.serving.indexing import build_version_index

    version = int(os.path.basename(pushed.path))
    index_dir = os.path.join(out_dir, "indexes", name, str(version))
    build_version_index(pushed.path, gallery_index.ids.tolist(), gallery_index.embeddings, out=index_dir,
                        gallery=f"{len(gallery)} images of {config.data.source} ({config.data.test_split})")
    result["index"] = index_dir
    if tflite_modes:
        tflite_dir = os.path.join(out_dir, "tflite", name)
        os.makedirs(tflite_dir, exist_ok=True)
        # int8 is calibrated on images that its parity figures never see: 128 for calibration, up to 256 others.
        order = np.random.default_rng(0).permutation(len(gallery))[:384]
        calibration, held_out = gallery.subset(order[:len(order) // 3]), gallery.subset(order[len(order) // 3:])

        def images_of(subset):
            return np.stack([x["image"].numpy() for x in subset.as_dataset(image_size=config.data.image_size)])

        paths = export.export_tflite_variants(embedder, tflite_dir, config.data.image_size, images_of(calibration),
                                              modes=tflite_modes)
        parity = export.tflite_parity(embedder, paths, images_of(held_out), held_out.labels,
                                      saved_model=pushed.path)
        with open(os.path.join(tflite_dir, "parity.json"), "w") as f:
            json.dump(parity, f, indent=2, default=float)
        result["tflite"] = paths
        result["tflite_parity"] = parity
    return result


def serve_and_query(model_root, index_root, image, k=5):
    """Starts the gRPC server on a free loopback port, queries it with the client, stops it.

    `image` (uint8, H×W×3) is searched, upserted under the id "new-arrival" and searched
    again: a growing inventory must find the new item first at once.
    Returns the address and both answers.
    """
    from fgkeras import serving

    server = serving.serve(model_root, port=0, index_dir=index_root)
    try:
        with serving.Client(server.address) as client:
            ids, scores = client.search([image], k=k)
            client.upsert(["new-arrival"], images=[image])
            after, after_scores = client.search([image], k=k)
    finally:
        server.stop()
    return {"address": server.address,
            "top_ids": [str(i) for i in ids[0]], "top_scores": [float(x) for x in scores[0]],
            "top_ids_after_upsert": [str(i) for i in after[0]],
            "top_scores_after_upsert": [float(x) for x in after_scores[0]]}
