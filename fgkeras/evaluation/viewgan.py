"""ViewGAN experiments from a configuration: data, training, evaluation, demo (#14).

`train_viewgan(config)` is what `fgkeras.experiments.train` runs for `train.method="viewgan"`;
`evaluate_viewgan` gives the identity-preservation rows (with view accuracy and the
renderer-truth distance) and the few-shot rows; `run_viewgan_demo` writes the view grid and
the few-shot table. ViewGAN needs the synthetic vehicles: the views and the renderer's truth.
"""

import json
import logging
import os

import keras
import numpy as np

from fgkeras.data import SyntheticVehicles
from fgkeras.data.views import front_views, render_views, steps_per_pass, view_pairs
from fgkeras.evaluation import identity
from fgkeras.models.resume import fit_resumable
from fgkeras.models.training import make_optimizer
from fgkeras.models.viewgan import build_viewgan

logger = logging.getLogger(__name__)


def _ints(text, name):
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"`{name}` must be comma-separated ints. Received: {name}={text!r}") from None


def viewgan_image_size(image_size):
    """The largest 4·2^d (16, 32, 64 …) <= `image_size`: G's sizes."""
    size = 16
    while size * 2 <= image_size:
        size *= 2
    return size


def viewgan_smoke(config):
    """Shrinks a ViewGAN experiment to about a minute on a laptop CPU (demo and `--smoke`)."""
    d, v, t = config.data, config.viewgan, config.train
    d.image_size, d.num_makes, d.models_per_make = 32, min(d.num_makes, 4), min(d.models_per_make, 4)
    v.instances_per_class, v.width, v.id_dim, v.noise_dim, v.batch_size = 6, 8, 32, 16, 16
    v.connection_scale = 0
    v.eval_classes, v.few_shot_classes, v.shots, v.per_image, v.repeats, v.classifier_steps = "8", 8, "5", 5, 2, 60
    t.epochs, t.steps_per_epoch = min(t.epochs, 3), min(t.steps_per_epoch, 20)
    return config


def viewgan_data(config):
    """`(vehicles, train_arrays, unseen_arrays)` for a config: every instance in every view.

    Raises: ValueError unless `data.source` is "synthetic".
    """
    if config.data.source != "synthetic":
        raise ValueError("ViewGAN needs the synthetic vehicles (views and the renderer's truth): "
                         f"`data.source` must be 'synthetic'. Received: {config.data.source!r}")
    d = config.data
    vehicles = SyntheticVehicles(seed=d.seed, image_size=viewgan_image_size(d.image_size), num_makes=d.num_makes,
                                 models_per_make=d.models_per_make, images_per_class=d.images_per_class,
                                 part_scale=d.part_scale, pose_jitter=d.pose_jitter, clutter=d.clutter,
                                 occlusion_prob=d.occlusion_prob)
    views = _ints(config.viewgan.views, "viewgan.views") or front_views(vehicles.num_views)
    n = config.viewgan.instances_per_class
    return (vehicles, render_views(vehicles, "train", views, n), render_views(vehicles, "unseen", views, n))


def build_from_config(config, num_classes, num_views, image_size):
    """The `ViewTransformGAN` of `train.variant` with the `viewgan` section's settings, compiled."""
    v = config.viewgan
    game = build_viewgan(num_classes, num_views, image_size, variant=config.train.variant,
                         connection_scale=v.connection_scale or None, id_dim=v.id_dim, noise_dim=v.noise_dim,
                         width=v.width, view_weight=v.view_weight, generator_steps=v.generator_steps,
                         discriminator_steps=v.discriminator_steps, seed=config.train.seed)
    game.compile(g_optimizer=make_optimizer("adam", v.learning_rate, beta_1=0.5),
                 d_optimizer=make_optimizer("adam", v.learning_rate, beta_1=0.5))
    return game


def training_pairs(config, arrays):
    """`(stream, arrays)`: the view pairs that `train_viewgan` fits on, and `arrays` with labels 0..K-1.

    `stream` is `view_pairs` of the relabelled arrays in global batches of `viewgan.batch_size`
    (at most the number of images), seeded by `train.seed`.
    """
    _, labels = np.unique(arrays["label"], return_inverse=True)
    arrays = {**arrays, "label": labels.astype(np.int32)}
    batch_size = min(config.viewgan.batch_size, len(labels))
    return view_pairs(arrays, batch_size, seed=config.train.seed), arrays


def train_viewgan(config, arrays=None, verbose="auto", callbacks=None):
    """Trains the configured ViewGAN on the train classes; returns `(game, history)`.

    The game is built and fitted in the scope of `train.distribute`'s strategy and under
    `train.mixed_precision`'s dtype policy, as every method of `fgkeras.experiments.train`.

    Args:
        config: an `ExperimentConfig` with `train.method="viewgan"`.
        arrays: `render_views` of the train split (made from `config` when None).
        verbose, callbacks: passed to `fit`.
    """
    from fgkeras import experiments

    if arrays is None:
        _, arrays, _ = viewgan_data(config)
    pairs, arrays = training_pairs(config, arrays)
    num_classes, batch_size = int(arrays["label"].max()) + 1, int(pairs.element_spec["label"].shape[0])
    steps = config.train.steps_per_epoch or steps_per_pass(arrays, batch_size)
    logger.info("ViewGAN %s: %d classes, %d views, %d images, %d epochs of %d steps", config.train.variant,
                num_classes, len(arrays["views"]), len(arrays["label"]), config.train.epochs, steps)
    with (experiments.distribution_strategy(config.train.distribute).scope(),
          experiments.dtype_policy(config.train.mixed_precision)):
        keras.utils.set_random_seed(config.train.seed)
        game = build_from_config(config, num_classes, len(arrays["views"]), arrays["image"].shape[1])
        history = fit_resumable(game, pairs, epochs=config.train.epochs, steps_per_epoch=steps, verbose=verbose,
                                callbacks=callbacks, backup_dir=config.train.backup_dir,
                                backup_every_steps=config.train.backup_every_steps)
    return game, history


def judges(config, train_arrays, unseen_arrays, epochs=5):
    """The two independent judges: the identity extractor (train classes) and the view classifier.

    The view classifier is trained on real images of both splits: it judges views, never classes.
    """
    extractor = identity.train_feature_extractor(train_arrays["image"], train_arrays["label"], epochs=epochs,
                                                 width=config.model.width, seed=config.train.seed)
    images = np.concatenate([train_arrays["image"], unseen_arrays["image"]])
    views = np.concatenate([train_arrays["view"], unseen_arrays["view"]])
    classifier = identity.train_view_classifier(images, views, len(train_arrays["views"]), epochs=epochs,
                                                seed=config.train.seed)
    return extractor, classifier


def evaluate_viewgan(game, config, unseen_arrays, extractor, view_classifier, few_shot=True):
    """`{"identity": rows, "few_shot": rows or None}` of a trained game on the unseen classes."""
    v = config.viewgan
    rows = identity.identity_preservation(game.transform, extractor, view_classifier, unseen_arrays,
                                          num_classes=_ints(v.eval_classes, "viewgan.eval_classes"),
                                          seed=config.train.seed)
    result = {"identity": rows, "few_shot": None}
    if few_shot:
        result["few_shot"] = identity.few_shot(
            lambda images: game.augment(images, per_image=v.per_image, seed=config.train.seed), unseen_arrays,
            num_classes=v.few_shot_classes, shots=_ints(v.shots, "viewgan.shots"), repeats=v.repeats,
            steps=v.classifier_steps, seed=config.train.seed)
    return result


def run_viewgan_demo(config, out_dir, verbose="auto"):
    """Trains a (smoke-sized) G, writes `view_grid.png`, `few_shot.md` and `results.json` in `out_dir`.

    Returns the results dict (identity and few-shot rows, file paths).
    """
    from fgkeras.viz import view_grid

    os.makedirs(out_dir, exist_ok=True)
    _, train_arrays, unseen_arrays = viewgan_data(config)
    game, _ = train_viewgan(config, train_arrays, verbose=verbose)
    extractor, classifier = judges(config, train_arrays, unseen_arrays, epochs=2)
    results = evaluate_viewgan(game, config, unseen_arrays, extractor, classifier)
    num_views = len(unseen_arrays["views"])
    first = np.flatnonzero(unseen_arrays["view"] == num_views // 2)[:4]  # front views of 4 unseen instances
    truth = np.stack([unseen_arrays["image"][i - unseen_arrays["view"][i] + np.arange(num_views)] for i in first])
    grid_path = os.path.join(out_dir, "view_grid.png")
    view_grid(game.transform, unseen_arrays["image"][first], range(num_views), grid_path, truth=truth)
    table = "\n\n".join([identity.format_identity_rows({config.train.variant: results["identity"]}),
                         identity.format_few_shot_rows(results["few_shot"])])
    with open(os.path.join(out_dir, "few_shot.md"), "w") as f:
        f.write(table + "\n")
    results.update(grid=grid_path, table=table)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({k: v for k, v in results.items() if k != "table"}, f, indent=2, default=float)
    return results


__all__ = ["build_from_config", "evaluate_viewgan", "judges", "run_viewgan_demo", "train_viewgan", "training_pairs",
           "viewgan_data", "viewgan_image_size", "viewgan_smoke"]
