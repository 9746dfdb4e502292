import numpy as np
import pytest

from fgkeras.viz import gallery


def _line_embeddings():
    """Five items on a line: labels a a b b a at positions 0, 1, 2, 3, 10."""
    positions = np.array([0.0, 1.0, 2.0, 3.0, 10.0])
    return np.stack([positions, np.zeros(5)], axis=1), np.array(["a", "a", "b", "b", "a"])


def test_rank_queries_leave_one_out_gives_known_neighbours_marks_and_precision():
    embeddings, labels = _line_embeddings()
    ranking = gallery.rank_queries(embeddings, labels, k=2)
    np.testing.assert_array_equal(ranking["top"][0], [1, 2])  # never itself
    np.testing.assert_array_equal(ranking["correct"][0], [True, False])
    np.testing.assert_array_equal(ranking["top"][2], [1, 3])  # tie at distance 1: lower index first
    np.testing.assert_array_equal(ranking["correct"][2], [False, True])
    # Item 4 (a): ranking 3 (b), 2 (b), 1 (a), 0 (a) → AP = (1/3 + 2/4) / 2.
    assert ranking["ap"][4] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert ranking["first_hit"][4] == 3 and ranking["first_hit"][0] == 1


def test_rank_queries_against_a_gallery_excludes_only_what_it_is_told():
    embeddings, labels = _line_embeddings()
    plain = gallery.rank_queries(embeddings[:2], labels[:2], embeddings, labels, k=1)
    np.testing.assert_array_equal(plain["top"][:, 0], [0, 1])  # each query finds itself
    excluded = gallery.rank_queries(embeddings[:2], labels[:2], embeddings, labels, k=1, exclude_index=[0, 1])
    np.testing.assert_array_equal(excluded["top"][:, 0], [1, 0])


def test_pick_queries_orders_by_average_precision():
    ranking = {"ap": np.array([0.2, 1.0, np.nan, 0.5, 0.9]), "first_hit": np.array([3, 1, 0, 2, 1])}
    groups = gallery.pick_queries(ranking, per_group=1)
    assert groups["best"].tolist() == [1] and groups["worst"].tolist() == [0]
    assert groups["median"].tolist() == [4]  # order 1, 4, 3, 0: the middle one of 4 starts at 1


def test_gallery_image_frames_each_result_by_its_mark():
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 255, (2, 16, 16, 3))
    results = rng.integers(0, 255, (2, 3, 16, 16, 3))
    correct = np.array([[True, False, True], [False, False, True]])
    grid = gallery.gallery_image(queries, results, correct)
    cell = gallery.default_cell_size(16)
    for row in range(2):
        y, x = gallery.cell_origin(row, 0, cell)
        assert tuple(grid[y + 1, x + 1]) == gallery.QUERY
        for column in range(3):
            y, x = gallery.cell_origin(row, column + 1, cell)
            expected = gallery.CORRECT if correct[row, column] else gallery.INCORRECT
            assert tuple(grid[y + 1, x + 1]) == expected, (row, column)
    last_y, last_x = gallery.cell_origin(1, 3, cell)
    assert grid.shape[:2] == (last_y + cell + 2 * gallery.BORDER + 6, last_x + cell + 2 * gallery.BORDER + 6)


def test_gallery_image_rejects_marks_of_another_shape():
    with pytest.raises(ValueError, match="must agree"):
        gallery.gallery_image(np.zeros((2, 8, 8, 3)), np.zeros((2, 3, 8, 8, 3)), np.zeros((2, 2), bool))
