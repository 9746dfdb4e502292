"""A mutable ScaNN index (scann 1.4.2 pybind API) configured from the gallery size, with `tune()`.

How mutations work: scann 1.4.2's pybind searcher supports `upsert` and `delete` in brute-force,
asymmetric-hashing and tree + AH modes alike — new points are hashed with the trained codebook and
assigned to their nearest leaf, replaced ones re-encoded in place, a deleted one is replaced by the
last datapoint (the order `Index` keeps, so a storage row *is* a ScaNN datapoint index). Both are
visible to the next search at once, no buffer or tombstone needed. The partitioning and codebooks are
only trained at build time, so after many mutations the index is retrained (`rebalance`) from its
current contents: automatically once the mutations since the last training exceed
`rebalance_fraction` of the size trained on, with the auto-configuration re-derived from the new size
(a gallery that grew from 5k to 500k moves from brute force to a tree; what `tune()` chose is kept).

Saving writes ScaNN's own assets (`searcher.serialize`: protobufs and .npy arrays) under `scann/`,
never the pickle of doc ids that the pybind wrapper adds; ids live in our `ids.json`. Loading checks
every file against the manifest, then restores the searcher from those assets (no retraining).

How the search-time settings are chosen (the calibration at build time, `tune()`) lives in
`fgkeras.index.scann_tuning`.
"""

import logging
import math
import os

import numpy as np
from tqdm.auto import tqdm

from fgkeras.index import scann_tuning
from fgkeras.index.base import Index, IndexFormatError, _is_positive_int
from fgkeras.index.exact import exact_search

logger = logging.getLogger(__name__)

MODES = ("brute_force", "ah", "tree")
# ScaNN's guidance (docs/algorithms.md): brute force below ~20k points, AH + reordering below
# ~100k, partitioning + AH + reordering above, with about sqrt(N) leaves.
BRUTE_FORCE_BELOW = 20_000
TREE_FROM = 100_000
# Galleries from this size get a progress bar while they are indexed.
PROGRESS_FROM = 50_000
_UPSERT_CHUNK = 10_000
_UNIT_NORM_TOLERANCE = 1e-3
ASSETS_DIR = "scann"
# Points the AH codebooks train on (what ScaNN's autopilot uses): 16 centres per block of 2
# dimensions need far fewer than the tree, and AH training dominates the build time otherwise.
AH_TRAINING_SAMPLE = 32_000


DEFAULT_REORDER = 250
# Points the tree trains on per leaf. Measured on the 1M hard set of benchmarks/index.py (1,000 leaves,
# 30 searched, 100 reordered, one seed): Recall@10 0.949 / 0.956 / 0.961 with 100 / 250 / 500 points a
# leaf, i.e. ~40 / 33 / 30 leaves searched for the calibration's 0.96; training took 5 / 12 / 22 s.
TREE_SAMPLE_PER_LEAF = 500
def default_mode(num_points):
    """ScaNN's guidance: brute force below 20k points, AH + reordering below 100k, tree + AH above."""
    if num_points < BRUTE_FORCE_BELOW:
        return "brute_force"
    return "ah" if num_points < TREE_FROM else "tree"


class ScannIndex(Index, kind="scann"):
    """Approximate inner-product search with ScaNN, configured from the gallery size.

    With no arguments the structure follows ScaNN's own guidance for N points: brute force below
    20k; asymmetric hashing (AH, `dims_per_block` = 2, anisotropic threshold 0.2) with exact
    reordering below 100k; above, a k-means tree of about sqrt(N) leaves, then AH and
    reordering. The search-time settings (leaves searched, candidates reordered) are then
    *calibrated* at build time: the fastest setting whose Recall@10 reaches `calibration_recall`
    on 300 gallery points used as queries (their own match left out). Queries unlike the gallery
    may get less: `tune()` with real queries does the same on them, and retrains the tree at other
    sizes to find a faster one. Every setting can be forced; `config` tells what is in use (and
    `settings_for(n)` the rules before calibration: 10 % of the leaves, 250 reordered).

    Args:
        mode: None (from N), "brute_force", "ah" or "tree".
        num_leaves: tree leaves (default about sqrt(N)).
        num_leaves_to_search: leaves searched per query (default: calibrated).
        reorder: candidates re-scored exactly after AH (default: calibrated; at least k).
        dims_per_block: AH dimensions per 16-centre codebook block.
        anisotropic_quantization_threshold: ScaNN's AVQ threshold for AH (NaN: plain AH).
        spherical: spherical k-means tree. None: when every vector is L2-normalised (on such data a
            generic tree was measured to stall at Recall@10 0.985). ScaNN normalises what it stores
            in a spherical tree, so such an index then only accepts unit-norm vectors.
        training_sample_size: points the tree and AH codebooks train on (default
            max(100k, 500 × leaves), at most N). Larger galleries train on a random sample, then
            the rest is added in chunks under a progress bar, so the storage order is shuffled.
        threads: search threads (default: every core). 1 searches batches serially; more uses
            ScaNN's parallel batched search, which in scann 1.4.2 uses every core whatever this
            setting.
        training_threads: threads for training (default 0: ScaNN's choice, every core).
        rebalance_fraction: retrain after this many mutations per trained point (None: never
            automatically; `rebalance()` is public).
        calibration_recall: Recall@10 the calibration aims at (None: no calibration, the rules).
        seed: seed of the training sample.
        progress: show a progress bar when indexing 50k points or more.
    """

    def __init__(self, mode=None, num_leaves=None, num_leaves_to_search=None, reorder=None,
                 dims_per_block=2, anisotropic_quantization_threshold=0.2, spherical=None,
                 training_sample_size=None, threads=None, training_threads=0,
                 rebalance_fraction=0.5, calibration_recall=0.96, seed=0, progress=True):
        super().__init__()
        if mode is not None and mode not in MODES:
            raise ValueError(f"`mode` must be None or one of {MODES}. Received: mode={mode!r}")
        for name, value in (("num_leaves", num_leaves), ("num_leaves_to_search", num_leaves_to_search),
                            ("reorder", reorder), ("training_sample_size", training_sample_size),
                            ("threads", threads)):
            if value is not None and not _is_positive_int(value):
                raise ValueError(f"`{name}` must be a positive int or None. Received: {name}={value!r}")
        if not _is_positive_int(dims_per_block):
            raise ValueError(f"`dims_per_block` must be a positive int. Received: dims_per_block={dims_per_block!r}")
        if isinstance(training_threads, bool) or not isinstance(training_threads, int) or training_threads < 0:
            raise ValueError(f"`training_threads` must be an int >= 0. Received: training_threads={training_threads!r}")
        if rebalance_fraction is not None and not (isinstance(rebalance_fraction, (int, float))
                                                   and rebalance_fraction > 0):
            raise ValueError(f"`rebalance_fraction` must be > 0 or None. Received: rebalance_fraction={rebalance_fraction!r}")
        if calibration_recall is not None and not 0 < calibration_recall <= 1:
            raise ValueError(f"`calibration_recall` must be in (0, 1] or None. Received: calibration_recall={calibration_recall!r}")
        if spherical not in (None, True, False):
            raise ValueError(f"`spherical` must be None, True or False. Received: spherical={spherical!r}")
        self._options = {
            "mode": mode, "num_leaves": num_leaves, "num_leaves_to_search": num_leaves_to_search,
            "reorder": reorder, "dims_per_block": dims_per_block,
            "anisotropic_quantization_threshold": float(anisotropic_quantization_threshold),
            "spherical": spherical, "training_sample_size": training_sample_size,
        }
        self._threads = threads
        self.training_threads = training_threads
        self.rebalance_fraction = rebalance_fraction
        self.auto_rebalance = True  # `rebalance()` inside the mutation that makes it due (see `retrained`)
        self.calibration_recall = calibration_recall
        self._calibration = None
        self.seed = seed
        self.progress = progress
        self._tuned = {}
        self._settings = None
        self._searcher = None
        self._trained_size = 0
        self._mutations = 0

    # ------------------------------------------------------------------ configuration

    @property
    def config(self):
        """The settings in use (after auto-configuration and `tune()`), and the constructor's."""
        settings = dict(self._settings) if self._settings else self._resolve(len(self))
        return {**settings, "threads": self.threads or os.cpu_count(),
                "training_threads": self.training_threads, "rebalance_fraction": self.rebalance_fraction,
                "calibration": self._calibration, "seed": self.seed, "trained_size": self._trained_size,
                "mutations_since_training": self._mutations}

    def settings_for(self, num_points, unit_norm=True):
        """The settings this index would build for `num_points` vectors (L2-normalised or not),
        before the calibration of the search-time settings."""
        return self._resolve(num_points, spherical=unit_norm)

    def _resolve(self, num_points, spherical=None, num_leaves=None):
        """The settings for `num_points` points: `tune()`'s choices first, then the constructor's,
        then the rules. `num_leaves` forces the tree size (a candidate of `tune`)."""
        options = self._options
        mode = options["mode"] or default_mode(num_points)
        settings = {"mode": mode, "dims_per_block": options["dims_per_block"],
                    "anisotropic_quantization_threshold": options["anisotropic_quantization_threshold"]}
        leaves = None
        if mode == "tree":
            leaves = (num_leaves or self._tuned.get("num_leaves") or options["num_leaves"]
                      or round(math.sqrt(num_points)))
            leaves = max(2, min(leaves, num_points // 2))
        tuned = self._tuned_search(leaves)
        if mode != "brute_force":
            settings["reorder"] = tuned.get("reorder") or options["reorder"] or DEFAULT_REORDER
        if mode == "tree":
            searched = tuned.get("num_leaves_to_search") or options["num_leaves_to_search"] or math.ceil(leaves / 10)
            settings.update(
                num_leaves=leaves,
                num_leaves_to_search=max(1, min(leaves, searched)),
                training_sample_size=max(1, min(num_points, options["training_sample_size"]
                                                or max(100_000, TREE_SAMPLE_PER_LEAF * leaves))),
                spherical=options["spherical"] if options["spherical"] is not None else bool(spherical),
            )
        return settings

    def _tuned_search(self, num_leaves):
        """The search-time settings `tune()` chose that apply to a tree of `num_leaves` (None: no
        tree): the reordering always, the leaves searched only on a tree of the size tuned."""
        tuned = {key: self._tuned[key] for key in ("reorder",) if key in self._tuned}
        searched = self._tuned.get("num_leaves_to_search")
        if num_leaves is not None and num_leaves == self._tuned.get("num_leaves") and searched is not None:
            tuned["num_leaves_to_search"] = searched
        return tuned

    def configure(self, builder, settings=None):
        """Applies ScaNN settings to a ScaNN builder and returns it.

        Both `scann.scann_ops_pybind.builder(db, k, "dot_product")` and the TensorFlow-ops
        `scann.scann_ops.builder(db, k, "dot_product")` are accepted, so an in-graph searcher
        over `embeddings` gets this index's structure and search-time settings:
        `index.configure(scann_ops.builder(index.embeddings, k, "dot_product")).build()`.

        Args:
            builder: a ScaNN builder over the points to index (`builder.db`).
            settings: a dict of settings as `config` or `settings_for` gives them (default: the
                settings in use, which needs a built index).
        """
        if settings is None:
            if self._settings is None:
                raise ValueError("`configure` needs the settings of a built index: build it first.")
            settings = self._settings
        num_points = len(builder.db)
        if settings["mode"] == "brute_force":
            return builder.score_brute_force()
        if settings["mode"] == "tree":
            builder = builder.tree(
                num_leaves=settings["num_leaves"], num_leaves_to_search=settings["num_leaves_to_search"],
                training_sample_size=settings["training_sample_size"], spherical=settings["spherical"],
                min_partition_size=min(50, max(1, num_points // (2 * settings["num_leaves"]))),
            )
        builder = builder.score_ah(
            settings["dims_per_block"],
            anisotropic_quantization_threshold=settings["anisotropic_quantization_threshold"],
            training_sample_size=min(num_points, AH_TRAINING_SAMPLE),
        )
        return builder.reorder(settings["reorder"])

    def _scann_config(self, settings, data):
        from scann.scann_ops.py import scann_ops_pybind

        return self.configure(scann_ops_pybind.builder(data, 10, "dot_product"), settings).create_config()

    # ------------------------------------------------------------------ building and mutations

    def _on_build(self):
        self._build_searcher()

    def _build_searcher(self):
        num_points = len(self)
        self._mutations = 0
        self._trained_size = num_points
        if num_points == 0:
            self._searcher, self._settings = None, self._resolve(0)
            return
        unit = _unit_norm(self._storage.vectors)
        settings = self._resolve(num_points, spherical=unit)
        if settings.get("spherical") and not unit:
            raise ValueError(
                "`spherical=True` needs L2-normalised vectors (ScaNN normalises what a spherical tree "
                "stores); these are not. L2-normalise them or use spherical=False."
            )
        self._searcher, self._settings = self._train(settings), settings
        self._on_threads()
        if self.calibration_recall is not None:
            scann_tuning.calibrate(self)

    def _train(self, settings):
        """A new ScaNN searcher of `settings` over the stored vectors (which it may reorder)."""
        from scann.scann_ops.py import scann_ops_pybind

        num_points = len(self)
        vectors = self._storage.vectors
        sample = settings.get("training_sample_size", num_points) if settings["mode"] != "brute_force" else num_points
        if sample < num_points:
            # Train on a random sample (what ScaNN's own sampling does), then add the rest in chunks
            # under a progress bar. The storage is reordered to match ScaNN's datapoint order.
            order = np.random.default_rng(self.seed).permutation(num_points)
            self._storage.permute(order)
            vectors = self._storage.vectors
        logger.info("training ScaNN (%s) on %d of %d points, dim %d", settings["mode"], sample, num_points,
                    vectors.shape[1])
        head = np.ascontiguousarray(vectors[:sample])
        searcher = scann_ops_pybind.create_searcher(head, self._scann_config(settings, head),
                                                    self.training_threads).searcher
        if sample < num_points:
            searcher.reserve(num_points)
            _upsert_chunks(searcher, [None] * (num_points - sample), vectors[sample:],
                           progress=self.progress, description="indexing")
        return searcher

    def _on_threads(self):
        if self._searcher is not None:
            self._searcher.set_num_threads(self.threads or os.cpu_count())

    def _on_upsert(self, slots, embeddings):
        if self._searcher is None:
            self._build_searcher()
            return
        try:
            _upsert_chunks(self._searcher, slots, embeddings, progress=self.progress, description="upserting")
        except RuntimeError as error:  # the storage is the truth: rebuild ScaNN from it
            logger.warning("ScaNN upsert failed (%s); rebuilding the searcher from the stored vectors", error)
            self._build_searcher()
            return
        self._mutations += len(slots)
        self._maybe_rebalance()

    def _check_upsert_vectors(self, embeddings):
        # A spherical tree would silently normalise non-unit vectors: refuse them before mutating.
        # An empty index trains its first tree on them, spherical when the constructor said so.
        if self._searcher is not None:
            spherical = bool(self._settings and self._settings.get("spherical"))
        else:
            spherical = self._options["spherical"] is True and self._resolve(len(embeddings))["mode"] == "tree"
        if spherical and not _unit_norm(embeddings):
            raise ValueError(
                "`embeddings` must be L2-normalised: this index uses a spherical tree (chosen because "
                "the gallery was L2-normalised, or by `spherical=True`), which normalises what it stores. "
                "L2-normalise them, or build with ScannIndex(spherical=False)."
            )

    def _on_delete(self, rows):
        if len(self) == 0:
            self._searcher = None
            return
        try:
            self._searcher.delete(rows)
        except RuntimeError as error:
            logger.warning("ScaNN delete failed (%s); rebuilding the searcher from the stored vectors", error)
            self._build_searcher()
            return
        self._mutations += len(rows)
        self._maybe_rebalance()

    @property
    def rebalance_due(self):
        """True once the mutations since the last training exceed `rebalance_fraction` of the points trained on."""
        fraction = self.rebalance_fraction
        return fraction is not None and self._mutations > fraction * max(self._trained_size, 1)

    def _maybe_rebalance(self):
        if self.auto_rebalance and self.rebalance_due:
            self.rebalance()

    def retrained(self, embeddings, ids):
        """A new index of this one's configuration (options, tuned settings, threads) and `metadata`,
        built on `embeddings` and `ids`; this index is left as it is.

        What a server does instead of `rebalance()` inside the mutation that makes it due: it sets
        `auto_rebalance = False`, trains a copy of the contents with this in another thread while
        the index keeps serving, replays the mutations made meanwhile onto it and swaps it in.
        """
        index = self._from_manifest_config(self._manifest_config())
        index.auto_rebalance = self.auto_rebalance
        index.metadata = self.metadata
        return index.build(embeddings, ids)

    def rebalance(self):
        """Retrains the partitioning and codebooks on the current contents.

        The auto-configuration is re-derived from the current size (a tree size and search settings
        chosen by `tune()` are kept): when it is unchanged, ScaNN's own `rebalance` retrains in
        place; otherwise (e.g. a brute-force index grew past 20k) the searcher is rebuilt with the
        new settings.
        """
        if self._searcher is None or len(self) == 0:
            self._build_searcher()
            return
        settings = self._resolve(len(self), spherical=self._settings.get("spherical", False))
        if settings == self._settings and settings["mode"] == "brute_force":
            pass  # nothing is trained
        elif settings == self._settings:
            logger.info("rebalancing ScaNN (%s) on %d points", settings["mode"], len(self))
            self._searcher.rebalance("")
        else:
            logger.info("rebuilding ScaNN for %d points: %s -> %s", len(self), self._settings, settings)
            self._build_searcher()
            return
        self._mutations = 0
        self._trained_size = len(self)

    # ------------------------------------------------------------------ search

    def _search(self, queries, k):
        return self._scann_search(queries, k, *self.search_arguments(k))

    def search_arguments(self, k):
        """`(pre_reorder_num_neighbors, leaves_to_search)`: what `search(queries, k)` passes to
        ScaNN, from the settings in use (calibrated or tuned); -1 where ScaNN takes none."""
        settings = self._settings or self._resolve(len(self))
        reorder = max(settings.get("reorder", k), k) if settings["mode"] != "brute_force" else -1
        return reorder, settings.get("num_leaves_to_search", -1)

    def write_scann_assets(self, directory):
        """Writes the searcher in use, as ScaNN serialises it, into the existing `directory`:
        `scann_config.pb`, `scann_assets.pbtxt` and the arrays and protobufs that it lists (the
        trained partitioning and codebooks, every point as upserted since; never a pickle). What
        `save` keeps under `scann/`, and what an in-graph ScaNN searcher is rebuilt from
        (`fgkeras.export.saved_model.scann_state`).

        Raises:
            ValueError: the index is empty (there is no searcher).
        """
        if self._searcher is None:
            raise ValueError("`write_scann_assets` needs a non-empty index: build it first.")
        # The raw pybind searcher: its `serialize` writes ScaNN's assets only (the Python wrapper
        # would add a pickle of doc ids, which we never write nor read).
        self._searcher.serialize(os.fspath(directory), True)

    def _scann_search(self, queries, k, reorder, leaves):
        if reorder != -1:
            reorder = max(reorder, k)
        if len(queries) == 1:
            rows, scores = self._searcher.search(queries[0], k, reorder, leaves)
            if len(rows) == k:
                return rows[None], scores[None]
            rows, scores = _pad(rows[None], scores[None], k)
        else:
            parallel = (self.threads or os.cpu_count()) > 1
            rows, scores = self._searcher.search_batched(queries, k, reorder, leaves, parallel, 256)
            if not np.isnan(scores[:, -1]).any():
                return rows, scores
        # The leaves searched held fewer than k points: exact search completes those queries.
        missing = np.isnan(scores).any(axis=1)
        exact_rows, exact_scores = exact_search(self._storage.vectors, queries[missing], k, threads=self.threads)
        rows, scores = rows.astype(np.int64), scores.copy()
        rows[missing], scores[missing] = exact_rows, exact_scores
        return rows, scores

    def tune(self, queries, target_recall=0.95, k=10, repeats=2, confidence=0.99, num_leaves=None):
        """Picks the fastest setting reaching `target_recall` Recall@k, and applies it.

        Recall@k = mean over `queries` of |approximate top k ∩ exact top k| / k, the exact top k
        from `exact_search`. A setting *reaches* the target when a lower confidence bound of its
        recall does: the mean over `queries` less z standard errors of that mean (z the
        `confidence` quantile of the normal distribution: 2.33 at 0.99), so that the setting holds
        on unseen queries like these rather than on these only. The margin shrinks as 1 / √Q with
        the number of queries: 1,000 queries of mean recall 0.95 typically give about 0.005. The
        default confidence is high because the fastest of several settings that pass is applied,
        which favours one whose recall on these queries is high by chance (at 0.95, one run in
        about twenty of the tests' set fell below the target on held-out queries).

        Tried on a tree: each size of `num_leaves`, the partitioning retrained for each but the
        current one (a rebuild each: about a minute per size at 1M points, under a progress bar,
        each size's result logged). On each tree, `reorder` on a ladder from k, and for each the
        fewest `num_leaves_to_search` (bisection; recall grows with it) that reach the target; the
        fastest of those (batched throughput over `queries` with the index's threads, best of
        `repeats`). Each tree's fastest setting is then timed in turns with the best tree's so
        far, and the faster kept. Without a tree, the ladder of `reorder` alone.

        The choice (tree size, leaves searched, reordering) overrides the constructor's settings
        and is kept by save / load and later rebalances: the tree keeps its size until the next
        `tune` or a change of mode, so re-run it after the gallery changed size a lot. If nothing
        reaches the target, the setting of highest recall is applied.

        Args:
            queries: (Q, D) queries like the real ones (hundreds to a few thousand).
            target_recall: in (0, 1].
            k: the k of Recall@k.
            repeats: timings of each setting, the best kept.
            confidence: in [0.5, 1): the confidence of the bound; 0.5 compares the mean itself.
            num_leaves: tree sizes to try (a tree index only). None: the current tree and the sizes
                of `scann_tuning.tune_tree_sizes(N)` (1, 2 and 4 × √N leaves, those of 100 points or more on
                average; 1M: 1000, 2000, 4000), or only the current tree when the constructor set
                `num_leaves`. An int or a list of ints: those sizes only, so
                `num_leaves=index.config["num_leaves"]` keeps the tree and retrains nothing.
        Returns:
            a report: `target_recall`, `confidence`, `k`, `reached`, `chosen` (the settings
            applied, with `num_leaves` on a tree), `recall` (the mean over `queries`),
            `recall_bound` and `qps` of the choice, `before` (the same for the settings before),
            `trials` and, on a tree, `trees`: per size tried, its fastest setting reaching the
            target (else its best), `recall`, `recall_bound`, `qps`, `reached` and `build_seconds`
            (0 for the tree in place).
        """
        return scann_tuning.tune(self, queries, target_recall, k, repeats, confidence, num_leaves)

    def _state(self):
        """What `tune` swaps when it tries another tree: the searcher, its settings and storage order."""
        return {"searcher": self._searcher, "settings": self._settings, "ids": self._storage.ids.copy(),
                "trained_size": self._trained_size, "mutations": self._mutations, "calibration": self._calibration}

    def _set_state(self, state):
        self._searcher, self._settings = state["searcher"], state["settings"]
        self._trained_size, self._mutations, self._calibration = (state["trained_size"], state["mutations"],
                                                                  state["calibration"])
        if not np.array_equal(self._storage.ids, state["ids"]):  # another tree's training reordered them
            self._storage.permute(self._rows_of(state["ids"]))
        self._on_threads()

    def _rows_of(self, ids):
        """The storage rows of an array of ids, in its shape."""
        rows = self._storage.rows
        return np.fromiter((rows[i] for i in np.ravel(ids)), np.int64, count=np.size(ids)).reshape(np.shape(ids))

    # ------------------------------------------------------------------ saving

    def _manifest_config(self):
        import scann

        options = {key: value for key, value in self._options.items()}
        if math.isnan(options["anisotropic_quantization_threshold"]):
            options["anisotropic_quantization_threshold"] = None
        settings = dict(self._settings or {})
        if "anisotropic_quantization_threshold" in settings and math.isnan(settings["anisotropic_quantization_threshold"]):
            settings["anisotropic_quantization_threshold"] = None
        return {"options": options, "settings": settings, "tuned": self._tuned, "threads": self.threads,
                "training_threads": self.training_threads, "rebalance_fraction": self.rebalance_fraction,
                "calibration_recall": self.calibration_recall, "calibration": self._calibration,
                "seed": self.seed, "trained_size": self._trained_size, "mutations": self._mutations,
                "scann_assets": self._searcher is not None,
                "scann_version": getattr(scann, "__version__", "1.4.2")}

    @classmethod
    def _from_manifest_config(cls, config):
        try:
            options = dict(config["options"])
            if options.get("anisotropic_quantization_threshold") is None:
                options["anisotropic_quantization_threshold"] = float("nan")
            index = cls(**options, threads=config["threads"], training_threads=config["training_threads"],
                        rebalance_fraction=config["rebalance_fraction"], seed=config["seed"],
                        calibration_recall=config["calibration_recall"])
            index._tuned = dict(config["tuned"])
            index._calibration = config["calibration"]
        except (KeyError, TypeError, ValueError) as error:
            raise IndexFormatError(f"manifest `config` of a scann index is malformed: {error!r}") from None
        return index

    def _save_extra(self, directory):
        if self._searcher is None:
            return
        assets = os.path.join(directory, ASSETS_DIR)
        os.makedirs(assets)
        self.write_scann_assets(assets)

    def _load_extra(self, files, manifest):
        config = manifest["config"]
        self._mutations = config.get("mutations", 0)
        self._trained_size = config.get("trained_size", len(self))
        if not config.get("scann_assets") or len(self) == 0:
            self._build_searcher()
            return
        pbtxt = _checked_assets(files, manifest)
        prefix = f"{ASSETS_DIR}/"
        assets = files.directory_of(ASSETS_DIR, [name[len(prefix):] for name in manifest["files"]
                                                 if name.startswith(prefix) and "/" not in name[len(prefix):]])
        try:
            searcher = _load_scann(assets, pbtxt)
        except RuntimeError as error:
            raise IndexFormatError(f"ScaNN could not load its assets from {assets}: {error}") from None
        if searcher.size() != len(self):
            raise IndexFormatError(
                f"ScaNN assets in {assets} hold {searcher.size()} points; the manifest says {len(self)}."
            )
        self._searcher = searcher
        self._settings = dict(config["settings"])
        if self._settings.get("anisotropic_quantization_threshold", 0.0) is None:
            self._settings["anisotropic_quantization_threshold"] = float("nan")
        self._on_threads()


def _load_scann(assets, pbtxt):
    from scann.scann_ops.py import scann_ops_pybind  # noqa: F401  (sets up the path of scann_pybind)
    import scann_pybind

    return scann_pybind.ScannNumpy(assets, pbtxt)


def _checked_assets(files, manifest):
    """ScaNN's asset list (from the index's `_IndexFiles`), accepted only when it names plain files
    of this directory that the manifest lists (so they were checked) and none is a pickle."""
    from google.protobuf import text_format
    from scann.scann_ops import scann_assets_pb2

    relative = f"{ASSETS_DIR}/scann_assets.pbtxt"
    path = os.path.join(files.directory, ASSETS_DIR, "scann_assets.pbtxt")
    listed = set(manifest["files"])
    if relative not in listed:
        raise IndexFormatError(f"the manifest does not list {relative}.")
    try:
        message = text_format.Parse(files.read(relative).decode("utf-8"), scann_assets_pb2.ScannAssets())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as error:
        raise IndexFormatError(f"{path} is not a ScaNN asset list: {error}") from None
    for asset in message.assets:
        name = asset.asset_path
        if os.path.isabs(name) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise IndexFormatError(f"{path} names an asset outside its directory: {name!r}")
        if name.endswith((".pkl", ".pickle")):
            raise IndexFormatError(f"{path} names a pickle, which is never loaded: {name!r}")
        if f"{ASSETS_DIR}/{name}" not in listed:
            raise IndexFormatError(f"{path} names {name!r}, which the manifest does not list.")
    return text_format.MessageToString(message)


def _upsert_chunks(searcher, slots, vectors, progress, description):
    total = len(slots)
    with tqdm(total=total, desc=description, unit="pt", disable=not progress or total < PROGRESS_FROM) as bar:
        for start in range(0, total, _UPSERT_CHUNK):
            part = vectors[start:start + _UPSERT_CHUNK]
            searcher.upsert(slots[start:start + _UPSERT_CHUNK], list(part), 256)
            bar.update(len(part))


def _pad(rows, scores, k):
    if rows.shape[1] == k:
        return rows, scores
    padded_rows = np.zeros((len(rows), k), rows.dtype)
    padded_scores = np.full((len(rows), k), np.nan, np.float32)
    padded_rows[:, : rows.shape[1]] = rows
    padded_scores[:, : rows.shape[1]] = scores
    return padded_rows, padded_scores


def _unit_norm(vectors):
    if len(vectors) == 0:
        return True
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    return bool(np.all(np.abs(norms - 1.0) <= _UNIT_NORM_TOLERANCE))
