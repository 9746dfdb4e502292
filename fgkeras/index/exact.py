"""Exact (brute-force) inner-product search: float32 BLAS matrix products and a cheap top-k."""

import numpy as np

from fgkeras.index.base import Index

# Queries scored against the gallery at once, and gallery rows per matrix product: a
# (QUERY_BLOCK, GALLERY_CHUNK) float32 score block is 4 MiB (cache-resident), whatever N.
QUERY_BLOCK = 256
GALLERY_CHUNK = 4096
# Columns of a score block are split into this many interleaved groups for the top-k (see `_top_k_columns`).
GROUPS = 32


def exact_search(gallery, queries, k, query_block=QUERY_BLOCK, gallery_chunk=GALLERY_CHUNK):
    """The exact top-`k` rows of `gallery` by inner product with each query, best first.

    Scores come from float32 matrix products (BLAS sgemm of a block of queries against a chunk of
    gallery rows; one matrix-vector product for a single query). Selecting the top k then costs
    about one cheap vectorised pass over each score block, far below the product itself:

    - the first chunk's top k come from `_top_k_columns` (a group-maximum filter, then a partial
      sort of a few candidates);
    - every later chunk is compared with each query's current k-th best score: only the scores
      above it (on random order about k / j of them per query in the j-th chunk) are gathered and
      merged into the running top k.

    Args:
        gallery: (N, D) float32, C-contiguous.
        queries: (Q, D) float32.
        k: int, 1 <= k <= N.
    Returns:
        `(rows, scores)`: (Q, k) int64 gallery rows and (Q, k) float32 inner products, by
        decreasing score.
    """
    if len(queries) == 1:
        scores = (gallery @ queries[0])[None, :]
        rows = _top_k_columns(scores, k)
        return _sorted(rows, np.take_along_axis(scores, rows, axis=1))
    rows_out = np.empty((len(queries), k), np.int64)
    scores_out = np.empty((len(queries), k), np.float32)
    chunk = max(gallery_chunk, k)
    buffer = np.empty(min(query_block, len(queries)) * min(chunk, len(gallery)), np.float32)
    for q0 in range(0, len(queries), query_block):
        block = queries[q0:q0 + query_block]
        top = None
        for g0 in range(0, len(gallery), chunk):
            part = gallery[g0:g0 + chunk]
            scores = buffer[: len(block) * len(part)].reshape(len(block), len(part))
            np.dot(block, part.T, out=scores)
            if top is None:
                top = _RunningTopK(scores, k)
            else:
                top.add(scores, g0)
        rows_out[q0:q0 + len(block)], scores_out[q0:q0 + len(block)] = top.result()
    return rows_out, scores_out


class _RunningTopK:
    """The top k of each row over successive score blocks, with a per-row threshold filter.

    Candidates above a row's current k-th best score are collected, and merged (which raises the
    thresholds) every `MERGE_EVERY` blocks: a stale threshold only lets a few more through, and
    merging costs a dozen numpy calls whatever the number of candidates.
    """

    MERGE_EVERY = 8

    def __init__(self, scores, k):
        self.k = k
        self.rows = _top_k_columns(scores, k)
        self.scores = np.take_along_axis(scores, self.rows, axis=1)
        self.threshold = self.scores.min(axis=1)
        self._pending = []
        self._blocks = 0

    def add(self, scores, offset):
        rows, columns = _above(scores, self.threshold)
        if rows.size:
            self._pending.append((rows, columns + offset, scores[rows, columns]))
        self._blocks += 1
        if self._blocks % self.MERGE_EVERY == 0:
            self._merge()

    def result(self):
        self._merge()
        return _sorted(self.rows, self.scores)

    def _merge(self):
        if not self._pending:
            return
        rows, columns, scores = (np.concatenate(parts) for parts in zip(*self._pending))
        self._pending = []
        order = np.argsort(rows, kind="stable")
        rows, columns, scores = rows[order], columns[order], scores[order]
        k = self.k
        starts = np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]]))
        counts = np.diff(np.append(starts, len(rows)))
        touched = rows[starts]
        width = k + int(counts.max())
        pooled_scores = np.full((len(touched), width), -np.inf, np.float32)
        pooled_rows = np.zeros((len(touched), width), np.int64)
        pooled_scores[:, :k] = self.scores[touched]
        pooled_rows[:, :k] = self.rows[touched]
        line = np.repeat(np.arange(len(touched)), counts)
        position = k + np.arange(len(rows)) - np.repeat(starts, counts)
        pooled_scores[line, position] = scores
        pooled_rows[line, position] = columns
        best = np.argpartition(pooled_scores, width - k, axis=1)[:, width - k:]
        self.scores[touched] = np.take_along_axis(pooled_scores, best, axis=1)
        self.rows[touched] = np.take_along_axis(pooled_rows, best, axis=1)
        self.threshold[touched] = self.scores[touched].min(axis=1)


def _group_maxima(scores):
    """(Q, C / GROUPS) maxima of the interleaved column groups {j, j + C/GROUPS, j + 2C/GROUPS, ...}
    of `scores` (Q, C), C a multiple of GROUPS: folding halves onto each other is an elementwise
    maximum over contiguous slices, which numpy vectorises (a reduce over a middle axis does not)."""
    width = scores.shape[1] // 2
    maxima = np.maximum(scores[:, :width], scores[:, width:])
    for _ in range(GROUPS.bit_length() - 2):
        width //= 2
        np.maximum(maxima[:, :width], maxima[:, width:2 * width], out=maxima[:, :width])
    return maxima[:, :width]


def _top_k_columns(scores, k):
    """Column indices (Q, k) of the k largest entries of each row of `scores` (Q, C), unordered.

    Only the k groups of largest maximum (see `_group_maxima`) can hold the k best scores: each of
    the k best lies in a group whose maximum is at least the k-th best score, and at most k groups
    have such a maximum. So a partial sort runs over C / GROUPS maxima and k × GROUPS candidates.
    """
    num_columns = scores.shape[1]
    width = num_columns // GROUPS
    if width <= 4 * k:
        return np.argpartition(scores, num_columns - k, axis=1)[:, num_columns - k:]
    maxima = _group_maxima(scores[:, : width * GROUPS])
    groups = np.argpartition(maxima, width - k, axis=1)[:, width - k:]
    columns = (groups[:, :, None] + np.arange(GROUPS) * width).reshape(len(scores), -1)
    tail = num_columns - width * GROUPS
    if tail:
        extra = np.arange(width * GROUPS, num_columns)
        columns = np.concatenate([columns, np.broadcast_to(extra, (len(scores), tail))], axis=1)
    values = np.take_along_axis(scores, columns, axis=1)
    best = np.argpartition(values, values.shape[1] - k, axis=1)[:, values.shape[1] - k:]
    return np.take_along_axis(columns, best, axis=1)


def _above(scores, thresholds):
    """(rows, columns) of the entries of `scores` (Q, C) above their row's threshold, rows ascending.

    A row maximum (one vectorised pass) first finds the rows with any such entry; when they are
    few, only their scores are compared. `np.flatnonzero` on a flat mask, not the much slower
    two-dimensional `np.nonzero`.
    """
    num_rows, num_columns = scores.shape
    hits = np.flatnonzero(scores.max(axis=1) > thresholds)
    if hits.size == 0:
        return hits, hits
    if 2 * hits.size < num_rows:
        scores, thresholds = scores[hits], thresholds[hits]
    else:
        hits = None
    flat = np.flatnonzero(scores > thresholds[:, None])
    rows, columns = np.divmod(flat, num_columns)
    return (rows if hits is None else hits[rows]), columns


def _sorted(rows, scores):
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


class ExactIndex(Index, kind="exact"):
    """Brute-force inner-product search with the `Index` interface (the reference for recall).

    Every search scores the whole gallery with float32 matrix products (see `exact_search`), so
    results are exact and mutations cost nothing beyond the storage update.

    Example:
    ```python
    index = ExactIndex().build(embeddings, ids)
    ids, scores = index.search(queries, k=10)
    ```
    """

    def _search(self, queries, k):
        return exact_search(self._storage.vectors, queries, k)
