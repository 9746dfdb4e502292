import concurrent.futures

import numpy as np
import pytest
import threadpoolctl

import fgkeras.index.exact as exact
from fgkeras.index import ExactIndex, exact_search


def unit(rng, n, dim=16):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_top_k(gallery, queries, k):
    """Written differently: float64 scores and a full stable sort."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n, k, num_queries", [
    (1, 1, 3), (31, 5, 2), (100, 100, 4), (100, 5, 0), (1000, 10, 1), (5000, 10, 300), (9000, 64, 130),
    (9001, 10, 70), (9000, 700, 7),
])
def test_exact_search_matches_a_full_sort(rng, monkeypatch, n, k, num_queries, threads):
    gallery, queries = unit(rng, n), unit(rng, num_queries)
    # Small blocks and tasks so that several gallery blocks, ranges and query blocks, and the merges,
    # are exercised (in parallel for threads > 1).
    monkeypatch.setattr(exact, "MIN_TASK", 1)
    rows, scores = exact_search(gallery, queries, k, threads=threads, query_block=64, score_block=64 * 1024)
    expected_rows, expected_scores = reference_top_k(gallery, queries, k)
    assert rows.shape == scores.shape == (num_queries, k)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    np.testing.assert_array_equal(rows, expected_rows)


def test_exact_search_when_the_best_come_last(rng):
    # Every chunk beats the previous one: the worst case of the threshold filter.
    gallery = np.repeat(np.linspace(-1, 1, 6000, dtype=np.float32)[:, None], 4, axis=1)
    rows, _ = exact_search(gallery, np.ones((3, 4), np.float32), 10, score_block=3 * 512)
    np.testing.assert_array_equal(rows, np.tile(np.arange(5999, 5989, -1), (3, 1)))


def test_exact_search_finds_a_late_item_just_above_the_running_threshold():
    # Query 0 scores the first chunk 0 .. 0.5; one item of a later chunk beats its 10th best by 1e-4.
    # The other queries score 0 everywhere, so only one row of the block has a candidate.
    gallery = np.zeros((3000, 8), np.float32)
    gallery[:1024, 0] = np.linspace(0, 0.5, 1024)
    tenth_best = gallery[1024 - 10, 0]
    gallery[2500, 0] = tenth_best + 1e-4
    rows, scores = exact_search(gallery, np.eye(8, dtype=np.float32), 10, score_block=8 * 1024)
    assert 2500 in rows[0]
    np.testing.assert_allclose(scores[0], np.sort(gallery[:, 0])[::-1][:10])


def blas_threads():
    return [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]


def record_blas_threads(monkeypatch):
    """Small tasks, each recording the BLAS thread counts it runs with."""
    seen = []
    scan = exact._scan
    monkeypatch.setattr(exact, "_scan", lambda *args: (seen.append(blas_threads()), scan(*args))[1])
    monkeypatch.setattr(exact, "MIN_TASK", 1)
    return seen


def test_scans_run_with_the_blas_threads_of_their_kind_which_are_restored_after(rng, monkeypatch):
    gallery, queries = unit(rng, 4000), unit(rng, 50)
    seen = record_blas_threads(monkeypatch)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        rows, _ = exact_search(gallery, queries, 5, threads=2)
        assert blas_threads() == [2] * len(blas_threads())
    assert len(seen) > 1 and all(threads == [1] * len(threads) for threads in seen)
    np.testing.assert_array_equal(rows, reference_top_k(gallery, queries, 5)[0])
    # Fewer queries than ROW_READ: one scan, BLAS's own threads split the products.
    seen.clear()
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        rows, _ = exact_search(gallery, queries[:3], 5, threads=2)
        assert blas_threads() == [1] * len(blas_threads())
    assert len(seen) == 1 and seen[0] == [2] * len(seen[0])
    np.testing.assert_array_equal(rows, reference_top_k(gallery, queries[:3], 5)[0])


def test_concurrent_searches_are_exact_and_restore_the_blas_threads(rng, monkeypatch):
    gallery = unit(rng, 6000)
    batches = [unit(rng, 40) for _ in range(8)]
    before = blas_threads()
    seen = record_blas_threads(monkeypatch)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda queries: exact_search(gallery, queries, 7, threads=2), batches))
    for (rows, _), queries in zip(found, batches):
        np.testing.assert_array_equal(rows, reference_top_k(gallery, queries, 7)[0])
    assert len(seen) > len(batches) and all(threads == [1] * len(threads) for threads in seen)
    assert blas_threads() == before


def test_threads_setting_is_checked_and_gives_the_same_results(rng, monkeypatch):
    gallery, queries = unit(rng, 3000), unit(rng, 30)
    ids = [f"g{i}" for i in range(3000)]
    monkeypatch.setattr(exact, "MIN_TASK", 1)
    one = ExactIndex(threads=1).build(gallery, ids)
    three = ExactIndex(threads=3).build(gallery, ids)
    np.testing.assert_array_equal(three.search(queries, k=9)[0], one.search(queries, k=9)[0])
    np.testing.assert_array_equal(three.search(queries[0], k=9)[0], one.search(queries[0], k=9)[0])
    with pytest.raises(ValueError, match="`threads` must be a positive int or None"):
        ExactIndex(threads=0)
    with pytest.raises(ValueError, match="`threads` must be a positive int or None"):
        one.threads = 1.5
    assert one.threads == 1


def test_search_returns_ids_and_float32_scores_best_first(rng):
    gallery, queries = unit(rng, 500), unit(rng, 20)
    ids = [f"item-{i}" for i in range(500)]
    found, scores = ExactIndex().build(gallery, ids).search(queries, k=7)
    expected_rows, expected_scores = reference_top_k(gallery, queries, 7)
    assert found.shape == (20, 7) and found.dtype == object and isinstance(found[0, 0], str)
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(found, np.array(ids, object)[expected_rows])
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_one_query_vector_is_a_batch_of_one(rng):
    gallery = unit(rng, 50)
    index = ExactIndex().build(gallery, [str(i) for i in range(50)])
    ids, scores = index.search(gallery[3], k=4)
    assert ids.shape == scores.shape == (1, 4)
    assert ids[0, 0] == "3"
    np.testing.assert_allclose(scores[0, 0], 1.0, atol=1e-6)


def test_k_larger_than_the_index_returns_every_item(rng):
    index = ExactIndex().build(unit(rng, 3), ["a", "b", "c"])
    ids, scores = index.search(unit(rng, 2), k=10)
    assert ids.shape == scores.shape == (2, 3)
    assert sorted(ids[0]) == ["a", "b", "c"]


def test_empty_index_returns_no_columns(rng):
    for index in (ExactIndex(), ExactIndex().build(np.zeros((0, 16), np.float32), [])):
        ids, scores = index.search(unit(rng, 4), k=5)
        assert ids.shape == scores.shape == (4, 0)
        assert len(index) == 0


def test_upsert_is_visible_at_once_and_replaces_by_id(rng):
    gallery = unit(rng, 200)
    index = ExactIndex().build(gallery, [f"g{i}" for i in range(200)])
    new = unit(rng, 1)[0]
    index.upsert("new", new)
    assert index.search(new, k=1)[0][0, 0] == "new"
    assert len(index) == 201
    # Replacing g7 by the vector of g9: a search for it now finds both, g7 no longer near its old place.
    index.upsert(["g7"], gallery[9][None])
    assert len(index) == 201
    assert set(index.search(gallery[9], k=2)[0][0]) == {"g7", "g9"}
    assert "g7" not in index.search(gallery[7], k=1)[0][0]


def test_delete_removes_and_keeps_ids_and_vectors_aligned(rng):
    gallery = unit(rng, 100)
    ids = [f"g{i}" for i in range(100)]
    index = ExactIndex().build(gallery, ids)
    index.delete(["g0", "g50", "g99"])
    assert len(index) == 97
    assert "g50" not in index.search(gallery[50], k=1)[0][0]
    by_id = dict(zip(ids, gallery))
    for id_, vector in zip(index.ids, index.embeddings):
        np.testing.assert_array_equal(vector, by_id[id_])


def test_delete_of_unknown_ids_names_them_and_changes_nothing(rng):
    index = ExactIndex().build(unit(rng, 5), list("abcde"))
    with pytest.raises(KeyError, match="'zz'"):
        index.delete(["a", "zz"])
    assert len(index) == 5
    index.delete(["a", "zz"], missing_ok=True)
    assert sorted(index.ids) == list("bcde")


def test_random_mutations_match_a_model(rng):
    """Any sequence of upserts and deletes gives the search of a plain dict of vectors."""
    index = ExactIndex()
    model = {}
    for step in range(60):
        if model and rng.random() < 0.4:
            victims = rng.choice(sorted(model), size=min(len(model), int(rng.integers(1, 6))), replace=False)
            index.delete(list(victims))
            for victim in victims:
                del model[victim]
        else:
            ids = [f"x{int(i)}" for i in rng.choice(80, size=int(rng.integers(1, 8)), replace=False)]
            vectors = unit(rng, len(ids), 8)
            index.upsert(ids, vectors)
            model.update(zip(ids, vectors))
        assert len(index) == len(model)
        if model:
            query = unit(rng, 1, 8)
            names = sorted(model)
            scores = np.stack([model[n] for n in names]) @ query[0]
            found, found_scores = index.search(query, k=3)
            np.testing.assert_allclose(found_scores[0], np.sort(scores)[::-1][:3], atol=1e-6)
            assert found[0, 0] == names[int(np.argmax(scores))]


@pytest.mark.parametrize("call, message", [
    (lambda i, r: i.build(unit(r, 3), ["a", "b"]), "one row per id"),
    (lambda i, r: i.build(unit(r, 2), ["a", "a"]), "duplicated: \\['a'\\]"),
    (lambda i, r: i.build(unit(r, 2), ["a", 7]), "must all be strings.*position 1: int 7"),
    (lambda i, r: i.build(unit(r, 2), "ab"), "sequence of strings"),
    (lambda i, r: i.build(np.array([[0.0, np.nan]]), ["a"]), "NaN or inf.*rows \\[0\\]"),
    (lambda i, r: i.build(np.array([["x", "y"]]), ["a"]), "real numeric array"),
    (lambda i, r: i.build(np.zeros(4), ["a"]), "shape \\(n, dim\\)"),
])
def test_bad_build_inputs_are_refused_by_name(rng, call, message):
    with pytest.raises(ValueError, match=message):
        call(ExactIndex(), rng)


def test_bad_search_and_upsert_inputs_are_refused_by_name(rng):
    index = ExactIndex().build(unit(rng, 10), [str(i) for i in range(10)])
    with pytest.raises(ValueError, match="dim 16"):
        index.search(unit(rng, 2, 8))
    with pytest.raises(ValueError, match="`k` must be a positive int"):
        index.search(unit(rng, 2), k=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        index.search(np.full((1, 16), np.inf))
    with pytest.raises(ValueError, match="dim 16"):
        index.upsert(["x"], unit(rng, 1, 8))
    with pytest.raises(ValueError, match="duplicated"):
        index.upsert(["x", "x"], unit(rng, 2))
    with pytest.raises(ValueError, match="strings"):
        index.upsert([b"x"], unit(rng, 1))
    assert len(index) == 10


def test_embeddings_view_is_read_only(rng):
    index = ExactIndex().build(unit(rng, 4), list("abcd"))
    with pytest.raises(ValueError):
        index.embeddings[0, 0] = 5.0
    assert index.dim == 16


def test_a_search_cheaper_than_one_task_leaves_the_blas_threads_alone(rng, monkeypatch):
    def refuse(threads):
        raise AssertionError("a small search set BLAS's threads")

    monkeypatch.setattr(exact, "_limited_blas", refuse)
    gallery, queries = unit(rng, 1500), unit(rng, 20)
    rows, _ = exact_search(gallery, queries, 5, threads=2)
    np.testing.assert_array_equal(rows, reference_top_k(gallery, queries, 5)[0])
    monkeypatch.setattr(exact, "MIN_TASK", 1)
    with pytest.raises(AssertionError, match="small search"):
        exact_search(gallery, queries, 5, threads=2)


def tied(rng, n, dim=8, distinct=6):
    """`n` rows drawn from `distinct` vectors of multiples of 1/4: every inner product with such
    queries is exact in float32 whatever the order of the sums, so equal rows score exactly equal."""
    prototypes = rng.integers(-4, 5, size=(distinct, dim)).astype(np.float32) / 4
    return prototypes[rng.integers(0, distinct, n)]


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n, k, num_queries", [(40, 5, 3), (40, 40, 2), (3000, 10, 1), (3000, 25, 70),
                                               (9000, 300, 20), (2000, 2000, 2)])
def test_ties_come_back_lowest_row_first_on_every_path(rng, monkeypatch, blocked, threads, n, k, num_queries):
    gallery, queries = tied(rng, n), tied(rng, num_queries)
    if blocked:  # small blocks and tasks: several ranges, threads and merges meet the ties
        monkeypatch.setattr(exact, "MIN_TASK", 1)
        found = exact_search(gallery, queries, k, threads=threads, query_block=16, score_block=16 * 256)
    else:
        found = exact_search(gallery, queries, k, threads=threads)
    expected_rows, expected_scores = reference_top_k(gallery, queries, k)  # a stable sort: lowest row first
    np.testing.assert_array_equal(found[1], expected_scores.astype(np.float32))
    np.testing.assert_array_equal(found[0], expected_rows)


@pytest.mark.parametrize("blocked", [False, True])
def test_index_ties_follow_the_storage_order_after_upserts_and_deletes(rng, monkeypatch, blocked):
    if blocked:
        monkeypatch.setattr(exact, "MIN_TASK", 1)
    gallery = tied(rng, 2500, distinct=3)
    index = ExactIndex(threads=2).build(gallery, [f"g{i}" for i in range(2500)])
    index.delete([f"g{i}" for i in range(0, 2500, 7)])  # the last rows move into the holes
    index.upsert([f"n{i}" for i in range(40)] + ["g3"], tied(rng, 41, distinct=3))
    queries = tied(rng, 30, distinct=3)
    for k in (1, 10, 200, len(index), len(index) + 5):
        ids, scores = index.search(queries, k=k)
        rows, expected = reference_top_k(index.embeddings, queries, min(k, len(index)))
        np.testing.assert_array_equal(scores, expected.astype(np.float32))
        np.testing.assert_array_equal(ids, index.ids[rows])
        one_ids, _ = index.search(queries[4], k=k)
        np.testing.assert_array_equal(one_ids[0], ids[4])
