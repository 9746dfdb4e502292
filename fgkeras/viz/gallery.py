"""Retrieval galleries: a query and its top-k results, each result framed green (same class) or red.

`rank_queries` ranks a gallery for every query (the exact Euclidean ranking of
`fgkeras.evaluation.retrieval_metrics`, ties broken by gallery index) and scores each query by
its average precision over the whole ranking; `pick_queries` picks the best, median and worst of
them; `gallery_image` draws rows of (query, results) and `write_gallery` saves them as a PNG.
"""

import io
import os

import numpy as np
from PIL import Image

from fgkeras._files import write_atomic

CORRECT = (0, 160, 60)     # green frame: a result of the query's class
INCORRECT = (210, 30, 30)  # red frame: any other class
QUERY = (40, 40, 40)       # dark frame: the query itself
BORDER = 4                 # frame width in pixels
_GAP = 6                   # white pixels between cells (twice that after the query)


def rank_queries(query_embeddings, query_labels, gallery_embeddings=None, gallery_labels=None, k=5,
                 exclude_index=None, chunk_size=512):
    """The top-k gallery items of every query, which of them are correct, and each query's AP.

    Without a gallery the queries search each other, leave-one-out (the query's own index is
    never retrieved), as `retrieval_metrics` does.

    Args:
        query_embeddings: (Q, dim) floats.
        query_labels: (Q,) labels.
        gallery_embeddings, gallery_labels: (G, dim) and (G,), or both None.
        k: results kept per query, >= 1 (at most the gallery size).
        exclude_index: (Q,) the gallery position each query must not retrieve (itself, when the
            queries are in the gallery), -1 for none. Default: the query's own index without a
            gallery, nothing with one.
        chunk_size: queries ranked at once (memory: chunk_size × G distances).
    Returns:
        `{"top": (Q, k) gallery indices, "correct": (Q, k) bool, "ap": (Q,) average precision over
        the full ranking (NaN for a query without any relevant item), "first_hit": (Q,) 1-based
        rank of the first relevant item (0 when there is none)}`.
    """
    queries = np.asarray(query_embeddings, np.float32)
    query_labels = np.asarray(query_labels)
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError("`gallery_embeddings` and `gallery_labels` must be given together.")
    leave_one_out = gallery_embeddings is None
    gallery = queries if leave_one_out else np.asarray(gallery_embeddings, np.float32)
    gallery_labels = query_labels if leave_one_out else np.asarray(gallery_labels)
    if exclude_index is None:
        exclude_index = np.arange(len(queries)) if leave_one_out else np.full(len(queries), -1)
    exclude_index = np.asarray(exclude_index, np.int64)
    if exclude_index.shape != (len(queries),):
        raise ValueError(f"`exclude_index` must hold one position per query ({len(queries)},). "
                         f"Received shape {exclude_index.shape}")
    size = len(gallery) - int((exclude_index >= 0).any())
    if not 1 <= k <= size:
        raise ValueError(f"`k` must be in [1, {size}] (the gallery size). Received: k={k}")
    top = np.empty((len(queries), k), np.int64)
    ap = np.empty(len(queries))
    first_hit = np.empty(len(queries), np.int64)
    gallery_norms = np.einsum("ij,ij->i", gallery, gallery)
    for start in range(0, len(queries), chunk_size):
        rows = np.arange(start, min(start + chunk_size, len(queries)))
        distances = gallery_norms[None, :] - 2.0 * queries[rows] @ gallery.T
        excluded = exclude_index[rows] >= 0
        distances[np.flatnonzero(excluded), exclude_index[rows][excluded]] = np.inf
        order = np.argsort(distances, axis=1, kind="stable")  # an excluded item ranks last
        relevant = (gallery_labels[order] == query_labels[rows, None]) & (order != exclude_index[rows, None])
        top[rows] = order[:, :k]
        ap[rows], first_hit[rows] = _average_precision(relevant)
    return {"top": top, "correct": gallery_labels[top] == query_labels[:, None], "ap": ap, "first_hit": first_hit}


def _average_precision(relevant):
    """(rows, n) bool relevance in rank order → (AP of each row, 1-based rank of its first hit or 0)."""
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    totals = hits[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(totals > 0, (relevant * hits / ranks).sum(axis=1) / totals, np.nan)
    first = np.where(totals > 0, relevant.argmax(axis=1) + 1, 0)
    return ap, first


def pick_queries(ranking, per_group=3):
    """The best, median and worst queries by average precision (then by first hit, then index).

    Queries without a relevant item are left out. Returns `{"best": indices, "median": indices,
    "worst": indices}`, each `per_group` long at most (the groups may overlap on tiny sets).
    """
    usable = np.flatnonzero(np.isfinite(ranking["ap"]))
    if not len(usable):
        raise ValueError("No query has a relevant gallery item: there is nothing to show.")
    # Highest AP first; among equals, the earlier first hit, then the lower index.
    order = usable[np.lexsort((usable, ranking["first_hit"][usable], -ranking["ap"][usable]))]
    count = min(per_group, len(order))
    middle = max(0, (len(order) - count) // 2)
    return {"best": order[:count], "median": order[middle:middle + count], "worst": order[len(order) - count:]}


def gallery_image(query_images, result_images, correct, cell_size=None):
    """Rows of a framed query, then its results framed green (correct) or red (incorrect).

    Args:
        query_images: (n, H, W, 3) in [0, 255].
        result_images: (n, k, H, W, 3) in [0, 255].
        correct: (n, k) bool.
        cell_size: side of an image in the grid (resized, bilinear); default:
            `default_cell_size` of the images' side.
    Returns: a uint8 (rows, columns, 3) array.
    """
    query_images, result_images = np.asarray(query_images), np.asarray(result_images)
    correct = np.asarray(correct, bool)
    if query_images.ndim != 4 or result_images.ndim != 5 or result_images.shape[:2] != correct.shape \
            or len(query_images) != len(result_images):
        raise ValueError(
            "`query_images` (n, H, W, 3), `result_images` (n, k, H, W, 3) and `correct` (n, k) must agree. "
            f"Received shapes {query_images.shape}, {result_images.shape}, {correct.shape}")
    cell = cell_size or default_cell_size(query_images.shape[1])
    framed = cell + 2 * BORDER
    rows, k = correct.shape
    bottom, right = cell_origin(rows, k + 1, cell)
    grid = np.full((bottom, right, 3), 255, np.uint8)
    for row in range(rows):
        cells = [(query_images[row], QUERY)] + [
            (image, CORRECT if hit else INCORRECT) for image, hit in zip(result_images[row], correct[row])]
        for column, (image, colour) in enumerate(cells):
            top, left = cell_origin(row, column, cell)
            grid[top:top + framed, left:left + framed] = colour
            grid[top + BORDER:top + BORDER + cell, left + BORDER:left + BORDER + cell] = _resized(image, cell)
    return grid


def cell_origin(row, column, cell_size):
    """Top-left pixel `(y, x)` of the frame of cell (`row`, `column`) in a `gallery_image` drawn
    at `cell_size` (column 0 is the query): where a reader, or a test, finds its colour."""
    framed = cell_size + 2 * BORDER
    return _GAP + row * (framed + _GAP), _GAP + column * (framed + _GAP) + (_GAP if column else 0)


def default_cell_size(image_side):
    """The cell side `gallery_image` draws images of side `image_side` at: their own, at least 64."""
    return max(64, int(image_side))


def write_gallery(path, query_images, result_images, correct):
    """Writes `gallery_image(...)` (at the default cell size) as a PNG, atomically; returns `path`."""
    grid = gallery_image(query_images, result_images, correct)
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path


def _resized(image, side):
    image = np.clip(np.round(np.asarray(image, np.float32)), 0, 255).astype(np.uint8)
    if image.shape[:2] == (side, side):
        return image
    return np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))


__all__ = ["CORRECT", "INCORRECT", "cell_origin", "default_cell_size", "gallery_image", "pick_queries", "rank_queries", "write_gallery"]
