"""Exact (brute-force) inner-product search: float32 BLAS matrix products and a cheap top-k, on every core."""

import concurrent.futures
import contextlib
import itertools
import math
import os
import queue
import threading

import numpy as np

from fgkeras.index.base import Index, IndexFormatError

# A matrix product scores SCORE_BLOCK // (queries) gallery rows against up to QUERY_BLOCK queries:
# a (rows, queries) float32 block of 1 MiB, which the top-k pass then reads from the core's L2 cache.
QUERY_BLOCK = 512
SCORE_BLOCK = 1 << 18
# Reading a gallery row costs about as much as scoring it against ROW_READ queries: fewer queries
# than that, and the products are bound by the reading, which BLAS's own threads split well. For
# more, the gallery is cut into ranges of rows, scanned for a block of queries by whichever thread
# is free: up to RANGES_PER_THREAD per thread, so that a thread slowed down by other work on the
# machine leaves ranges to the others, and none cheaper than MIN_TASK multiply-adds.
ROW_READ = 16
RANGES_PER_THREAD = 4
MIN_TASK = 1 << 24
# Columns of a score block are split into this many interleaved groups for the top-k of the first
# block (see `_top_k_columns`), and the rows of the later blocks into ROW_GROUPS groups (see `_above`).
GROUPS = 32
ROW_GROUPS = 8


def exact_search(gallery, queries, k, threads=None, query_block=QUERY_BLOCK, score_block=SCORE_BLOCK):
    """The exact top-`k` rows of `gallery` by inner product with each query, best first.

    The queries are cut into blocks and the gallery into ranges of rows. Each of `threads` threads
    takes (query block, range) tasks in turn and keeps a running top k for each query block it
    meets: it scores the range a block of rows at a time with a float32 matrix product (BLAS
    sgemm), then updates the top k of each query with a cheap vectorised pass over the score block
    while it is in cache:

    - the first block's top k come from `_top_k_columns` (a group-maximum filter, then a partial
      sort of a few candidates);
    - every later block is compared with each query's current k-th best score (see `_above`):
      only the scores above it (on random order about k / j of them per query in the j-th block)
      are gathered, and merged into the running top k.

    The threads' top k are then merged. BLAS itself is held at one thread meanwhile: the threads
    are the parallelism (numpy releases the GIL in the products and in the top-k passes). Fewer
    than ROW_READ queries are scanned by one thread, their products (matrix-vector for one query)
    split by BLAS's threads instead. A search cheaper than one task (MIN_TASK multiply-adds) is a
    single product and a partial sort.

    Args:
        gallery: (N, D) float32, C-contiguous.
        queries: (Q, D) float32.
        k: int, 1 <= k <= N.
        threads: threads to use (None: every core). The BLAS thread count is process-wide, so
            searches from several threads take turns.
        query_block: queries per matrix product.
        score_block: entries of a score block (sets the gallery rows per matrix product).
    Returns:
        `(rows, scores)`: (Q, k) int64 gallery rows and (Q, k) float32 inner products, by
        decreasing score.
    """
    if len(queries) == 0:
        return np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    if len(gallery) * len(queries) * gallery.shape[1] < MIN_TASK:
        # Cheaper than one task: one product and a partial sort, without threads or BLAS limits.
        scores = queries @ gallery.T
        columns = _top_k_columns(scores, k).astype(np.int64)
        return _sorted(columns, np.take_along_axis(scores, columns, axis=1))
    threads = threads or os.cpu_count()
    query_block = min(query_block, len(queries))
    gallery_block = max(score_block // query_block, k)
    query_starts = range(0, len(queries), query_block)
    split = threads > 1 and len(queries) >= ROW_READ
    ranges = _ranges(len(gallery), k, gallery.shape[1] * (query_block + ROW_READ),
                     math.ceil(RANGES_PER_THREAD * threads / len(query_starts)) if split else 1)
    tasks = queue.SimpleQueue()
    for task in itertools.product(query_starts, ranges):
        tasks.put(task)

    def work():
        """Runs tasks until none is left: {query block start: its (rows, scores) top k}.

        The queue is FIFO, so the ranges a thread meets for a query block come in increasing order of
        rows, which the running top k needs to keep the lowest rows of equal scores (see `_above`)."""
        tops = {}
        buffer = np.empty(query_block * gallery_block, np.float32)
        while True:
            try:
                q0, (start, stop) = tasks.get_nowait()
            except queue.Empty:
                return {q0: top.result() for q0, top in tops.items()}
            tops[q0] = _scan(gallery, queries[q0:q0 + query_block], k, start, stop, buffer, tops.get(q0))

    workers = min(threads, len(query_starts) * len(ranges))
    with _limited_blas(1 if split else threads):
        if workers == 1:
            found = [work()]
        else:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                found = [future.result() for future in [pool.submit(work) for _ in range(workers)]]
    rows = np.empty((len(queries), k), np.int64)
    scores = np.empty((len(queries), k), np.float32)
    for q0 in query_starts:
        parts = [top[q0] for top in found if q0 in top]
        block_rows, block_scores = (np.concatenate(part, axis=1) for part in zip(*parts))
        if len(parts) > 1:
            best = _best_k(block_scores, block_rows, k)
            block_rows = np.take_along_axis(block_rows, best, axis=1)
            block_scores = np.take_along_axis(block_scores, best, axis=1)
        rows[q0:q0 + query_block], scores[q0:q0 + query_block] = _sorted(block_rows, block_scores)
    return rows, scores


def _ranges(num_rows, k, work_per_row, wanted):
    """`wanted` (start, stop) ranges of about equal size covering the rows, fewer when a range would
    hold less than k rows or cost less than MIN_TASK (`work_per_row` a row)."""
    count = max(1, min(wanted, num_rows // k, num_rows * work_per_row // MIN_TASK))
    bounds = [num_rows * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _scan(gallery, queries, k, start, stop, buffer, top):
    """Updates the running top k `top` of `queries` (None: a new one) with gallery rows [start, stop),
    at least k of them, scored `len(buffer) // len(queries)` rows at a time; returns it."""
    queries_t = queries.T
    block = len(buffer) // len(queries)
    for g0 in range(start, stop, block):
        part = gallery[g0:min(g0 + block, stop)]
        scores = buffer[: len(part) * len(queries)].reshape(len(part), len(queries))
        np.dot(part, queries_t, out=scores)
        if top is None:
            top = _RunningTopK(scores, k, g0)
        else:
            top.add(scores, g0)
    return top


class _LimitedBlas:
    """A context that holds the BLAS libraries at a number of threads, for one search at a time.

    Their thread count is process-wide, and threadpoolctl lets one thread at a time change it (the
    calls of others are ignored until it is done), so concurrent searches take turns: each uses
    the threads it is given anyway. The libraries are found once: finding them takes milliseconds.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._controller = None

    @contextlib.contextmanager
    def __call__(self, threads):
        with self._lock:
            if self._controller is None:
                import threadpoolctl

                self._controller = threadpoolctl.ThreadpoolController()
            with self._controller.limit(limits=threads, user_api="blas"):
                yield


_limited_blas = _LimitedBlas()


class _RunningTopK:
    """The top k of each query over successive (gallery rows, queries) score blocks.

    The scores of a block above their query's current k-th best are kept as candidates (see
    `_above`), and merged into the top k (which raises the thresholds) once there are more than k
    per query: on random order the j-th block holds about k / j candidates per query, so the
    merges come at geometrically spaced blocks, a dozen numpy calls each.
    """

    def __init__(self, scores, k, offset):
        """`scores`: the first block, at least k rows; `offset`: the gallery row of its first row."""
        by_query = np.ascontiguousarray(scores.T)
        columns = _top_k_columns(by_query, k)
        self.k = k
        self.rows = columns + offset
        self.scores = np.take_along_axis(by_query, columns, axis=1)
        self.threshold = self.scores.min(axis=1)
        self._pending = []
        self._count = 0

    def add(self, scores, offset):
        queries, rows, values = _above(scores, self.threshold)
        if queries.size:
            self._pending.append((queries, rows + offset, values))
            self._count += queries.size
            if self._count > self.k * len(self.threshold):
                self._merge()

    def result(self):
        """(rows, scores): the top k of each query so far, unordered."""
        self._merge()
        return self.rows, self.scores

    def _merge(self):
        if not self._pending:
            return
        queries, rows, scores = (np.concatenate(parts) for parts in zip(*self._pending))
        self._pending, self._count = [], 0
        order = np.argsort(queries, kind="stable")
        queries, rows, scores = queries[order], rows[order], scores[order]
        k = self.k
        starts = np.flatnonzero(np.concatenate([[True], queries[1:] != queries[:-1]]))
        counts = np.diff(np.append(starts, len(queries)))
        touched = queries[starts]
        width = k + int(counts.max())
        pooled_scores = np.full((len(touched), width), -np.inf, np.float32)
        pooled_rows = np.zeros((len(touched), width), np.int64)
        pooled_scores[:, :k] = self.scores[touched]
        pooled_rows[:, :k] = self.rows[touched]
        line = np.repeat(np.arange(len(touched)), counts)
        position = k + np.arange(len(queries)) - np.repeat(starts, counts)
        pooled_scores[line, position] = scores
        pooled_rows[line, position] = rows
        best = _best_k(pooled_scores, pooled_rows, k)
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
    """Column indices (Q, k) of the k largest entries of each row of `scores` (Q, C), unordered;
    of equal scores at the k-th place, the lowest columns.

    Only the k groups of largest maximum (see `_group_maxima`) can hold the k best scores: each of
    the k best lies in a group whose maximum is at least the k-th best score, and at most k groups
    have such a maximum — unless the k-th best is tied, when more groups may reach it and hold a
    lower column of that score: those rows are then selected over all their columns.
    """
    num_columns = scores.shape[1]
    width = num_columns // GROUPS
    if width <= 4 * k:
        return _best_k(scores, np.arange(num_columns), k)
    maxima = _group_maxima(scores[:, : width * GROUPS])
    groups = np.argpartition(maxima, width - k, axis=1)[:, width - k:]
    columns = (groups[:, :, None] + np.arange(GROUPS) * width).reshape(len(scores), -1)
    tail = num_columns - width * GROUPS
    if tail:
        extra = np.arange(width * GROUPS, num_columns)
        columns = np.concatenate([columns, np.broadcast_to(extra, (len(scores), tail))], axis=1)
    values = np.take_along_axis(scores, columns, axis=1)
    best = np.take_along_axis(columns, _best_k(values, columns, k), axis=1)
    kth = np.take_along_axis(scores, best, axis=1).min(axis=1)
    spread = np.flatnonzero((maxima >= kth[:, None]).sum(axis=1) > k)
    if spread.size:
        best[spread] = _best_k(scores[spread], np.arange(num_columns), k)
    return best


def _best_k(values, labels, k):
    """Positions (Q, k) of the k largest entries of each row of `values` (Q, C), unordered; of equal
    values at the k-th place, those of the lowest `labels` ((C,) or (Q, C), unique within a row).

    A partial sort finds the k-th largest value; only the rows where more than k entries reach it
    (ties at the boundary, rare on real data) are then sorted by (value, label).
    """
    num = values.shape[1]
    if num == k:
        return np.broadcast_to(np.arange(k), values.shape).copy()
    best = np.argpartition(values, num - k, axis=1)[:, num - k:]
    kth = np.take_along_axis(values, best, axis=1).min(axis=1)
    tied = np.flatnonzero((values >= kth[:, None]).sum(axis=1) > k)
    if tied.size:
        labels = np.broadcast_to(labels, values.shape)[tied]
        best[tied] = np.lexsort((labels, -values[tied]), axis=1)[:, :k]
    return best


def _above(scores, thresholds):
    """(queries, rows, scores) of the entries of `scores` (rows, Q) above their query's threshold.

    Strictly above: a score equal to the k-th best comes from a later, so higher, row than those
    already kept, which win ties.

    One vectorised pass takes each query's maximum over each of ROW_GROUPS groups of rows (a
    reduction over the middle axis of (groups, rows, Q): one elementwise maximum per row, along
    the queries). Only the (group, query) pairs whose maximum beats the threshold — after the first
    blocks, on random order, a few percent — are then gathered and compared.
    """
    num_rows, num_queries = scores.shape
    groups = ROW_GROUPS if num_rows % ROW_GROUPS == 0 else 1
    size = num_rows // groups
    blocks = scores.reshape(groups, size, num_queries)
    group, query = np.divmod(np.flatnonzero(blocks.max(axis=1) > thresholds), num_queries)
    values = blocks[group, :, query]
    flat = np.flatnonzero(values > thresholds[query][:, None])
    pair, row = np.divmod(flat, size)
    return query[pair], group[pair] * size + row, values.ravel()[flat]


def _sorted(rows, scores):
    """`rows` and `scores` (Q, k) by decreasing score, equal scores by increasing row."""
    order = np.lexsort((rows, -scores), axis=1)
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


class ExactIndex(Index, kind="exact"):
    """Brute-force inner-product search with the `Index` interface (the reference for recall).

    Every search scores the whole gallery with float32 matrix products (see `exact_search`), so
    results are exact and mutations cost nothing beyond the storage update.

    Args:
        threads: search threads (None: every core). BLAS is held to them during a search.

    Example:
    ```python
    index = ExactIndex().build(embeddings, ids)
    ids, scores = index.search(queries, k=10)
    ```
    """

    def __init__(self, threads=None):
        super().__init__()
        self.threads = threads

    def _search(self, queries, k):
        return exact_search(self._storage.vectors, queries, k, threads=self.threads)

    def _manifest_config(self):
        return {"threads": self.threads}

    @classmethod
    def _from_manifest_config(cls, config):
        try:
            return cls(threads=config.get("threads"))
        except ValueError as error:
            raise IndexFormatError(f"manifest `config` of an exact index is malformed: {error}") from None
