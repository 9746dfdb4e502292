"""A grid of view transformations (ViewGAN, Fig. 6 and 8): each input × every target view."""

import io

import numpy as np
from PIL import Image

from fgkeras._files import write_atomic


def view_grid(transform, images, views, path=None, truth=None, gap=2):
    """One image: a row per input, the input first, then G's image in each target view.

    Args:
        transform: `images, view ids -> images` (e.g. `ViewTransformGAN.transform`).
        images: (N, S, S, 3) inputs in [0, 255].
        views: the target view ids, one column each.
        path: a PNG path to write (atomically), or None.
        truth: optional (N, len(views), S, S, 3) true images (the renderer's), drawn as a second
            row under each input's row.
        gap: white pixels between cells.
    Returns: the grid as a (H, W, 3) uint8 array.
    """
    images = np.asarray(images, np.float32)
    views = [int(v) for v in views]
    if images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(f"`images` must be (N, S, S, 3) with N >= 1. Received shape {images.shape}")
    if not views:
        raise ValueError("`views` must name at least one target view. Received: []")
    n, size = len(images), images.shape[1]
    cells = np.stack([np.asarray(transform(images, np.full(n, v)), np.float32) for v in views], axis=1)
    rows = []
    for i in range(n):
        rows.append([images[i], *cells[i]])
        if truth is not None:
            rows.append([np.full_like(images[i], 255), *np.asarray(truth[i], np.float32)])
    step = size + gap
    grid = np.full((len(rows) * step - gap, (len(views) + 1) * step - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            grid[r * step:r * step + size, c * step:c * step + size] = np.clip(np.round(cell), 0, 255)
    if path is not None:
        buffer = io.BytesIO()
        Image.fromarray(grid).save(buffer, format="PNG")
        write_atomic(path, buffer.getvalue())
    return grid


__all__ = ["view_grid"]
