"""`ImageSet`: a table of labelled images, and the tf.data pipelines built from it.

Every pipeline yields dicts of tensors:

- `image`: uint8 (H, W, 3) (models rescale inside);
- `label`: int32 class id;
- `view`, `year` (int32) and `is_stock` (bool) when the set knows them.

Files are decoded by the same TensorFlow op everywhere (`decode_image`), so a file that
passes `ImageSet.validate()` also decodes inside the pipeline and in an exported model.
"""

import dataclasses
import logging
import os
import re

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

_OPTIONAL_INT_COLUMNS = ("views", "years")
_ELEMENT_KEYS = {"views": "view", "years": "year", "is_stock": "is_stock"}
_SHOW_BAD_FILES = 3
_PROGRESS_MIN_FILES = 1000


class ImageDecodeError(ValueError):
    """An image file is missing or cannot be decoded.

    Attributes:
        corrupt: list of `CorruptImage` (every unreadable file found, not only the first).
    """

    def __init__(self, corrupt, total):
        self.corrupt = list(corrupt)
        first = self.corrupt[0]
        message = f"cannot decode image '{first.path}': {first.reason}"
        if len(self.corrupt) > 1:
            others = ", ".join(f"'{c.path}'" for c in self.corrupt[1:_SHOW_BAD_FILES + 1])
            more = len(self.corrupt) - 1 - _SHOW_BAD_FILES
            message += (
                f" ({len(self.corrupt)} of {total} images are unreadable; also {others}"
                + (f" and {more} more" if more > 0 else "")
                + ")"
            )
        message += ". Pass skip_corrupt=True to skip unreadable images (they are counted and logged)."
        super().__init__(message)

    @property
    def paths(self):
        return [c.path for c in self.corrupt]


@dataclasses.dataclass(frozen=True)
class CorruptImage:
    """One unreadable image file: its path and why it could not be decoded."""

    path: str
    reason: str


def decode_image(contents):
    """Decodes encoded image bytes (JPEG, PNG, GIF, BMP, WebP) to uint8 (H, W, 3).

    Grayscale is replicated to 3 channels, alpha is dropped, an animated GIF gives its
    first frame. The same op runs in `ImageSet` pipelines and in exported signatures.
    """
    return tf.io.decode_image(contents, channels=3, expand_animations=False)


def resize_and_pad(image, image_size):
    """Resizes a uint8 (H, W, 3) image to (image_size, image_size, 3) keeping its aspect ratio.

    The longer side is scaled to `image_size`; the shorter side is centred and padded with
    zeros (black), so a car is never stretched. Bilinear with antialiasing; returns uint8.
    """
    resized = tf.image.resize_with_pad(image, image_size, image_size, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def to_supervised(dataset):
    """Maps dict elements (batched or not) to `(image, label)` tuples for a plain `fit`."""
    return dataset.map(
        lambda element: (element["image"], element["label"]),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ImageSet:
    """A table of labelled images, in memory (`images`) or on disk (`paths`).

    Args:
        labels: (N,) integer class ids >= 0 (stored as int32). They index `class_names`.
        images: (N, H, W, 3) uint8 images in memory.
        paths: (N,) image file paths (anything `tf.io.read_file` opens). Exactly one of
            `images` or `paths` is given.
        views: optional (N,) integer view ids (stored as int32).
        years: optional (N,) integer release years (stored as int32).
        is_stock: optional (N,) bool, True for clean catalogue ("stock") photos.
        class_names: optional list of names, `class_names[label]` names class `label`.

    Subsets keep the label space: `subset` and `split_by_classes` never renumber labels.
    """

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: np.ndarray | None = None
    views: np.ndarray | None = None
    years: np.ndarray | None = None
    is_stock: np.ndarray | None = None
    class_names: list[str] | None = None

    def __post_init__(self):
        labels = _integer_column("labels", self.labels)
        num = len(labels)
        if labels.size and labels.min() < 0:
            raise ValueError(f"`labels` must be >= 0. Received a label of {labels.min()}")
        object.__setattr__(self, "labels", labels)

        if (self.images is None) == (self.paths is None):
            raise ValueError(
                "Exactly one of `images` or `paths` must be given. Received "
                f"images={'None' if self.images is None else 'an array'}, "
                f"paths={'None' if self.paths is None else 'an array'}"
            )
        if self.images is not None:
            images = np.asarray(self.images)
            if images.dtype != np.uint8:
                raise ValueError(f"`images` must be uint8. Received dtype {images.dtype}")
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"`images` must have shape (N, H, W, 3). Received shape {images.shape}")
            _check_length("images", images, num)
            object.__setattr__(self, "images", images)
        else:
            object.__setattr__(self, "paths", _path_column(self.paths, num))

        for name in _OPTIONAL_INT_COLUMNS:
            value = getattr(self, name)
            if value is not None:
                value = _integer_column(name, value)
                _check_length(name, value, num)
                object.__setattr__(self, name, value)
        if self.is_stock is not None:
            object.__setattr__(self, "is_stock", _bool_column(self.is_stock, num))

        if self.class_names is not None:
            names = [str(name) for name in self.class_names]
            if labels.size and labels.max() >= len(names):
                raise ValueError(
                    f"`class_names` has {len(names)} names but `labels` go up to {labels.max()}"
                )
            object.__setattr__(self, "class_names", names)
        # path -> reason for every unreadable file, or None before `validate()` ran.
        object.__setattr__(self, "_corrupt", None)

    def __len__(self):
        return len(self.labels)

    def __repr__(self):
        source = (
            f"images={self.images.shape[1]}x{self.images.shape[2]}"
            if self.images is not None
            else "paths"
        )
        extras = [name for name in ("views", "years", "is_stock") if getattr(self, name) is not None]
        return (
            f"ImageSet(size={len(self)}, classes={len(self.classes)}, {source}"
            + (f", with={extras}" if extras else "")
            + ")"
        )

    @property
    def num_classes(self):
        """Size of the label space: `len(class_names)` when known, else `max(labels) + 1`."""
        if self.class_names is not None:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if len(self) else 0

    @property
    def classes(self):
        """Sorted distinct labels present in this set."""
        return np.unique(self.labels)

    def subset(self, indices_or_mask):
        """Returns the rows selected by an integer index array or a boolean mask of length N."""
        selector = np.asarray(indices_or_mask)
        if selector.dtype == bool:
            if selector.shape != (len(self),):
                raise ValueError(
                    f"A boolean mask must have shape ({len(self)},). Received shape {selector.shape}"
                )
            selector = np.flatnonzero(selector)
        elif selector.size == 0:
            selector = np.zeros((0,), np.int64)
        elif not np.issubdtype(selector.dtype, np.integer) or selector.ndim != 1:
            raise ValueError(
                "`indices_or_mask` must be a 1-D integer index array or a boolean mask. "
                f"Received dtype {selector.dtype}, shape {selector.shape}"
            )
        elif selector.min() < 0 or selector.max() >= len(self):
            raise ValueError(
                f"`indices_or_mask` indices must be in [0, {len(self)}). "
                f"Received values in [{selector.min()}, {selector.max()}]"
            )

        def take(column):
            return None if column is None else column[selector]

        result = dataclasses.replace(
            self,
            labels=self.labels[selector],
            images=take(self.images),
            paths=take(self.paths),
            views=take(self.views),
            years=take(self.years),
            is_stock=take(self.is_stock),
        )
        if self._corrupt is not None:
            kept = set(result.paths.tolist())
            object.__setattr__(
                result, "_corrupt", {p: r for p, r in self._corrupt.items() if p in kept}
            )
        return result

    def split_by_classes(self, classes):
        """Keeps the samples whose label is in `classes` (labels are not renumbered)."""
        classes = np.asarray(list(classes))
        if classes.size and not np.issubdtype(classes.dtype, np.integer):
            raise ValueError(f"`classes` must be integer class ids. Received dtype {classes.dtype}")
        return self.subset(np.isin(self.labels, classes))

    def relabeled(self):
        """This set with its present classes renumbered 0..K-1 (in label order).

        `class_names` keeps the names of the present classes; use it after `split_by_classes`
        when a head needs exactly K outputs.
        """
        classes, labels = np.unique(self.labels, return_inverse=True)
        names = None if self.class_names is None else [self.class_names[c] for c in classes]
        result = dataclasses.replace(self, labels=labels.astype(np.int32), class_names=names)
        object.__setattr__(result, "_corrupt", self._corrupt)
        return result

    def validate(self, skip_corrupt=False):
        """Checks that every image file exists and decodes; the result is cached.

        Decoding uses the pipeline's own op (`decode_image`) in a parallel tf.data pass,
        with a progress bar for large sets. In-memory sets are always valid.

        Args:
            skip_corrupt: if False, raise `ImageDecodeError` naming the unreadable files.
        Returns:
            The list of `CorruptImage` (empty when every file decodes).
        """
        if self.paths is None:
            return []
        if self._corrupt is None:
            object.__setattr__(self, "_corrupt", _find_corrupt(self.paths))
        corrupt = [CorruptImage(path, reason) for path, reason in self._corrupt.items()]
        if corrupt and not skip_corrupt:
            raise ImageDecodeError(corrupt, total=len(self))
        return corrupt

    def as_dataset(
        self,
        image_size=None,
        batch_size=None,
        shuffle=False,
        seed=None,
        augment=None,
        repeat=False,
        skip_corrupt=False,
        drop_remainder=False,
    ):
        """A tf.data pipeline over the set, one dict per image (batched if `batch_size`).

        Args:
            image_size: side of the square output; images are resized keeping their aspect
                ratio and padded (`resize_and_pad`). None keeps the stored size (required for
                batching files of different sizes).
            batch_size: batch size, or None for single elements.
            shuffle: shuffle the rows (a full shuffle of the index, reshuffled each epoch).
            seed: seeds the shuffle and the augmentation; None for a fresh random order.
            augment: an `Augment` applied to each image after resizing, or None.
            repeat: repeat indefinitely.
            skip_corrupt: skip unreadable files (counted and logged) instead of raising
                `ImageDecodeError`.
            drop_remainder: drop the last incomplete batch.
        """
        _check_optional_positive_int("image_size", image_size)
        _check_optional_positive_int("batch_size", batch_size)
        table = self._readable(skip_corrupt)
        if batch_size is not None and image_size is None and table.paths is not None:
            raise ValueError(
                "`image_size` is required to batch images read from files (their sizes vary). "
                f"Received image_size=None, batch_size={batch_size}"
            )
        load = table._loader(image_size, augment)

        indices = tf.data.Dataset.range(len(table))
        if shuffle:
            indices = indices.shuffle(max(len(table), 1), seed=seed, reshuffle_each_iteration=True)
        if repeat:
            indices = indices.repeat()
        if augment is None:
            dataset = indices.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        else:
            dataset = tf.data.Dataset.zip(indices, tf.data.Dataset.random(seed=seed)).map(
                lambda index, draw: load(index, tf.stack([draw, tf.constant(0, tf.int64)])),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        if batch_size is not None:
            dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
        return dataset.prefetch(tf.data.AUTOTUNE)

    def class_balanced_dataset(
        self,
        classes_per_batch,
        images_per_class,
        image_size=None,
        seed=0,
        augment=None,
        skip_corrupt=False,
        start=0,
    ):
        """An infinite stream of P×K batches: P distinct classes, K images of each.

        Batch `b` depends only on (`seed`, `b`), so the stream is reproducible, and the stream
        from batch `start` on is the end of the stream from 0 (a resumed run starts there). Within a
        batch the P classes are distinct and sampled uniformly; a class with at least K
        images gives K distinct images; a class with fewer gives all of its images plus
        random repeats (a single-image class gives K copies, with one warning). Elements
        are ordered class by class, so splitting a batch across replicas keeps whole classes
        when P is a multiple of the number of replicas.

        Args:
            classes_per_batch: P, number of distinct classes per batch.
            images_per_class: K, images per class.
            image_size: as in `as_dataset` (required for file-based sets).
            seed: integer seed of the sampling and the augmentation.
            augment: an `Augment` or None.
            skip_corrupt: as in `as_dataset`.
            start: the index of the first batch, >= 0.
        """
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise ValueError(f"`start` must be an integer >= 0. Received start={start!r}")
        for name, value in (("classes_per_batch", classes_per_batch), ("images_per_class", images_per_class)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer. Received {name}={value!r}")
        _check_optional_positive_int("image_size", image_size)
        if not isinstance(seed, (int, np.integer)):
            raise ValueError(f"`seed` must be an integer. Received seed={seed!r}")
        table = self._readable(skip_corrupt)
        if image_size is None and table.paths is not None:
            raise ValueError("`image_size` is required for images read from files. Received image_size=None")
        num_p, num_k = int(classes_per_batch), int(images_per_class)
        classes, counts = np.unique(table.labels, return_counts=True)
        if num_p > len(classes):
            raise ValueError(
                f"`classes_per_batch` must be <= the number of classes with images ({len(classes)}). "
                f"Received classes_per_batch={classes_per_batch} (images_per_class={images_per_class})"
            )
        singles = int(np.sum(counts == 1))
        if singles and num_k > 1:
            logger.warning(
                "%d of %d classes have a single image: each appears as %d identical copies "
                "in the P×K batches that draw it.",
                singles, len(classes), num_k,
            )
        sampler = _ClassBalancedSampler(table.labels, counts, num_p, num_k, seed)
        load = table._loader(image_size, augment)
        dataset = tf.data.Dataset.counter(int(start)).map(sampler).unbatch()
        if augment is None:
            dataset = dataset.map(lambda index, _: load(index), num_parallel_calls=tf.data.AUTOTUNE)
        else:
            dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.batch(num_p * num_k, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def _readable(self, skip_corrupt):
        """This set without its unreadable files (validating file-based sets first)."""
        corrupt = self.validate(skip_corrupt=skip_corrupt)
        if not corrupt:
            return self
        logger.warning(
            "Skipped %d of %d unreadable images (first: '%s': %s). "
            "ImageSet.validate(skip_corrupt=True) lists them all.",
            len(corrupt), len(self), corrupt[0].path, corrupt[0].reason,
        )
        return self.subset(~np.isin(self.paths, [c.path for c in corrupt]))

    def _loader(self, image_size, augment):
        """A function `(row index[, augmentation seed]) -> element dict` for tf.data."""
        columns = {
            key: tf.constant(getattr(self, name))
            for name, key in _ELEMENT_KEYS.items()
            if getattr(self, name) is not None
        }
        labels = tf.constant(self.labels)
        if self.paths is not None:
            source = tf.constant(self.paths)
            resize = image_size is not None
        else:
            source = tf.constant(self.images)
            resize = image_size is not None and self.images.shape[1:3] != (image_size, image_size)

        def load(index, seed=None):
            if self.paths is not None:
                image = decode_image(tf.io.read_file(tf.gather(source, index)))
            else:
                image = tf.gather(source, index)
            if resize:
                image = resize_and_pad(image, image_size)
            if augment is not None:
                image = augment(image, seed=seed)
            element = {"image": image, "label": tf.gather(labels, index)}
            element.update({key: tf.gather(column, index) for key, column in columns.items()})
            return element

        return load


class _ClassBalancedSampler:
    """Maps a batch number to the P×K row indices of that batch and K·P augmentation seeds."""

    def __init__(self, labels, counts, num_p, num_k, seed):
        order = np.argsort(labels, kind="stable")
        self.rows_by_class = tf.constant(order, tf.int64)
        self.offsets = tf.constant(np.concatenate([[0], np.cumsum(counts)[:-1]]), tf.int64)
        self.counts = tf.constant(counts, tf.int64)
        self.num_classes = len(counts)
        # Columns of the per-class draw: enough for the largest class and for K.
        self.width = int(max(counts.max(), num_k))
        self.num_p, self.num_k, self.seed = num_p, num_k, int(seed)

    def __call__(self, batch_number):
        key = tf.stack([tf.constant(self.seed, tf.int64), batch_number])
        class_key, order_key, repeat_key, augment_key = tf.unstack(
            tf.random.experimental.stateless_split(key, num=4)
        )
        class_draw = tf.random.stateless_uniform([self.num_classes], class_key)
        chosen = tf.math.top_k(class_draw, k=self.num_p).indices  # P distinct class slots
        counts = tf.gather(self.counts, chosen)[:, None]  # (P, 1)

        # Distinct positions: the K highest of one uniform draw per image of the class.
        positions = tf.range(self.width, dtype=tf.int64)[None, :]
        order_draw = tf.random.stateless_uniform([self.num_p, self.width], order_key)
        order_draw = tf.where(positions < counts, order_draw, -1.0)
        distinct = tf.cast(tf.math.top_k(order_draw, k=self.num_k).indices, tf.int64)
        # Classes with fewer than K images: the slots past their size repeat random images.
        repeat_draw = tf.random.stateless_uniform([self.num_p, self.num_k], repeat_key)
        repeats = tf.minimum(tf.cast(repeat_draw * tf.cast(counts, tf.float32), tf.int64), counts - 1)
        slot = tf.range(self.num_k, dtype=tf.int64)[None, :]
        within = tf.where(slot < counts, distinct, repeats)

        rows = tf.gather(self.rows_by_class, tf.gather(self.offsets, chosen)[:, None] + within)
        seeds = tf.random.experimental.stateless_split(augment_key, num=self.num_p * self.num_k)
        return tf.reshape(rows, [-1]), seeds


def _find_corrupt(paths):
    """Returns {path: reason} for the files of `paths` that cannot be read and decoded."""
    unique = list(dict.fromkeys(paths.tolist()))
    readable = np.zeros(len(unique), bool)

    def check(index, path):
        return index, tf.shape(decode_image(tf.io.read_file(path)))

    dataset = (
        tf.data.Dataset.from_tensor_slices((np.arange(len(unique), dtype=np.int64), unique))
        .map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .ignore_errors(log_warning=False)
        .batch(256)
    )
    with tqdm(
        total=len(unique),
        desc="Checking images",
        unit="img",
        disable=len(unique) < _PROGRESS_MIN_FILES,
        leave=False,
    ) as progress:
        for indices, _ in dataset:
            readable[indices.numpy()] = True
            progress.update(len(indices))
    return {unique[i]: _decode_failure(unique[i]) for i in np.flatnonzero(~readable)}


def _decode_failure(path):
    """Why `path` cannot be decoded, as a short message."""
    if not tf.io.gfile.exists(path):
        return "file not found"
    try:
        decode_image(tf.io.read_file(path))
    except tf.errors.OpError as error:
        message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message)
        return re.sub(r"\s*\[Op:\w+\].*$", "", message, flags=re.S).strip()
    return "could not be decoded in the tf.data pipeline"


def _integer_column(name, value):
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D (N,). Received shape {array.shape}")
    if array.size and (array.dtype == bool or not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"`{name}` must hold integers. Received dtype {array.dtype}")
    return array.astype(np.int32)


def _bool_column(value, num):
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"`is_stock` must be 1-D (N,). Received shape {array.shape}")
    _check_length("is_stock", array, num)
    if array.size and array.dtype != bool:
        if not np.issubdtype(array.dtype, np.integer) or not np.isin(array, (0, 1)).all():
            raise ValueError(f"`is_stock` must hold booleans. Received dtype {array.dtype}")
    return array.astype(bool)


def _path_column(paths, num):
    if isinstance(paths, (str, bytes)):
        raise ValueError("`paths` must be a sequence of file paths, not a single string")
    try:
        paths = [os.fspath(path) for path in paths]
    except TypeError as error:
        raise ValueError(f"`paths` must hold str or os.PathLike file paths: {error}") from None
    if not all(isinstance(path, str) for path in paths):
        raise ValueError("`paths` must hold str file paths (bytes paths are not supported)")
    array = np.array(paths, dtype=str)
    if array.ndim != 1:
        raise ValueError(f"`paths` must be 1-D (N,). Received shape {array.shape}")
    _check_length("paths", array, num)
    return array


def _check_length(name, array, num):
    if len(array) != num:
        raise ValueError(f"`{name}` must have one entry per label ({num}). Received {len(array)}")


def _check_optional_positive_int(name, value):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise ValueError(f"`{name}` must be a positive integer or None. Received {name}={value!r}")
