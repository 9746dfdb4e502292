"""Readers that turn image folders, CSV files and TFDS names into `ImageSet`s."""

import csv
import logging
import os

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from fgkeras.data.core import ImageSet, resize_and_pad

logger = logging.getLogger(__name__)

#: Extensions of the formats `decode_image` reads (tf.io.decode_image), compared lower-case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

_OPTIONAL_CSV_COLUMNS = ("view", "year", "is_stock")
_TRUE = ("1", "true", "yes", "y", "t")
_FALSE = ("0", "false", "no", "n", "f")


def image_folder(root, class_names=None):
    """Reads `root/<class>/<image>`: one sub-folder per class.

    Args:
        root: the folder holding one sub-folder per class.
        class_names: sub-folders to use, in label order; None uses every sub-folder that
            holds images, sorted by name (labels 0, 1, ...).
    Hidden files and folders and files whose extension is not in `IMAGE_EXTENSIONS` are
    ignored; images are sorted by file name within a class.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"Image folder not found: '{root}'")
    if class_names is None:
        folders = sorted(
            name for name in os.listdir(root)
            if not name.startswith(".") and os.path.isdir(os.path.join(root, name))
        )
    else:
        folders = [str(name) for name in class_names]
        missing = [name for name in folders if not os.path.isdir(os.path.join(root, name))]
        if missing:
            raise ValueError(f"Class folders not found under '{root}': {missing}")

    files = {name: _image_files(os.path.join(root, name)) for name in folders}
    empty = [name for name in folders if not files[name]]
    if empty and class_names is not None:
        raise ValueError(f"Class folders without images under '{root}': {empty}")
    if empty:
        logger.warning("Ignoring %d class folders without images under '%s': %s", len(empty), root, empty[:5])
        folders = [name for name in folders if files[name]]
    if not folders:
        raise ValueError(
            f"No classes found in '{root}': expected sub-folders holding images "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    paths = [path for name in folders for path in files[name]]
    labels = np.repeat(np.arange(len(folders)), [len(files[name]) for name in folders])
    return ImageSet(labels=labels, paths=paths, class_names=folders)


def read_csv(csv_path, root=None, split=None, class_column="class_id"):
    """Reads a CSV of images: header `path,<class_column>[,class_name][,split][,view][,year][,is_stock]`.

    Class ids are renumbered to contiguous labels 0..K-1 in the order of the original ids
    (numeric when they are all integers), over the rows kept by `split`. `class_names`
    holds the `class_name` column when present, else the original ids as strings.

    Args:
        csv_path: the CSV file.
        root: folder that relative paths start from; defaults to the CSV's folder.
        split: keep only the rows whose `split` column equals it (e.g. "train").
        class_column: the column holding class ids.
    """
    csv_path = os.fspath(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        rows = list(reader)
    required = ["path", class_column] + (["split"] if split is not None else [])
    for column in required:
        if column not in columns:
            raise ValueError(f"Column '{column}' is missing from '{csv_path}' (columns: {columns})")

    if split is not None:
        available = sorted({row["split"] for row in rows})
        rows = [row for row in rows if row["split"] == split]
        if not rows:
            raise ValueError(f"No rows with split '{split}' in '{csv_path}' (splits: {available})")
    if not rows:
        raise ValueError(f"No rows in '{csv_path}'")

    original = [_cell(row, class_column, csv_path, line) for line, row in _numbered(rows)]
    numeric = all(_is_int(value) for value in original)
    keys = [int(value) for value in original] if numeric else original
    ids = sorted(set(keys))
    label_of = {key: label for label, key in enumerate(ids)}
    labels = np.array([label_of[key] for key in keys], np.int32)

    names = [str(key) for key in ids]
    if "class_name" in columns:
        named = {}
        for (line, row), key in zip(_numbered(rows), keys):
            name = named.setdefault(key, row["class_name"])
            if name != row["class_name"]:
                raise ValueError(
                    f"Class {key} is named both '{name}' and '{row['class_name']}' "
                    f"in '{csv_path}', line {line}"
                )
        names = [named[key] for key in ids]

    base = os.path.dirname(os.path.abspath(csv_path)) if root is None else os.fspath(root)
    paths = [
        os.path.normpath(os.path.join(base, _cell(row, "path", csv_path, line)))
        for line, row in _numbered(rows)
    ]

    extras = {}
    for column in _OPTIONAL_CSV_COLUMNS:
        if column in columns:
            cells = [_cell(row, column, csv_path, line) for line, row in _numbered(rows)]
            parse = _parse_bool if column == "is_stock" else _parse_int
            extras[column] = [parse(cell, column, csv_path, line) for line, cell in _numbered(cells)]
    return ImageSet(
        labels=labels,
        paths=paths,
        views=extras.get("view"),
        years=extras.get("year"),
        is_stock=extras.get("is_stock"),
        class_names=names,
    )


def gallery_files(images):
    """`[(id, path)]` of an image folder (`root/<class>/<image>`; ids relative to it) or a CSV
    (`path,class_id,...`; ids as the CSV's paths relative to its folder)."""
    images = os.fspath(images)
    if os.path.isdir(images):
        paths, base = image_folder(images).paths, images
    elif os.path.isfile(images) and images.lower().endswith(".csv"):
        paths, base = read_csv(images).paths, os.path.dirname(os.path.abspath(images))
    else:
        raise ValueError(f"`images` must be an image folder (root/<class>/<image>) or a CSV of paths. "
                         f"Received: images={images!r}")
    return [(os.path.relpath(str(p), base), str(p)) for p in paths]  # str, not numpy.str_


def tfds_images(
    name,
    split,
    image_key="image",
    label_key="label",
    data_dir=None,
    image_size=None,
    max_examples=None,
    download=False,
):
    """Loads a TFDS split into an in-memory `ImageSet`.

    Args:
        name: TFDS name, e.g. "cars196" or "caltech_birds2011".
        split: TFDS split, e.g. "train" or "test[:10%]".
        image_key: feature holding the image (grayscale becomes 3 channels, alpha dropped).
        label_key: feature holding the integer class label.
        data_dir: TFDS data folder (default: TFDS's own).
        image_size: resize each image to a square of this side keeping its aspect ratio
            (`resize_and_pad`); None requires images of one size.
        max_examples: read at most this many examples.
        download: let TFDS download and prepare the data set if it is not there yet.
    """
    import tensorflow_datasets as tfds

    dataset, info = tfds.load(
        name, split=split, data_dir=data_dir, with_info=True, download=download, shuffle_files=False
    )
    for key in (image_key, label_key):
        if key not in info.features:
            raise ValueError(
                f"TFDS data set '{name}' has no feature '{key}' (features: {sorted(info.features)})"
            )
    label_feature = info.features[label_key]
    class_names = list(label_feature.names) if hasattr(label_feature, "names") else None
    total = _split_size(info, split)
    if max_examples is not None:
        dataset = dataset.take(max_examples)
        total = max_examples if total is None else min(total, max_examples)

    def prepare(example):
        image = _to_rgb(example[image_key])
        if image_size is not None:
            image = resize_and_pad(image, image_size)
        return image, tf.cast(example[label_key], tf.int32)

    images, labels = [], []
    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    for image, label in tqdm(dataset.as_numpy_iterator(), total=total, desc=f"Loading {name}", unit="img"):
        images.append(image)
        labels.append(label)
    sizes = {image.shape for image in images}
    if len(sizes) > 1:
        raise ValueError(
            f"Images of TFDS data set '{name}' have different sizes ({sorted(sizes)[:2]}...): "
            "pass `image_size` to resize them"
        )
    if not images:
        raise ValueError(f"TFDS split '{split}' of '{name}' is empty")
    return ImageSet(labels=np.array(labels, np.int32), images=np.stack(images), class_names=class_names)


def _image_files(folder):
    return [
        os.path.join(folder, name)
        for name in sorted(os.listdir(folder))
        if not name.startswith(".")
        and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        and os.path.isfile(os.path.join(folder, name))
    ]


def _to_rgb(image):
    """uint8 (H, W, C) with C in {1, 3, 4} -> uint8 (H, W, 3)."""
    channels = image.shape[-1]
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 3:
        return image
    if channels == 4:
        return image[..., :3]
    raise ValueError(f"Images must have 1, 3 or 4 channels. Received shape {image.shape}")


def _split_size(info, split):
    try:
        return info.splits[split].num_examples
    except (KeyError, ValueError, TypeError):
        return None


def _numbered(rows):
    """(CSV line number, row): the header is line 1."""
    return zip(range(2, len(rows) + 2), rows)


def _cell(row, column, csv_path, line):
    value = row.get(column)
    if value is None or value.strip() == "":
        raise ValueError(f"Empty '{column}' in '{csv_path}', line {line}")
    return value.strip()


def _is_int(value):
    try:
        int(value)
    except ValueError:
        return False
    return True


def _parse_int(value, column, csv_path, line):
    if not _is_int(value):
        raise ValueError(
            f"Column '{column}' must hold integers in '{csv_path}', line {line}. Received '{value}'"
        )
    return int(value)


def _parse_bool(value, column, csv_path, line):
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"Column '{column}' must hold booleans in '{csv_path}', line {line}. Received '{value}'")
