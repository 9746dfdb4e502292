"""How `ScannIndex` picks its search-time settings: the calibration at build time and `tune()`.

Both search the (candidates reordered, leaves searched) settings of the tree in place for the fastest
whose Recall@k reaches a target, against the exact top k of `exact_search`: the calibration on gallery
points used as queries (their own match left out), `tune` on real queries with a confidence margin
and, on a tree, over trees of other sizes trained for the purpose. The functions here take the
`ScannIndex` and work through its searcher, settings and state (`_scann_search`, `_train`,
`_resolve`, `_state` / `_set_state`); `ScannIndex.tune` is the public entry point.
"""

import logging
import math
import statistics
import time

import numpy as np
from tqdm.auto import tqdm

from fgkeras.index.base import _check_matrix, _is_positive_int, recall_per_query
from fgkeras.index.exact import exact_search

logger = logging.getLogger(__name__)

# Gallery points used as queries by the calibration of the search-time settings.
CALIBRATION_QUERIES = 300
# Candidates reordered that the calibration and `tune` try, besides k, 2k, 3k and 4k.
REORDER_LADDER = (50, 70, 100, 150, 200, 300, 400, 800)
# Tree sizes `tune` tries by default, in multiples of the sqrt(N) leaves of the auto-configuration,
# and the points a leaf must hold on average for a size to be tried (its k-means centre is then
# trained on at least that many points).
TUNE_LEAF_FACTORS = (1, 2, 4)
TUNE_MIN_LEAF_SIZE = 100


def tune_tree_sizes(num_points):
    """The numbers of leaves `ScannIndex.tune` tries by default on `num_points` points: 1, 2 and 4
    times sqrt(N), those whose leaves hold at least 100 points on average (1M: 1000, 2000, 4000)."""
    root = round(math.sqrt(num_points))
    return [factor * root for factor in TUNE_LEAF_FACTORS
            if root and num_points >= TUNE_MIN_LEAF_SIZE * factor * root]


def tune(index, queries, target_recall=0.95, k=10, repeats=2, confidence=0.99, num_leaves=None):
    """`ScannIndex.tune` (see there): picks and applies the fastest setting reaching `target_recall`."""
    if index._searcher is None:
        raise ValueError("`tune` needs a non-empty index: build it first.")
    if not 0 < target_recall <= 1:
        raise ValueError(f"`target_recall` must be in (0, 1]. Received: target_recall={target_recall!r}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"`confidence` must be in [0.5, 1). Received: confidence={confidence!r}")
    queries = _check_matrix(queries, "queries", dim=index.dim, allow_vector=True)
    sizes = _tree_sizes(index, num_leaves)
    k = min(int(k), len(index))
    exact_rows, _ = exact_search(index._storage.vectors, queries, k, threads=index.threads)
    z = statistics.NormalDist().inv_cdf(confidence)
    if sizes:
        report = _choose_tree(index, queries, index._storage.ids[exact_rows], k, target_recall, repeats, z, sizes)
    else:
        report = _choose(index, queries, exact_rows, k, target_recall, repeats, exclude=None, fixed={}, z=z)
    report["confidence"] = confidence
    if index._settings["mode"] != "brute_force":
        index._tuned = {key: report["chosen"][key] for key in ("reorder", "num_leaves_to_search")
                        if report["chosen"][key] != -1}
        index._tuned["num_leaves"] = index._settings.get("num_leaves")
    return report


def _tree_sizes(index, num_leaves):
    """The tree sizes `tune` tries (after the bounds of `_resolve`), the current one first when
    it is among them; [] without a tree."""
    settings = index._settings
    if settings["mode"] != "tree":
        if num_leaves is not None:
            raise ValueError(f"`num_leaves` needs a tree index; this one is {settings['mode']!r}. "
                             f"Received: num_leaves={num_leaves!r}")
        return []
    current = settings["num_leaves"]
    if num_leaves is None:
        sizes = [current] + ([] if index._options["num_leaves"] else tune_tree_sizes(len(index)))
    else:
        sizes = [num_leaves] if _is_positive_int(num_leaves) else list(num_leaves) \
            if isinstance(num_leaves, (list, tuple)) else []
        if not sizes or not all(_is_positive_int(n) for n in sizes):
            raise ValueError("`num_leaves` must be None, a positive int or a non-empty list of them. "
                             f"Received: num_leaves={num_leaves!r}")
    sizes = {index._resolve(len(index), spherical=settings["spherical"], num_leaves=int(n))["num_leaves"]
             for n in sizes}
    return sorted(sizes, key=lambda n: (n != current, n))


def _choose_tree(index, queries, exact_ids, k, target_recall, repeats, z, sizes):
    """`_choose` on a tree of each of `sizes` leaves in turn (retrained for each but the one in
    place), keeping the tree and setting that reach the target fastest."""
    initial = index._state()
    best, trees, trials, before = None, [], [], None
    if sizes[0] != initial["settings"]["num_leaves"]:  # the settings in place, measured alone
        fixed = {key: initial["settings"][key] for key in ("reorder", "num_leaves_to_search")}
        before = _choose(index, queries, index._rows_of(exact_ids), k, target_recall, repeats, exclude=None,
                         fixed=fixed, z=z)["before"]
    try:
        with tqdm(sizes, desc="tuning tree sizes", unit="tree", disable=not index.progress or len(sizes) < 2) as bar:
            for leaves in bar:
                tried = _try_tree(index, leaves, initial, queries, exact_ids, k, target_recall, repeats, z)
                trees.append(tried["tree"])
                trials += tried["report"]["trials"]
                before = before or tried["report"]["before"]
                best = tried if best is None else _faster(index, best, tried, queries, k, repeats)
                tried = None  # only `initial` and `best` keep a searcher alive while the next trains
                bar.set_postfix(best=best["tree"]["num_leaves"])
    except BaseException:
        index._set_state(initial)
        raise
    index._set_state(best)
    return {**best["report"], "qps": best["tree"]["qps"], "before": before, "trials": trials, "trees": trees}


def _try_tree(index, leaves, initial, queries, exact_ids, k, target_recall, repeats, z):
    """Puts a tree of `leaves` leaves in place (the initial one, or a new one trained) and
    applies its fastest setting: the state of the index, the report of `_choose` and a summary."""
    rebuilt = leaves != initial["settings"]["num_leaves"]
    start = time.perf_counter()
    if rebuilt:
        settings = index._resolve(len(index), spherical=initial["settings"]["spherical"], num_leaves=leaves)
        index._searcher = None  # the last tree tried, unless it is the best, is freed before this one trains
        index._searcher, index._settings = index._train(settings), settings
        index._trained_size, index._mutations, index._calibration = len(index), 0, None
        index._on_threads()
    else:
        index._set_state(initial)
    built = time.perf_counter() - start if rebuilt else 0.0
    report = _choose(index, queries, index._rows_of(exact_ids), k, target_recall, repeats, exclude=None,
                     fixed={}, z=z)
    tree = {**report["chosen"], **{key: report[key] for key in ("recall", "recall_bound", "qps", "reached")},
            "build_seconds": built}
    logger.info("tree of %d leaves (trained in %.0f s): search %d, reorder %d, Recall@%d %.3f (bound %.3f), "
                "%.0f QPS", leaves, built, tree["num_leaves_to_search"], tree["reorder"], k, tree["recall"],
                tree["recall_bound"], tree["qps"])
    return {**index._state(), "report": report, "tree": tree}


def _faster(index, incumbent, challenger, queries, k, repeats):
    """The better of two trees tried by `tune`: the one reaching the target, then the faster
    (their settings timed again in turns, so under the same load) or the higher recall."""
    a, b = incumbent["tree"], challenger["tree"]
    if a["reached"] != b["reached"]:
        return incumbent if a["reached"] else challenger
    if not a["reached"]:
        return challenger if b["recall"] > a["recall"] else incumbent
    active, seconds = index._searcher, [math.inf, math.inf]
    try:
        for _ in range(repeats):
            for n, state in enumerate((incumbent, challenger)):
                # Only the time counts: the storage order may be the other tree's.
                index._searcher, settings = state["searcher"], state["settings"]
                seconds[n] = min(seconds[n], best_seconds(lambda: index._scann_search(
                    queries, k, settings["reorder"], settings["num_leaves_to_search"]), 1))
    finally:
        index._searcher = active
    a["qps"], b["qps"] = (len(queries) / s for s in seconds)
    return challenger if b["qps"] > a["qps"] else incumbent


def calibrate(index):
    """Sets the search-time settings that were neither given nor tuned: the fastest reaching
    `calibration_recall` Recall@10 with gallery points as queries (their own match left out)."""
    settings, options = index._settings, index._options
    tuned = index._tuned_search(settings.get("num_leaves"))
    fixed = {key: settings[key] for key in ("reorder", "num_leaves_to_search")
             if key in settings and (options[key] is not None or key in tuned)}
    if settings["mode"] == "brute_force" or len(fixed) == (2 if settings["mode"] == "tree" else 1):
        return
    num_points = len(index)
    k = min(10, num_points - 1)
    if k < 1:
        return
    rng = np.random.default_rng(index.seed + 1)
    sample = np.sort(rng.choice(num_points, size=min(CALIBRATION_QUERIES, num_points), replace=False))
    queries = np.ascontiguousarray(index._storage.vectors[sample])
    exact_rows, _ = exact_search(index._storage.vectors, queries, k + 1, threads=index.threads)
    exact_rows = _without(exact_rows, sample, k)
    report = _choose(index, queries, exact_rows, k, index.calibration_recall, 1, exclude=sample, fixed=fixed,
                     z=0.0)
    index._calibration = {"recall": round(report["recall"], 4), "target": index.calibration_recall,
                          "queries": len(sample), "reached": report["reached"]}
    logger.info("calibrated ScaNN search: %s, Recall@%d %.3f on %d gallery points", report["chosen"], k,
                report["recall"], len(sample))


def _choose(index, queries, exact_rows, k, target_recall, repeats, exclude, fixed, z):
    """Searches the (reorder, leaves) settings and applies the fastest whose recall, less `z`
    standard errors of the mean over the queries, reaches the target."""
    settings = index._settings
    mode = settings["mode"]
    leaves_max = settings.get("num_leaves", 0)
    tree = {"num_leaves": leaves_max} if mode == "tree" else {}

    def recall_of(reorder, leaves):
        rows, _ = index._scann_search(queries, k + (exclude is not None), reorder, leaves)
        if exclude is not None:
            rows = _without(rows, exclude, k)
        recalls = recall_per_query(rows, exact_rows)
        error = recalls.std(ddof=1) / math.sqrt(len(recalls)) if len(recalls) > 1 else 0.0
        return {**tree, "reorder": reorder, "num_leaves_to_search": leaves, "recall": float(recalls.mean()),
                "recall_bound": float(recalls.mean() - z * error)}

    def timed(trial):
        seconds = best_seconds(lambda: index._scann_search(queries, k, trial["reorder"],
                                                           trial["num_leaves_to_search"]), repeats)
        return {**trial, "qps": len(queries) / seconds}

    current = timed(recall_of(max(settings.get("reorder", k), k) if mode != "brute_force" else -1,
                              settings.get("num_leaves_to_search", -1)))
    trials, candidates = [current], []
    if mode != "brute_force":
        ladder = [fixed["reorder"]] if "reorder" in fixed else sorted(
            {max(k, r) for r in (k, 2 * k, 3 * k, 4 * k, *REORDER_LADDER)})
        high, ceiling = leaves_max, -1.0
        for reorder in ladder:
            if mode == "ah" or "num_leaves_to_search" in fixed:
                trial = recall_of(reorder, fixed.get("num_leaves_to_search", -1))
                trials.append(trial)
                candidates.append(trial)
                continue
            # The fewest leaves reaching the target, by bisection (recall grows with the leaves
            # searched); more reordering never needs more leaves, so `high` only comes down.
            low, best, top = 1, None, None
            while low <= high:
                middle = (low + high) // 2
                trial = recall_of(reorder, middle)
                trials.append(trial)
                if trial["recall_bound"] >= target_recall:
                    best, high = trial, middle - 1
                else:
                    low, top = middle + 1, trial
            if best is not None:
                candidates.append(best)
                high = best["num_leaves_to_search"]
            elif top is not None and top["num_leaves_to_search"] == leaves_max:
                if top["recall"] <= ceiling + 1e-3:
                    break  # searching every leaf, more reordering no longer helps
                ceiling = top["recall"]
    reached = [timed(c) for c in candidates if c["recall_bound"] >= target_recall]
    if current["recall_bound"] >= target_recall:
        reached.append(current)
    if reached:
        chosen = max(reached, key=lambda t: t["qps"])
    else:
        chosen = max(trials, key=lambda t: t["recall"])
        chosen = timed(chosen) if "qps" not in chosen else chosen
        logger.warning("no ScaNN setting reached Recall@%d %.3f (lower bound); applied the best, %.3f",
                       k, target_recall, chosen["recall"])
    if mode != "brute_force":
        index._settings = {**settings, "reorder": chosen["reorder"]}
        if mode == "tree":
            index._settings["num_leaves_to_search"] = chosen["num_leaves_to_search"]
    return {"target_recall": target_recall, "k": k, "reached": bool(reached),
            "chosen": {key: chosen[key] for key in ("num_leaves", "reorder", "num_leaves_to_search")
                       if key in chosen},
            "recall": chosen["recall"], "recall_bound": chosen["recall_bound"], "qps": chosen["qps"],
            "before": current, "trials": trials}


def best_seconds(run, repeats=3):
    """The shortest of `repeats` timings of `run()` (a call without arguments), in seconds: what `tune`
    and the calibration time their trials with, and the benchmarks use to time alike."""
    seconds = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds = min(seconds, time.perf_counter() - start)
    return seconds


def _without(rows, own_rows, k):
    """The first k entries of each row of `rows` that are not that row's own entry `own_rows[i]`."""
    keep = rows != np.asarray(own_rows)[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")
    return np.take_along_axis(rows, order, axis=1)[:, :k]
