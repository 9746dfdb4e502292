import logging
import math

import numpy as np
import pytest

from fgkeras.evaluation.metrics import retrieval_metrics
from fgkeras.evaluation.protocols import closed_set, format_table, growing_inventory, open_set

KS = dict(recall_ks=(1, 2, 4), precision_ks=(1,), map_ks=(2,))


def test_closed_set_is_leave_one_out():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.integers(0, 4, 40)
    assert closed_set(x, y, **KS) == retrieval_metrics(x, y, **KS)


def test_open_set_hand_worked():
    # Seen classes: A at 0 and 0.5, B at 10 and 11. Unseen: C at 1 and 3, D at 20 and 21.
    #   unseen (leave-one-out among C and D): every nearest neighbour is right -> recall@1 = 1.
    #   mixed (the seen items are distractors):
    #     C@1: 0.5A (0.5), 0A (1), 3C (2) -> hit at rank 3
    #     C@3: 1C (2) first -> hit at 1;  D@20, D@21: hit at 1
    #     -> recall@1 = recall@2 = 3/4, recall@4 = 1
    train = np.array([[0.0], [0.5], [10.0], [11.0]])
    unseen = np.array([[1.0], [3.0], [20.0], [21.0]])
    results = open_set(train, ["A", "A", "B", "B"], unseen, ["C", "C", "D", "D"], **KS)
    assert list(results) == ["seen", "unseen", "mixed"]
    assert results["seen"] == retrieval_metrics(train, ["A", "A", "B", "B"], **KS)
    assert results["unseen"]["recall@1"] == 1.0
    assert results["mixed"]["num_queries"] == 4
    assert [results["mixed"][f"recall@{k}"] for k in (1, 2, 4)] == [0.75, 0.75, 1.0]


def test_open_set_rejects_shared_classes():
    with pytest.raises(ValueError, match="unseen_labels"):
        open_set(np.zeros((2, 2)), [0, 1], np.ones((2, 2)), [1, 2])


def test_open_set_rejects_embeddings_of_another_dimension():
    with pytest.raises(ValueError, match="`train_embeddings` and `unseen_embeddings` must have the same dimension"):
        open_set(np.zeros((2, 2)), [0, 1], np.ones((2, 3)), [2, 3])


def test_growing_inventory_hand_worked(caplog):
    # Classes on a line: A (2000) at 0, 1; B (2000) at 10, 11; C (2001) at 0.4, 5; D (2002) at 30.
    #   2000: inventory A, B (2 classes, 4 items); the 4 items are the queries, all hit at rank 1.
    #   2001: inventory + C (3 classes, 6 items); queries C@0.4 and C@5:
    #         C@0.4: 0A (0.4), 1A (0.6), 5C (4.6) -> hit at 3
    #         C@5:   1A (4), 0.4C (4.6)           -> hit at 2
    #         recall@1 = 0, recall@2 = 1/2, recall@4 = 1, map@r = 0 (R = 1, top 1 wrong)
    #   2002: + D (4 classes, 7 items); D is a singleton, so there is no usable query.
    x = np.array([[0.0], [1.0], [10.0], [11.0], [0.4], [5.0], [30.0]])
    labels = np.array(["A", "A", "B", "B", "C", "C", "D"])
    years = np.array([2000, 2000, 2000, 2000, 2001, 2001, 2002])
    order = np.random.default_rng(0).permutation(7)  # the result must not depend on item order
    with caplog.at_level(logging.WARNING):
        rows = growing_inventory(x[order], labels[order], years[order], **KS)
    assert [(row["year"], row["num_classes"], row["num_items"], row["num_queries"]) for row in rows] == [
        (2000, 2, 4, 4),
        (2001, 3, 6, 2),
        (2002, 4, 7, 0),
    ]
    assert list(rows[0])[:4] == ["year", "num_classes", "num_items", "num_queries"]
    assert rows[0]["recall@1"] == 1.0
    assert [rows[1][key] for key in ("recall@1", "recall@2", "recall@4", "map@r")] == [0.0, 0.5, 1.0, 0.0]
    assert math.isnan(rows[2]["recall@1"])
    assert "NaN" in caplog.text


def test_growing_inventory_rejects_a_class_with_two_years():
    with pytest.raises(ValueError, match="years"):
        growing_inventory(np.zeros((3, 2)), [0, 0, 1], [2000, 2001, 2001])


def test_format_table_named_rows():
    table = format_table(
        {"htg": {"recall@1": 0.87344, "num_queries": 12}, "ohem": {"recall@1": 0.8, "num_queries": 12}}
    )
    lines = table.splitlines()
    assert lines[0] == "|  | recall@1 | num_queries |"
    assert lines[1] == "| --- | --- | --- |"
    assert lines[2] == "| htg | 87.3 | 12 |"
    assert lines[3] == "| ohem | 80.0 | 12 |"


def test_format_table_year_rows_and_key_selection():
    rows = [{"year": 2001, "num_queries": 3, "map@5": 0.5}, {"year": 2002, "num_queries": 0, "map@5": math.nan}]
    table = format_table(rows, keys=["year", "map@5"])
    assert table.splitlines()[2:] == ["| 2001 | 50.0 |", "| 2002 | nan |"]


def test_format_table_single_result_and_open_set_output():
    assert format_table({"recall@1": 1.0, "p@5": 0.123}).splitlines()[2] == "| 100.0 | 12.3 |"
    results = open_set(np.array([[0.0], [1.0]]), [0, 0], np.array([[5.0], [6.0]]), [1, 1], **KS)
    assert [line.split(" | ")[0] for line in format_table(results).splitlines()[2:]] == [
        "| seen",
        "| unseen",
        "| mixed",
    ]


def test_format_table_rejects_empty_rows():
    with pytest.raises(ValueError, match="rows"):
        format_table([])


def test_format_table_column_headers_and_formats():
    rows = [{"what": "exact", "qps": 12345.6, "share": 0.5, "recall": 0.87344},
            {"what": "scann", "qps": 99.0}]
    table = format_table(rows, headers={"qps": "QPS", "share": "of bound"},
                         formats={"qps": "{:,.0f}", "share": "{:.0%}"})
    assert table.splitlines() == [
        "| what | QPS | of bound | recall |",
        "| --- | --- | --- | --- |",
        "| exact | 12,346 | 50% | 87.3 |",  # a column without a format keeps the percentage
        "| scann | 99 |  |  |",
    ]


def test_format_table_rejects_formats_of_absent_columns():
    with pytest.raises(ValueError, match="formats"):
        format_table([{"qps": 1.0}], keys=["qps"], formats={"qsp": "{:.0f}"})
    with pytest.raises(ValueError, match="headers"):
        format_table([{"qps": 1.0}], headers={"qsp": "QPS"})
