"""What every index shares: `metadata` and `validate_upsert` (the contract the serving inventory relies on)."""

import json
import os

import numpy as np
import pytest

from fgkeras.index import ExactIndex, Index, IndexFormatError, ScannIndex


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


KINDS = {
    "exact": lambda: ExactIndex(threads=1),
    "scann_brute_force": lambda: ScannIndex(),
    "scann_tree": lambda: ScannIndex(mode="tree", num_leaves=10, calibration_recall=None),
}

MODEL = {"model": {"name": "htg", "version": 3, "fingerprint": "sha256:ab12"}, "log_seq": 41}


@pytest.fixture(params=sorted(KINDS))
def built(request, rng):
    vectors = unit(rng.normal(size=(600, 16)))
    return KINDS[request.param]().build(vectors, [f"sku-{i}" for i in range(600)])


def test_metadata_defaults_to_empty_and_round_trips_through_save_load(built, tmp_path):
    assert built.metadata == {}
    built.metadata = MODEL
    assert built.metadata == MODEL
    built.save(tmp_path / "ix")
    with open(os.path.join(tmp_path / "ix", "manifest.json")) as f:
        assert json.load(f)["metadata"] == MODEL
    loaded = Index.load(tmp_path / "ix")
    assert loaded.metadata == MODEL
    loaded.metadata = {}
    loaded.save(tmp_path / "ix")
    assert Index.load(tmp_path / "ix").metadata == {}


def test_metadata_is_a_copy_changed_only_by_assignment(built):
    value = {"model": {"name": "a"}, "tags": ("x", "y")}
    built.metadata = value
    value["model"]["name"] = "b"
    read = built.metadata
    read["log_seq"] = 1
    assert built.metadata == {"model": {"name": "a"}, "tags": ["x", "y"]}  # stored as JSON reads it back


@pytest.mark.parametrize("value, message", [
    ([1, 2], "must be a dict"),
    ({"seq": float("nan")}, "JSON-serialisable"),
    ({"when": object()}, "JSON-serialisable"),
    ({"model": {1: "int key"}}, "keys must be strings"),
])
def test_metadata_that_json_would_not_give_back_is_refused(value, message):
    index = ExactIndex()
    with pytest.raises(ValueError, match=message):
        index.metadata = value
    assert index.metadata == {}


def test_a_manifest_without_metadata_loads_with_empty_metadata(tmp_path, rng):
    ExactIndex().build(unit(rng.normal(size=(20, 4))), [str(i) for i in range(20)]).save(tmp_path / "ix")
    path = tmp_path / "ix" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["metadata"]  # as written before metadata existed
    path.write_text(json.dumps(manifest))
    assert Index.load(tmp_path / "ix").metadata == {}
    manifest["metadata"] = ["not", "an", "object"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="`metadata` must be an object"):
        Index.load(tmp_path / "ix")


def test_retrained_keeps_the_metadata(rng):
    vectors = unit(rng.normal(size=(600, 16)))
    ids = [f"sku-{i}" for i in range(600)]
    index = ScannIndex(mode="tree", num_leaves=10, calibration_recall=None).build(vectors, ids)
    index.metadata = MODEL
    fresh = index.retrained(vectors[:500], ids[:500])
    assert fresh.metadata == MODEL and len(fresh) == 500


def bad_upserts(dim):
    """(ids, embeddings, message) that every index refuses."""
    good = unit(np.ones((2, dim)))
    return [
        (["a", "b"], good[:1], "one row per id"),
        (["a", "a"], good, "must be unique"),
        (["a", 7], good, "must all be strings"),
        (b"a", good[0], "sequence of strings"),
        (["a", "b"], unit(np.ones((2, dim + 1))), f"must have dim {dim}"),
        (["a", "b"], np.array([["x"] * dim] * 2), "real numeric"),
        (["a", "b"], np.full((2, dim), np.nan), "must be finite"),
        (["a", "b"], np.ones((2, dim, 1)), "must have shape"),
    ]


def test_validate_upsert_raises_what_upsert_raises_and_changes_nothing(built):
    ids, vectors = built.ids, built.embeddings.copy()
    probe = vectors[:3]
    before = built.search(probe, k=5)
    for new_ids, embeddings, message in bad_upserts(built.dim):
        with pytest.raises(ValueError, match=message) as validated:
            built.validate_upsert(new_ids, embeddings)
        with pytest.raises(ValueError, match=message) as applied:
            built.upsert(new_ids, embeddings)
        assert str(validated.value) == str(applied.value)
    np.testing.assert_array_equal(built.ids, ids)
    np.testing.assert_array_equal(built.embeddings, vectors)
    after = built.search(probe, k=5)
    np.testing.assert_array_equal(after[0], before[0])
    checked_ids, checked = built.validate_upsert(("sku-1", "new"), unit(np.ones((2, built.dim))).astype(np.float64))
    assert checked_ids == ["sku-1", "new"] and checked.dtype == np.float32 and checked.shape == (2, built.dim)
    assert len(built) == 600 and "new" not in set(built.ids.tolist())


def test_validate_upsert_refuses_non_unit_vectors_for_a_spherical_tree(rng):
    vectors = unit(rng.normal(size=(600, 16)))
    index = ScannIndex(mode="tree", num_leaves=10, calibration_recall=None).build(
        vectors, [f"sku-{i}" for i in range(600)])
    assert index.config["spherical"] is True
    with pytest.raises(ValueError, match="L2-normalised"):
        index.validate_upsert(["new"], 3 * vectors[0])
    index.validate_upsert(["new"], vectors[0])
    # An empty index told to be spherical trains its first tree on the upserted vectors.
    empty = ScannIndex(mode="tree", num_leaves=10, spherical=True, calibration_recall=None)
    with pytest.raises(ValueError, match="L2-normalised"):
        empty.validate_upsert([f"n{i}" for i in range(50)], 3 * vectors[:50])
    with pytest.raises(ValueError, match="L2-normalised"):
        empty.upsert([f"n{i}" for i in range(50)], 3 * vectors[:50])
    assert len(empty) == 0 and empty.dim is None


def test_upsert_calls_validate_upsert_first(built, monkeypatch):
    def refuse(ids, embeddings):
        raise ValueError("refused")

    monkeypatch.setattr(built, "validate_upsert", refuse)
    with pytest.raises(ValueError, match="refused"):
        built.upsert(["new"], built.embeddings[0])
    assert len(built) == 600
