"""Retrieval metrics — Recall@K, P@k, mAP@k and MAP@R — from one exact, chunked k-NN pass."""

import logging
import math

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# `verbose="auto"` shows a progress bar from this many query × gallery distances on.
_AUTO_PROGRESS_DISTANCES = 10**8


def retrieval_metrics(
    query_embeddings,
    query_labels,
    gallery_embeddings=None,
    gallery_labels=None,
    recall_ks=(1, 2, 4, 8),
    precision_ks=(5, 10, 20),
    map_ks=(5, 10, 20),
    chunk_size=1024,
    map_at_r=True,
    exclude_index=None,
    verbose="auto",
):
    """Exact nearest-neighbour retrieval metrics under the Euclidean distance.

    Every query ranks the gallery by Euclidean distance on the vectors as given
    (no normalisation here: L2-normalise beforehand for cosine retrieval). Ties
    are broken by gallery index, so rankings are deterministic. A gallery item is
    *relevant* to a query when it has the query's label; `R` is the number of
    relevant gallery items of the query (the excluded item, if any, not counted),
    `rel(i)` is 1 when the item at rank `i` is relevant and `P(i)` is the fraction
    of relevant items among the top `i`.

    - `recall@K`: fraction of queries with at least one relevant item in the top K
      (the Recall@K of CUB-200 / CARS196 / In-Shop papers, e.g. HTG).
    - `p@k`: mean over queries of (number of relevant items in the top k) / k.
      Always divided by k, so it cannot reach 1 for a query with `R < k`.
    - `map@k`: mean over queries of AP@k = (1 / min(k, R)) Σ_{i≤k} P(i)·rel(i),
      which is 1 exactly when the top min(k, R) items are all relevant.
    - `map@r`: MAP@R of Musgrave et al. 2020 ("A Metric Learning Reality Check"),
      the mean over queries of (1 / R) Σ_{i≤R} P(i)·rel(i).

    Queries with `R = 0` (no relevant item in the gallery) are left out of every
    metric; `"num_queries"` reports how many queries were used. When no query is
    left every metric is NaN.

    Without a gallery the metrics are leave-one-out: each query searches all the
    *other* items. The query is excluded by its index, not by its distance, so an
    exact duplicate at another index is a legitimate neighbour (at distance 0).

    Queries are processed `chunk_size` at a time against the whole gallery: the
    extra memory is about 9 bytes × `chunk_size` × (gallery size), plus the top
    max(k, R) neighbours of each query of the chunk (more only when a great many
    distances tie with a query's k-th smallest one, e.g. thousands of duplicates).

    Args:
        query_embeddings: (num_queries, dim) finite floats.
        query_labels: (num_queries,) class labels (ints or strings).
        gallery_embeddings: (num_gallery, dim) finite floats, or None for
            leave-one-out retrieval among the queries.
        gallery_labels: (num_gallery,) labels; given exactly when
            `gallery_embeddings` is.
        recall_ks: the K of `recall@K`, positive ints.
        precision_ks: the k of `p@k`, positive ints.
        map_ks: the k of `map@k`, positive ints.
        chunk_size: number of queries searched at once, positive.
        map_at_r: whether to compute `map@r` (it needs the top R of each query,
            more than the top k when classes are large).
        exclude_index: (num_queries,) ints: the gallery position that each query
            must not retrieve (the query itself when queries are drawn from the
            gallery), -1 for none. Defaults to the query's own index without a
            gallery, and to no exclusion with one.
        verbose: True, False, or `"auto"` (a progress bar for large inputs).

    Returns:
        A dict `{"recall@K": ..., "p@k": ..., "map@k": ..., "map@r": ...}` of
        floats in [0, 1] (in the order of the arguments), plus `"num_queries"`.
    """
    queries = _as_embeddings(query_embeddings, "query_embeddings")
    query_labels = _as_labels(query_labels, "query_labels", len(queries))
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError(
            "`gallery_embeddings` and `gallery_labels` must be given together. Received: "
            f"gallery_embeddings={_describe(gallery_embeddings)}, "
            f"gallery_labels={_describe(gallery_labels)}"
        )
    if gallery_embeddings is None:
        gallery, gallery_labels = queries, query_labels
        default_exclude = np.arange(len(queries))
    else:
        gallery = _as_embeddings(gallery_embeddings, "gallery_embeddings")
        gallery_labels = _as_labels(gallery_labels, "gallery_labels", len(gallery))
        _check_same_dim(queries, gallery, "query_embeddings", "gallery_embeddings")
        default_exclude = np.full(len(queries), -1)
    exclude = _as_exclude_index(exclude_index, default_exclude, len(gallery))
    recall_ks = _as_ks(recall_ks, "recall_ks")
    precision_ks = _as_ks(precision_ks, "precision_ks")
    map_ks = _as_ks(map_ks, "map_ks")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int. Received: chunk_size={chunk_size!r}")
    if verbose not in (True, False, "auto"):
        raise ValueError(f"`verbose` must be True, False or 'auto'. Received: verbose={verbose!r}")

    _, codes = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
    query_codes, gallery_codes = codes[: len(queries)], codes[len(queries) :]
    has_exclude = exclude >= 0
    num_relevant = np.bincount(gallery_codes, minlength=codes.max() + 1)[query_codes]
    num_relevant -= has_exclude & (gallery_codes[exclude] == query_codes)

    names = (
        [f"recall@{k}" for k in recall_ks]
        + [f"p@{k}" for k in precision_ks]
        + [f"map@{k}" for k in map_ks]
        + (["map@r"] if map_at_r else [])
    )
    used = np.flatnonzero(num_relevant > 0)
    if len(used) == 0:
        logger.warning("No query has a relevant gallery item: every retrieval metric is NaN.")
        return {**dict.fromkeys(names, math.nan), "num_queries": 0}

    query_sq_norms = _squared_norms(queries, "query_embeddings")
    gallery_sq_norms = _squared_norms(gallery, "gallery_embeddings")
    max_k = max(recall_ks + precision_ks + map_ks, default=1)
    per_query = {name: np.empty(len(used)) for name in names}
    # Work buffers reused by every chunk: page-faulting fresh ones costs as much as the search.
    buffer_shape = (min(chunk_size, len(used)), len(gallery))
    buffers = [np.empty(buffer_shape, dtype) for dtype in (np.float32, np.float32, bool)]
    show = verbose is True or (verbose == "auto" and len(used) * len(gallery) >= _AUTO_PROGRESS_DISTANCES)
    with tqdm(total=len(used), unit="query", desc="retrieval", disable=not show) as progress:
        for start in range(0, len(used), chunk_size):
            rows = used[start : start + chunk_size]
            distances, scratch, mask = (buffer[: len(rows)] for buffer in buffers)
            np.matmul(queries[rows], gallery.T, out=distances)
            distances *= -2.0
            distances += query_sq_norms[rows, None]
            distances += gallery_sq_norms[None, :]
            np.maximum(distances, 0.0, out=distances)
            chunk_exclude = exclude[rows]
            excluded_rows = np.flatnonzero(chunk_exclude >= 0)
            distances[excluded_rows, chunk_exclude[excluded_rows]] = np.inf

            chunk_relevant = num_relevant[rows]
            depth = max(max_k, int(chunk_relevant.max()) if map_at_r else 0)
            ranked = _smallest_sorted(distances, min(depth, len(gallery)), scratch, mask)
            relevant = (gallery_codes[ranked] == query_codes[rows, None]) & (ranked != chunk_exclude[:, None])
            values = _per_query_metrics(relevant, chunk_relevant, recall_ks, precision_ks, map_ks, map_at_r)
            for name, value in values.items():
                per_query[name][start : start + len(rows)] = value
            progress.update(len(rows))

    return {**{name: float(np.mean(values)) for name, values in per_query.items()}, "num_queries": len(used)}


def _per_query_metrics(relevant, num_relevant, recall_ks, precision_ks, map_ks, map_at_r):
    """Metric values of each query of a chunk.

    Args:
        relevant: (chunk, depth) booleans, rel(i) in rank order.
        num_relevant: (chunk,) R of each query, 1 <= R <= depth when `map_at_r`.
    Returns:
        A dict of (chunk,) float arrays, one per metric.
    """
    values = {}
    depth = relevant.shape[1]
    hits = np.cumsum(relevant, axis=1)  # hits[:, i - 1] = relevant items in the top i
    precision_at_hit = np.where(relevant, hits / np.arange(1, depth + 1), 0.0)  # P(i)·rel(i)
    ap_sums = np.cumsum(precision_at_hit, axis=1)
    for k in recall_ks:
        values[f"recall@{k}"] = hits[:, min(k, depth) - 1] > 0
    for k in precision_ks:
        values[f"p@{k}"] = hits[:, min(k, depth) - 1] / k
    for k in map_ks:
        values[f"map@{k}"] = ap_sums[:, min(k, depth) - 1] / np.minimum(k, num_relevant)
    if map_at_r:
        values["map@r"] = ap_sums[np.arange(len(relevant)), num_relevant - 1] / num_relevant
    return values


def _smallest_sorted(distances, k, scratch, mask):
    """Columns of the `k` smallest entries of each row, ordered by (distance, column).

    Args:
        distances: (rows, columns) floats without NaN.
        k: 1 <= k <= columns.
        scratch, mask: work buffers, float and bool arrays of the shape of `distances`.
    Returns:
        (rows, k) int64 column indices.
    """
    num_rows, num_columns = distances.shape
    if k == num_columns:
        return np.argsort(distances, axis=1, kind="stable")
    np.copyto(scratch, distances)
    scratch.partition(k - 1, axis=1)
    kth = scratch[:, k - 1].copy()
    np.less_equal(distances, kth[:, None], out=mask)
    rows, cols = np.divmod(np.flatnonzero(mask), num_columns)  # row-major: columns ascend within a row
    below = distances[rows, cols] < kth[rows]
    # Entries equal to the k-th distance fill each row up to k, lowest columns first.
    tied = ~below
    tied_before = np.cumsum(tied) - tied
    tied_before -= tied_before[np.searchsorted(rows, np.arange(num_rows))][rows]
    slots = k - np.bincount(rows[below], minlength=num_rows)
    keep = below | (tied_before < slots[rows])
    cols = cols[keep].reshape(num_rows, k)
    order = np.argsort(np.take_along_axis(distances, cols, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1)


def _as_embeddings(value, name):
    array = np.asarray(value)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"`{name}` must be a non-empty 2-D array (num_items, dim). Received shape {array.shape}"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"`{name}` must hold real numbers. Received dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` must be finite: it holds NaN or infinite values (as float32)")
    return array


def _check_same_dim(first, second, first_name, second_name):
    if first.shape[1] != second.shape[1]:
        raise ValueError(
            f"`{first_name}` and `{second_name}` must have the same dimension. "
            f"Received: {first.shape[1]} and {second.shape[1]}"
        )


def _as_labels(value, name, length):
    array = np.asarray(value)
    if array.ndim != 1 or len(array) != length:
        raise ValueError(
            f"`{name}` must be 1-D with one label per embedding ({length}). Received shape {array.shape}"
        )
    return array


def _as_exclude_index(value, default, gallery_size):
    if value is None:
        return default
    array = np.asarray(value)
    if array.shape != default.shape or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"`exclude_index` must be {len(default)} ints, one per query. "
            f"Received shape {array.shape} and dtype {array.dtype}"
        )
    if array.size and (array.min() < -1 or array.max() >= gallery_size):
        raise ValueError(
            f"`exclude_index` values must be -1 or gallery positions in [0, {gallery_size}). "
            f"Received values in [{array.min()}, {array.max()}]"
        )
    return array.astype(np.int64)


def _as_ks(value, name):
    ks = tuple(value)
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"`{name}` must be positive ints. Received: {name}={value!r}")
    return tuple(int(k) for k in ks)


def _squared_norms(embeddings, name):
    norms = np.einsum("ij,ij->i", embeddings, embeddings)
    if not np.isfinite(norms).all():
        raise ValueError(f"`{name}` values are too large: squared norms overflow float32")
    return norms


def _describe(value):
    return None if value is None else f"array of shape {np.shape(value)}"
