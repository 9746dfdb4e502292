"""Multi-view image sets and view-pair batches from `SyntheticVehicles` (ViewGAN, #14).

`render_views` draws every instance of every class of a split in each of a subset of views
(the 5 front-facing azimuths by default, as the paper keeps front, front-left, front-right,
left and right of CompCars); `view_pairs` turns those arrays into infinite shuffled batches of
(image, label, view, target_view, target_image): the same instance seen from a random other
view of the subset, which the renderer draws exactly, so that G's output can be compared with
the truth. Views are indices into the subset (0 .. len(views) - 1), as G's view codes are.
"""

import numpy as np
import tensorflow as tf

from fgkeras.data.synthetic import SyntheticVehicles


def front_views(num_views):
    """The views of `num_views` evenly spaced azimuths within ±90° of the front (view 0).

    For 8 views: [6, 7, 0, 1, 2] (right, front-right, front, front-left, left, in azimuth
    order from -90° to +90°).
    """
    if not isinstance(num_views, int) or num_views < 2:
        raise ValueError(f"`num_views` must be an int >= 2. Received: num_views={num_views!r}")
    step = 360.0 / num_views
    signed = {view: (view * step + 180.0) % 360.0 - 180.0 for view in range(num_views)}
    return sorted((v for v, a in signed.items() if abs(a) <= 90.0 + 1e-9), key=lambda v: signed[v])


def _check_views(vehicles, views):
    views = front_views(vehicles.num_views) if views is None else [int(v) for v in views]
    if len(views) < 2 or len(set(views)) != len(views) or any(not 0 <= v < vehicles.num_views for v in views):
        raise ValueError(f"`views` must be >= 2 distinct azimuths in [0, {vehicles.num_views}). Received: views={views}")
    return views


def render_views(vehicles, split="train", views=None, instances_per_class=12, classes=None, stock=False):
    """Every (class, instance, view) of a split rendered: arrays for ViewGAN and its evaluation.

    Args:
        vehicles: a `SyntheticVehicles`.
        split: "train" (G's auxiliary set) or "unseen" (the evaluation's standard set).
        views: azimuths of `vehicles` to draw; `front_views(vehicles.num_views)` by default.
        instances_per_class: instances drawn per class (each in every view), >= 1.
        classes: class ids of the split to draw (all by default).
        stock: studio photos (plain background, no jitter) instead of user photos.
    Returns: a dict `image` (N, S, S, 3) uint8, `label` (N,) class ids, `view` (N,) indices into
    `views`, `instance` (N,), and `views` (the azimuths); ordered class, instance, view.
    """
    if not isinstance(vehicles, SyntheticVehicles):
        raise ValueError(f"`vehicles` must be a SyntheticVehicles. Received: {type(vehicles).__name__}")
    views = _check_views(vehicles, views)
    if not isinstance(instances_per_class, int) or instances_per_class < 1:
        raise ValueError(f"`instances_per_class` must be an int >= 1. Received: {instances_per_class!r}")
    ids = vehicles.classes(split) if classes is None else np.asarray(classes, dtype=np.int32)
    outside = sorted(set(ids.tolist()) - set(vehicles.classes(split).tolist()))
    if outside:
        raise ValueError(f"`classes` must be classes of the {split!r} split. Received: {outside[:5]}")
    records = [(int(c), i, j) for c in ids for i in range(instances_per_class) for j in range(len(views))]
    images = np.stack([vehicles.render(c, views[j], i, stock=stock) for c, i, j in records])
    return {"image": images, "label": np.array([r[0] for r in records], np.int32),
            "instance": np.array([r[1] for r in records], np.int32),
            "view": np.array([r[2] for r in records], np.int32), "views": list(views)}


def pair_indices(arrays, rng):
    """For each image, the index of the same instance in a uniformly random other view."""
    num_views = len(arrays["views"])
    # render_views orders images class, instance, view: the group of an image starts at
    # index - view, and its view j sits at start + j.
    offsets = rng.integers(1, num_views, size=len(arrays["view"]))
    targets = (arrays["view"] + offsets) % num_views
    return np.arange(len(targets)) - arrays["view"] + targets


def view_pairs(arrays, batch_size=32, seed=0, labels=None):
    """Infinite shuffled batches of view pairs for `ViewTransformGAN.fit`.

    Args:
        arrays: `render_views` output.
        batch_size: images per batch, >= 1.
        seed: seeds the shuffling and the target views (a new draw every pass).
        labels: optional mapping class id → training label (default: the class ids, which for
            the train split are already 0 .. K_train - 1).
    Returns: a `tf.data.Dataset` of dicts `image` (B, S, S, 3) float32, `label`, `view`,
    `target_view` int32 (B,), `target_image` (B, S, S, 3) float32: the renderer's truth.
    Each iteration of it gives the same stream (the draws start from `seed` every time), so a
    resumed run can start it at a batch index (`dataset.skip(n)`).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1. Received: batch_size={batch_size!r}")
    n = len(arrays["label"])
    label = arrays["label"] if labels is None else np.vectorize(labels.__getitem__, otypes=[np.int32])(arrays["label"])

    def passes():
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(n)
            partner = pair_indices(arrays, rng)
            for start in range(0, n - batch_size + 1, batch_size):
                index = order[start:start + batch_size]
                yield {"image": arrays["image"][index].astype(np.float32), "label": label[index],
                       "view": arrays["view"][index], "target_view": arrays["view"][partner[index]],
                       "target_image": arrays["image"][partner[index]].astype(np.float32)}

    if n < batch_size:
        raise ValueError(f"`batch_size` must be <= the {n} images. Received: batch_size={batch_size}")
    size = arrays["image"].shape[1]
    signature = {"image": tf.TensorSpec((batch_size, size, size, 3), tf.float32),
                 "label": tf.TensorSpec((batch_size,), tf.int32), "view": tf.TensorSpec((batch_size,), tf.int32),
                 "target_view": tf.TensorSpec((batch_size,), tf.int32),
                 "target_image": tf.TensorSpec((batch_size, size, size, 3), tf.float32)}
    return tf.data.Dataset.from_generator(passes, output_signature=signature).prefetch(2)


def steps_per_pass(arrays, batch_size):
    """Whole batches in one pass over `arrays`."""
    return max(len(arrays["label"]) // batch_size, 1)


__all__ = ["front_views", "pair_indices", "render_views", "steps_per_pass", "view_pairs"]
