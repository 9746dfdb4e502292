"""FGGAN's training pairs (x_r, x_c): a user photo in any view and a stock photo of its class
in the canonical view (Alg. 1's "N pairs of training data {x_r, x_c}").

Any `ImageSet` with view labels and stock flags gives them: `SyntheticVehicles` (whose stock
photos are rendered at its `stock_view`) or a CSV with `view` and `is_stock` columns
(`read_csv`). An image folder has neither, and is refused.
"""

import logging

import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)


def _check_views(imageset):
    if imageset.views is None or imageset.is_stock is None:
        missing = [name for name, column in (("view", imageset.views), ("is_stock", imageset.is_stock))
                   if column is None]
        raise ValueError(
            "FGGAN's pairs need each image's view and whether it is a stock photo, and this image set has "
            f"no {' and no '.join(repr(m) for m in missing)} column (an image folder has neither): use a CSV "
            "with `view` and `is_stock` columns (`fgkeras.data.read_csv`) or `SyntheticVehicles`. "
            f"Received: {imageset!r}")


def canonical_rows(imageset, canonical_view=0):
    """Rows of the stock photos in the canonical view, by class: `{label: rows}`.

    Raises a `ValueError` naming the views the stock photos have when none has `canonical_view`.
    """
    _check_views(imageset)
    canonical = imageset.is_stock & (imageset.views == canonical_view)
    if not canonical.any():
        stock_views = sorted(int(v) for v in np.unique(imageset.views[imageset.is_stock]))
        raise ValueError(
            f"No stock image has the canonical view {canonical_view}: the stock images' views are {stock_views} "
            f"(none if empty). Received: canonical_view={canonical_view}")
    rows = np.flatnonzero(canonical)
    return {int(label): rows[imageset.labels[rows] == label] for label in np.unique(imageset.labels[rows])}


class _PairSampler:
    """Index triples (x_r, x_c, x_p): a user photo, a canonical photo of its class, and another."""

    def __init__(self, imageset, canonical_view, seed):
        self.canonical = canonical_rows(imageset, canonical_view)
        users = np.flatnonzero(~imageset.is_stock)
        keep = np.isin(imageset.labels[users], list(self.canonical))
        dropped = np.unique(imageset.labels[users[~keep]])
        if len(dropped):
            logger.warning("FGGAN pairs: %d classes have user photos but no stock photo in view %d; their "
                           "user photos are left out (e.g. classes %s)", len(dropped), canonical_view,
                           dropped[:5].tolist())
        self.users = users[keep]
        if not len(self.users):
            raise ValueError(
                f"No user photo (is_stock false) has a stock photo of its class in the canonical view "
                f"{canonical_view}: FGGAN has no pairs to train on. Received: {imageset!r}")
        self.labels = imageset.labels
        self.seed = seed

    def __call__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            for user in rng.permutation(self.users):
                rows = self.canonical[int(self.labels[user])]
                first = int(rng.integers(len(rows)))
                # Another canonical photo of the class: the positive partner of x_c (itself if alone).
                other = first if len(rows) == 1 else (first + 1 + int(rng.integers(len(rows) - 1))) % len(rows)
                yield np.array([user, rows[first], rows[other]], dtype=np.int64)


def canonical_pairs(imageset, batch_size=32, canonical_view=0, image_size=None, seed=0, drop_remainder=True):
    """An infinite, shuffled stream of FGGAN batches from an image set with views and stock flags.

    Each element pairs a user photo x_r (any view) with a stock photo x_c of its class in
    `canonical_view`, drawn at random among the class's, and another one, x_p (N's positive
    partner of x_c; x_c itself when the class has only one). Every user photo is used once per
    pass, in a new order each pass.

    Args:
        imageset: an `ImageSet` with `views` and `is_stock` (`SyntheticVehicles.imageset`,
            `read_csv` of a CSV with `view` and `is_stock` columns).
        batch_size: pairs per batch.
        canonical_view: the view id of the canonical photos (0, the front, for `SyntheticVehicles`).
        image_size: side of the square images (resized and padded), or None to keep the stored size.
        seed: seeds the order and the draws.
        drop_remainder: keep every batch full (the stream is infinite, so only the pass ends).
    Returns: a `tf.data.Dataset` of dicts `image` (x_r), `canonical` (x_c), `positive` (x_p),
    uint8 (batch, S, S, 3), and `label` int32 (batch,) — what `ViewNormalizingGAN` trains on.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
    sampler = _PairSampler(imageset, canonical_view, seed)
    load = imageset._loader(image_size, None)
    rows = tf.data.Dataset.from_generator(sampler, output_signature=tf.TensorSpec((3,), tf.int64))

    def pair(indices):
        real, canonical, positive = (load(indices[i]) for i in range(3))
        return {"image": real["image"], "canonical": canonical["image"], "positive": positive["image"],
                "label": real["label"]}

    return (rows.map(pair, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE))


__all__ = ["canonical_rows", "canonical_pairs"]
