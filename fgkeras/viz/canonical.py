"""FGGAN's view normalisation shown (#13): input views → G's canonical view → a real canonical photo.

`canonical_grid` writes one PNG: a row per class, the class's user photos in several views,
then G's image of each, then a real stock photo of the class in the canonical view, with a
white gap between the three groups.
"""

import os

import numpy as np
from PIL import Image

from fgkeras._files import write_atomic

_GAP = 4  # pixels of white between the groups and around the cells


def _uint8(images, name):
    images = np.asarray(images, dtype="float32")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"`{name}` must be (N, H, W, 3) images. Received shape {images.shape}")
    return np.clip(np.round(images), 0, 255).astype("uint8")


def canonical_grid(generator, inputs, canonical, path=None, batch_size=64):
    """A grid of each class's input views, G's canonical view of each, and a real canonical photo.

    Args:
        generator: G (e.g. `ViewNormalizingGAN.generator`), images in [0, 255] → images in [0, 255].
        inputs: (classes, views, H, W, 3) user photos, a row of views per class, in [0, 255].
        canonical: (classes, H, W, 3) a real stock photo of each class in the canonical view.
        path: where to write the PNG (atomically); None only returns the grid.
        batch_size: images per call of G.
    Returns: the grid, a uint8 array (rows × cell, columns × cell, 3).
    """
    inputs = np.asarray(inputs)
    if inputs.ndim != 5 or inputs.shape[-1] != 3:
        raise ValueError(f"`inputs` must be (classes, views, H, W, 3). Received shape {inputs.shape}")
    classes, views, height, width, _ = inputs.shape
    canonical = _uint8(canonical, "canonical")
    if canonical.shape != (classes, height, width, 3):
        raise ValueError(f"`canonical` must be one ({height}, {width}, 3) photo per class, "
                         f"{(classes, height, width, 3)}. Received shape {canonical.shape}")
    flat = inputs.reshape(-1, height, width, 3).astype("float32")
    generated = np.concatenate([np.asarray(generator(flat[i:i + batch_size], training=False))
                                for i in range(0, len(flat), batch_size)])
    generated = _uint8(generated, "G's output").reshape(classes, views, height, width, 3)
    inputs = _uint8(flat, "inputs").reshape(classes, views, height, width, 3)
    columns = 2 * views + 1
    grid = np.full((_GAP + classes * (height + _GAP), 3 * _GAP + columns * (width + _GAP), 3), 255, "uint8")
    for row in range(classes):
        top = _GAP + row * (height + _GAP)
        cells = [*inputs[row], *generated[row], canonical[row]]
        for column, cell in enumerate(cells):
            group = (column >= views) + (column >= 2 * views)  # a wider gap before each group
            left = _GAP * (1 + group) + column * (width + _GAP)
            grid[top:top + height, left:left + width] = cell
    if path is not None:
        import io

        buffer = io.BytesIO()
        Image.fromarray(grid).save(buffer, format="PNG")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, buffer.getvalue())
    return grid


def class_views(imageset, classes, views, canonical_view=0):
    """`canonical_grid`'s inputs from an `ImageSet` with views and stock flags.

    For each class in `classes`, one user photo in each view of `views` (the first in the set),
    and its first stock photo in `canonical_view`. Returns `(inputs, canonical)`; a class
    without a user photo in a view or a canonical photo raises a `ValueError` naming it.
    """
    from fgkeras.data.pairs import canonical_rows

    by_class = canonical_rows(imageset, canonical_view)
    inputs, canonical = [], []
    for label in classes:
        if int(label) not in by_class:
            raise ValueError(f"Class {label} has no stock photo in the canonical view {canonical_view}")
        row = []
        for view in views:
            found = np.flatnonzero((imageset.labels == label) & (imageset.views == view) & ~imageset.is_stock)
            if not len(found):
                raise ValueError(f"Class {label} has no user photo in view {view}")
            row.append(_image(imageset, found[0]))
        inputs.append(row)
        canonical.append(_image(imageset, by_class[int(label)][0]))
    return np.array(inputs), np.array(canonical)


def _image(imageset, row):
    if imageset.images is not None:
        return imageset.images[row]
    with Image.open(imageset.paths[row]) as image:
        return np.asarray(image.convert("RGB"))


__all__ = ["canonical_grid", "class_views"]
