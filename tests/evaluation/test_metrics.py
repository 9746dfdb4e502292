import math

import numpy as np
import pytest

from fgkeras.evaluation.metrics import retrieval_metrics

DEFAULT_KEYS = [
    "recall@1", "recall@2", "recall@4", "recall@8",
    "p@5", "p@10", "p@20",
    "map@5", "map@10", "map@20",
    "map@r", "num_queries",
]  # fmt: skip


def reference_metrics(queries, query_labels, gallery, gallery_labels, exclude, recall_ks, precision_ks, map_ks):
    """Brute force, written differently: float64 distances, a full sort of (distance, index), loops."""
    per_query = []
    for q, (vector, label) in enumerate(zip(queries, query_labels)):
        candidates = [
            (float(np.sum((np.float64(vector) - np.float64(item)) ** 2)), j)
            for j, item in enumerate(gallery)
            if j != exclude[q]
        ]
        relevance = [gallery_labels[j] == label for _, j in sorted(candidates)]
        num_relevant = sum(relevance)
        if num_relevant == 0:
            continue

        def average_precision(depth, normaliser):
            hits, total = 0, 0.0
            for rank, is_relevant in enumerate(relevance[:depth], start=1):
                if is_relevant:
                    hits += 1
                    total += hits / rank
            return total / normaliser

        values = {}
        for k in recall_ks:
            values[f"recall@{k}"] = float(any(relevance[:k]))
        for k in precision_ks:
            values[f"p@{k}"] = sum(relevance[:k]) / k
        for k in map_ks:
            values[f"map@{k}"] = average_precision(k, min(k, num_relevant))
        values["map@r"] = average_precision(num_relevant, num_relevant)
        per_query.append(values)
    means = {key: sum(values[key] for values in per_query) / len(per_query) for key in per_query[0]}
    return {**means, "num_queries": len(per_query)}


def assert_metrics_close(actual, expected, rtol=1e-9):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], rel=rtol, abs=1e-12), key


def test_hand_worked_leave_one_out():
    # Points 0..4 on a line, labels A A B A B. Rankings (ties broken by index):
    #   q0 (A, R=2): 1A 2B 3A 4B -> rel 1 0 1 0
    #   q1 (A, R=2): 0A 2B (tie at 1: index order) 3A 4B -> rel 1 0 1 0
    #   q2 (B, R=1): 1A 3A (tie) 0A 4B (tie) -> rel 0 0 0 1
    #   q3 (A, R=2): 2B 4B (tie) 1A 0A -> rel 0 0 1 1
    #   q4 (B, R=1): 3A 2B 1A 0A -> rel 0 1 0 0
    # recall@1 = 2/5; recall@2 = 3/5 (q0, q1, q4); recall@4 = 1.
    # p@1 = 2/5; p@2 = (1 + 1 + 0 + 0 + 1) / 2 / 5 = 0.3.
    # AP@2: q0 1/2, q1 1/2, q2 0, q3 0, q4 (1/2)/min(2, 1) = 1/2  -> map@2 = 1.5/5 = 0.3
    # AP@3: q0 (1 + 2/3)/2, q1 the same, q2 0, q3 (1/3)/2, q4 1/2  -> map@3 = (7/3)/5
    # MAP@R: q0 (top 2: 1 0) 1/2, q1 1/2, q2 (top 1: 0) 0, q3 (top 2: 0 0) 0, q4 0 -> 1/5
    x = np.arange(5, dtype=np.float32)[:, None]
    y = np.array(["A", "A", "B", "A", "B"])
    metrics = retrieval_metrics(x, y, recall_ks=(1, 2, 4), precision_ks=(1, 2), map_ks=(1, 2, 3))
    expected = {
        "recall@1": 0.4, "recall@2": 0.6, "recall@4": 1.0,
        "p@1": 0.4, "p@2": 0.3,
        "map@1": 0.4, "map@2": 0.3, "map@3": 7 / 15,
        "map@r": 0.2, "num_queries": 5,
    }  # fmt: skip
    assert_metrics_close(metrics, expected)
    assert all(type(metrics[key]) is float for key in expected if key != "num_queries")


def test_hand_worked_gallery_with_a_query_without_relevant_items():
    # Gallery 0A 1B 2A 3B. Queries:
    #   0.4 (A, R=2): 0A 1B 2A 3B -> rel 1 0 1 0: AP@4 = (1 + 2/3)/2 = 5/6, MAP@R = 1/2
    #   1.4 (B, R=2): 1B 2A 0A 3B -> rel 1 0 0 1: AP@4 = (1 + 2/4)/2 = 3/4, MAP@R = 1/2
    #   10  (C, R=0): left out of every metric.
    # recall@1 = 1, p@2 = 1/2, p@4 = 1/2, map@4 = (5/6 + 3/4)/2 = 19/24, map@r = 1/2.
    gallery = np.array([[0.0], [1.0], [2.0], [3.0]])
    queries = np.array([[0.4], [1.4], [10.0]])
    metrics = retrieval_metrics(
        queries, [0, 1, 2], gallery, [0, 1, 0, 1], recall_ks=(1,), precision_ks=(2, 4), map_ks=(4,)
    )
    expected = {"recall@1": 1.0, "p@2": 0.5, "p@4": 0.5, "map@4": 19 / 24, "map@r": 0.5, "num_queries": 2}
    assert_metrics_close(metrics, expected, rtol=1e-6)


def test_default_keys():
    rng = np.random.default_rng(0)
    metrics = retrieval_metrics(rng.normal(size=(50, 4)), rng.integers(0, 3, 50))
    assert list(metrics) == DEFAULT_KEYS
    assert all(0.0 <= metrics[key] <= 1.0 for key in DEFAULT_KEYS[:-1])


@pytest.mark.parametrize("order, expected_recall", [((0, 1), 0.0), ((1, 0), 1.0)])
def test_ties_are_broken_by_gallery_index(order, expected_recall):
    # The query at 0 is equidistant from a wrong item at -1 and a right one at +1:
    # the item with the lower gallery index ranks first.
    gallery = np.array([[-1.0], [1.0]])[list(order)]
    gallery_labels = np.array(["wrong", "right"])[list(order)]
    metrics = retrieval_metrics([[0.0]], ["right"], gallery, gallery_labels, recall_ks=(1,))
    assert metrics["recall@1"] == expected_recall


def test_leave_one_out_excludes_self_by_index_and_keeps_duplicates():
    # x0 = x1 = 0 with labels A, B; x2 = 1 with label A.
    #   q0 (A): itself excluded; its duplicate x1 (B) at distance 0 ranks first -> miss at 1, hit at 2.
    #   q1 (B): no other B -> left out.
    #   q2 (A): x0 (A) and x1 (B) tie at distance 1; x0 has the lower index -> hit at 1.
    metrics = retrieval_metrics([[0.0], [0.0], [1.0]], ["A", "B", "A"], recall_ks=(1, 2))
    assert metrics["num_queries"] == 2
    assert metrics["recall@1"] == 0.5
    assert metrics["recall@2"] == 1.0


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1024])
@pytest.mark.parametrize("integer_coordinates", [True, False])
@pytest.mark.parametrize(
    "ks",
    [
        dict(recall_ks=(1, 3, 8), precision_ks=(2, 5, 30), map_ks=(4, 30, 40)),  # top 40 of 89: partial sort
        dict(recall_ks=(1, 3, 200), precision_ks=(2, 5, 100), map_ks=(4, 30, 100)),  # k > N: everything
    ],
)
def test_matches_brute_force_leave_one_out(chunk_size, integer_coordinates, ks):
    rng = np.random.default_rng(1)
    n = 90
    if integer_coordinates:  # exact distances, many ties: checks the tie order too
        x = rng.integers(-2, 3, size=(n, 3)).astype(np.float32)
    else:
        x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.integers(0, 8, n)
    y[:3] = [100, 101, 102]  # singleton classes: queries without any relevant item
    metrics = retrieval_metrics(x, y, chunk_size=chunk_size, **ks)
    assert_metrics_close(metrics, reference_metrics(x, y, x, y, np.arange(n), **ks))
    assert metrics["num_queries"] == n - 3


@pytest.mark.parametrize("chunk_size", [5, 1000])
def test_matches_brute_force_with_gallery_and_exclusions(chunk_size):
    rng = np.random.default_rng(2)
    gallery = rng.integers(-2, 3, size=(70, 3)).astype(np.float32)
    gallery_labels = rng.integers(0, 6, 70)
    queries = rng.integers(-2, 3, size=(23, 3)).astype(np.float32)
    query_labels = rng.integers(0, 7, 23)  # class 6 has no gallery item
    exclude = np.where(rng.random(23) < 0.5, rng.integers(0, 70, 23), -1)
    ks = dict(recall_ks=(1, 2, 70), precision_ks=(3, 80), map_ks=(5, 70))
    metrics = retrieval_metrics(
        queries, query_labels, gallery, gallery_labels, chunk_size=chunk_size, exclude_index=exclude, **ks
    )
    expected = reference_metrics(queries, query_labels, gallery, gallery_labels, exclude, **ks)
    assert_metrics_close(metrics, expected)
    assert metrics["num_queries"] < 23


def test_chunk_size_does_not_change_the_result():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    y = rng.integers(0, 12, 300)
    assert retrieval_metrics(x, y, chunk_size=37) == retrieval_metrics(x, y, chunk_size=300)


def test_perfect_embedding_scores_one_everywhere():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(6, 8)) * 100.0
    y = np.repeat(np.arange(6), 25)  # R = 24 >= every k
    x = centres[y] + rng.normal(size=(150, 8))
    metrics = retrieval_metrics(x, y)
    assert metrics.pop("num_queries") == 150
    assert metrics == dict.fromkeys(metrics, 1.0)


def test_random_embedding_recall_at_one_is_chance():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 10, 2000)
    metrics = retrieval_metrics(rng.normal(size=(2000, 16)), y)
    # recall@1 and p@5 are about R / (N - 1) = 0.1; MAP@R about 0.1 × 0.1 (P(i) ≈ 0.1 at each hit).
    assert 0.07 < metrics["recall@1"] < 0.13
    assert 0.07 < metrics["p@5"] < 0.13
    assert 0.005 < metrics["map@r"] < 0.02


def test_no_query_with_a_relevant_item_gives_nan():
    metrics = retrieval_metrics([[0.0], [1.0], [2.0]], [0, 1, 2])
    assert metrics["num_queries"] == 0
    assert all(math.isnan(value) for key, value in metrics.items() if key != "num_queries")


def test_map_at_r_can_be_skipped():
    metrics = retrieval_metrics(np.eye(4), [0, 0, 1, 1], map_at_r=False)
    assert "map@r" not in metrics and "recall@1" in metrics


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(query_embeddings=np.zeros(4), query_labels=np.zeros(4)), "query_embeddings"),
        (dict(query_embeddings=np.zeros((0, 2)), query_labels=np.zeros(0)), "query_embeddings"),
        (dict(query_embeddings=[[0.0, np.nan], [1.0, 1.0]], query_labels=[0, 0]), "query_embeddings"),
        (dict(query_embeddings=np.zeros((4, 2)), query_labels=np.zeros(3)), "query_labels"),
        (dict(query_embeddings=np.zeros((4, 2)), query_labels=np.zeros((4, 1))), "query_labels"),
        (dict(query_embeddings=np.zeros((4, 2)), query_labels=np.zeros(4), gallery_embeddings=np.zeros((3, 2))),
         "gallery_labels"),
        (dict(query_embeddings=np.zeros((4, 2)), query_labels=np.zeros(4), gallery_embeddings=np.zeros((3, 3)),
              gallery_labels=np.zeros(3)), "gallery_embeddings"),
        (dict(query_embeddings=np.zeros((4, 2)), query_labels=np.zeros(4), gallery_embeddings=[[np.inf, 0.0]],
              gallery_labels=np.zeros(1)), "gallery_embeddings"),
        (dict(query_embeddings=np.zeros((4, 2)), query_labels=np.zeros(4), gallery_embeddings=np.zeros((3, 2)),
              gallery_labels=np.zeros(2)), "gallery_labels"),
        (dict(query_embeddings=np.zeros((4, 2)), query_labels=np.zeros(4), recall_ks=(0, 1)), "recall_ks"),
        (dict(query_embeddings=np.zeros((4, 2)), query_labels=np.zeros(4), map_ks=(2.5,)), "map_ks"),
        (dict(query_embeddings=np.zeros((4, 2)), query_labels=np.zeros(4), chunk_size=0), "chunk_size"),
        (dict(query_embeddings=np.zeros((4, 2)), query_labels=np.zeros(4), exclude_index=[0, 1, 2, 4]),
         "exclude_index"),
        (dict(query_embeddings=np.full((2, 2), 1e30), query_labels=np.zeros(2)), "query_embeddings"),
    ],
)  # fmt: skip
def test_invalid_inputs_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        retrieval_metrics(**kwargs)
