"""`Inventory`: one index per model version, durable changes, replay, compaction, retraining."""

import hashlib
import os
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest

from fgkeras.index import ExactIndex, Index, ScannIndex
from fgkeras.serving import Inventory, ServingError
from fgkeras.serving.protos import inventory_pb2
from fgkeras.serving.wal import WriteAheadLog, read_entries


def _vectors(n, dim=4, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class _Model:
    """A stand-in for a SavedModel version: a deterministic unit vector per image, its own per version."""

    def __init__(self, version, dim=4):
        self.version, self.dim, self.calls = version, dim, 0

    def __call__(self, images):
        self.calls += 1
        rows = [_vectors(1, self.dim, int.from_bytes(hashlib.sha256(bytes(data)).digest()[:4], "little")
                         + 1000 * self.version)[0] for data in images]
        return np.stack(rows)

    @property
    def record(self):
        return {"name": "cars", "version": self.version, "fingerprint": f"tf:{self.version}"}


def _images(*names):
    array = np.empty(len(names), object)
    array[:] = [name.encode() for name in names]
    return array


def _open(root, versions=(1,), **kwargs):
    inventory = Inventory(root, **kwargs)
    models = {v: _Model(v) for v in versions}
    for version, model in models.items():
        assert inventory.attach(version, model.record, model)
    return inventory, models


def _contents(inventory, version):
    ids, _ = inventory.search(version, _vectors(1), k=1000)
    return sorted(ids[0].tolist())


def test_image_upserts_reach_every_version_with_its_own_vectors(tmp_path):
    inventory, models = _open(tmp_path / "cars", versions=(1, 2))
    assert inventory.upsert_images(["a", "b", "c"], _images("a", "b", "c")) == (3, 0, 3, [1, 2])
    for version, model in models.items():
        ids, scores = inventory.search(version, model(_images("b")), k=3)
        assert ids[0, 0] == "b" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        expected = model(_images("a", "b", "c")) @ model(_images("b"))[0]
        np.testing.assert_allclose(np.sort(scores[0])[::-1], np.sort(expected)[::-1], atol=1e-5)
    # a query embedded by version 1 does not find "b" first among version 2's vectors
    ids, scores = inventory.search(2, models[1](_images("b")), k=1)
    assert scores[0, 0] < 0.99
    assert inventory.upsert_images(["b", "d"], _images("x", "d")) == (1, 1, 4, [1, 2])
    assert inventory.delete(["a", "d"]) == (2, 2)
    assert _contents(inventory, 1) == _contents(inventory, 2) == ["b", "c"]
    inventory.close()


def test_embeddings_upserts_reach_only_the_version_that_made_them(tmp_path):
    inventory, _ = _open(tmp_path / "cars", versions=(1, 2))
    assert inventory.upsert_embeddings(2, ["e"], _vectors(1, seed=5)) == (1, 0, 1, [2])
    assert _contents(inventory, 2) == ["e"] and _contents(inventory, 1) == []
    assert inventory.upsert_embeddings(1, ["e", "f"], _vectors(2, seed=6)) == (2, 0, 2, [1])  # counted in 1's index
    with pytest.raises(ServingError, match="must name the model version") as error:
        inventory.upsert_embeddings(None, ["f"], _vectors(1))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ServingError, match="version 3 has no index") as error:
        inventory.upsert_embeddings(3, ["f"], _vectors(1))
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
    inventory.close()


@pytest.mark.parametrize("ids, vectors, message", [
    (["a", "a"], _vectors(2), "unique"),
    ([], np.zeros((0, 4), np.float32), "no ids"),
    ([""], _vectors(1), "non-empty"),
    (["a"], _vectors(2), "refuses"),
    (["a"], np.full((1, 4), np.nan, np.float32), "refuses"),
    (["a"], _vectors(1, dim=5), "refuses"),
])
def test_refused_upserts_change_nothing_and_never_reach_the_log(tmp_path, ids, vectors, message):
    inventory, _ = _open(tmp_path / "cars")
    inventory.upsert_embeddings(1, ["x"], _vectors(1))
    log_size = os.path.getsize(inventory.log_path)
    with pytest.raises(ServingError, match=message) as error:
        inventory.upsert_embeddings(1, ids, vectors)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert _contents(inventory, 1) == ["x"] and os.path.getsize(inventory.log_path) == log_size
    restarted, _ = _open(tmp_path / "cars")  # the log opens and replays: nothing refused was logged
    assert _contents(restarted, 1) == ["x"]


def test_a_spherical_scann_index_refuses_non_unit_vectors_before_the_log(tmp_path):
    index = ScannIndex(mode="tree", num_leaves=4, spherical=True, calibration_recall=None, progress=False)
    index.build(_vectors(200), [f"g{i}" for i in range(200)])
    index.metadata = {"model": _Model(1).record, "log_seq": 0, "gallery": "test"}
    index.save(tmp_path / "cars" / "1")
    inventory, _ = _open(tmp_path / "cars")
    size = os.path.getsize(inventory.log_path)
    with pytest.raises(ServingError) as error:
        inventory.upsert_embeddings(1, ["big"], 3 * _vectors(1))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and os.path.getsize(inventory.log_path) == size
    again, _ = _open(tmp_path / "cars")
    assert len(again) == 200


def test_deleting_unknown_ids_deletes_nothing_unless_missing_ok(tmp_path):
    inventory, _ = _open(tmp_path / "cars")
    inventory.upsert_images(["a", "b"], _images("a", "b"))
    with pytest.raises(ServingError, match="'zz'") as error:
        inventory.delete(["a", "zz"])
    assert error.value.code == grpc.StatusCode.NOT_FOUND and _contents(inventory, 1) == ["a", "b"]
    assert inventory.delete(["a", "zz"], missing_ok=True) == (1, 1)


def test_acknowledged_changes_survive_a_crash_and_a_logged_change_is_rolled_forward(tmp_path):
    """A second Inventory on the same directory while the first was never closed: what a restart
    after `kill -9` sees; and a change logged but not applied when the process died."""
    crashed, _ = _open(tmp_path / "cars", versions=(1, 2))
    crashed.upsert_images(["a", "b", "c"], _images("a", "b", "c"))
    crashed.delete(["b"])
    crashed.upsert_images(["b"], _images("b2"))
    crashed.upsert_embeddings(2, ["only2"], _vectors(1, seed=3))
    # the next change was fsynced to the log, then the process died before applying it
    record = inventory_pb2.LogRecord(upsert_ids=["late"], upsert_images=[b"late"])
    for version in (1, 2):
        entry = record.upsert_vectors.add(version=version)
        entry.embeddings.dim = 4
        entry.embeddings.values.extend(_Model(version)(_images("late")).ravel().tolist())
    crashed._wal.append(record.SerializeToString())
    restarted, models = _open(tmp_path / "cars", versions=(1, 2))
    assert _contents(restarted, 1) == ["a", "b", "c", "late"]
    assert _contents(restarted, 2) == ["a", "b", "c", "late", "only2"]
    ids, scores = restarted.search(2, models[2](_images("b2")), k=1)
    assert ids[0, 0] == "b" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    restarted.close()
    assert sorted(Index.load(tmp_path / "cars" / "2").ids.tolist()) == ["a", "b", "c", "late", "only2"]


def test_a_restart_compacts_the_log_but_keeps_what_a_version_left_behind_needs(tmp_path):
    crashed, _ = _open(tmp_path / "cars", versions=(1, 2))
    crashed.upsert_images(["a", "b"], _images("a", "b"))
    crashed.upsert_embeddings(2, ["only2"], _vectors(1, seed=3))
    # restarted with version 1 alone (version 2 pinned out): the log is compacted, version 2's record kept
    alone, _ = _open(tmp_path / "cars", versions=(1,))
    records = [inventory_pb2.LogRecord.FromString(e.payload) for e in read_entries(alone.log_path)]
    assert ["only2"] in [list(r.upsert_ids) for r in records if r.upsert_vectors]
    assert sorted(i for r in records if r.upsert_images for i in r.upsert_ids) == ["a", "b"]
    both, _ = _open(tmp_path / "cars", versions=(1, 2))
    assert _contents(both, 2) == ["a", "b", "only2"] and _contents(both, 1) == ["a", "b"]
    records = [inventory_pb2.LogRecord.FromString(e.payload) for e in read_entries(both.log_path)]
    assert not any(r.upsert_vectors for r in records)  # now every index holds it: compacted away


def test_a_version_indexed_before_live_changes_gets_them_embedded_by_itself(tmp_path):
    root = tmp_path / "cars"
    gallery = ExactIndex().build(_Model(2)(_images("g1", "g2")), ["g1", "g2"])
    gallery.metadata = {"model": _Model(2).record, "log_seq": 0, "gallery": "photos/"}
    gallery.save(root / "2")                      # `fgkeras index` for version 2, before the changes
    first = _Model(1)
    old = ExactIndex().build(first(_images("g1", "g2")), ["g1", "g2"])
    old.metadata = {"model": first.record, "log_seq": 0, "gallery": "photos/"}
    old.save(root / "1")
    inventory = Inventory(root)
    assert inventory.attach(1, first.record, first)
    inventory.upsert_images(["new"], _images("new"))   # served by version 1 only
    inventory.delete(["g2"])
    second = _Model(2)
    assert inventory.attach(2, second.record, second)  # the hot reload of version 2
    assert second.calls == 1 and _contents(inventory, 2) == ["g1", "new"]
    ids, scores = inventory.search(2, second(_images("new")), k=1)
    assert ids[0, 0] == "new" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_an_index_made_by_another_model_is_not_attached(tmp_path):
    root = tmp_path / "cars"
    index = ExactIndex().build(_vectors(3), ["a", "b", "c"])
    index.metadata = {"model": {"name": "cars", "version": 1, "fingerprint": "tf:retrained"}, "log_seq": 0,
                      "gallery": "photos/"}
    index.save(root / "1")
    inventory = Inventory(root)
    assert not inventory.attach(1, _Model(1).record, _Model(1))
    with pytest.raises(ServingError) as error:
        inventory.search(1, _vectors(1), k=1)
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(ServingError, match="fgkeras index"):
        inventory.answering(1)


def test_searches_of_a_version_without_an_index_are_answered_by_the_newest_with_one(tmp_path):
    root = tmp_path / "cars"
    for version in (1, 3):
        index = ExactIndex().build(_Model(version)(_images("a")), ["a"])
        index.metadata = {"model": _Model(version).record, "log_seq": 0, "gallery": "photos/"}
        index.save(root / str(version))
    inventory = Inventory(root)
    for version in (1, 2, 3):
        assert inventory.attach(version, _Model(version).record, _Model(version)) == (version != 2)
    assert [inventory.answering(v) for v in (1, 2, 3, 0)] == [1, 3, 3, 3]


def test_snapshots_compact_the_log_to_what_a_rebuild_needs(tmp_path):
    inventory, _ = _open(tmp_path / "cars", snapshot_every=1000)
    inventory.upsert_images(["a", "b", "c"], _images("a", "b", "c"))
    inventory.upsert_images(["a"], _images("a2"))
    inventory.delete(["b"])
    inventory.upsert_embeddings(1, ["e"], _vectors(1))
    inventory.snapshot()
    records = [(e.seq, inventory_pb2.LogRecord.FromString(e.payload)) for e in read_entries(inventory.log_path)]
    images = {i: bytes(image) for _, r in records for i, image in zip(r.upsert_ids, r.upsert_images)}
    assert images == {"a": b"a2", "c": b"c"}
    assert [list(r.delete_ids) for _, r in records if r.delete_ids] == [["b"]]
    assert not any(r.upsert_vectors for _, r in records) and [s for s, _ in records] == sorted(s for s, _ in records)
    next_seq = WriteAheadLog(inventory.log_path).next_seq
    assert next_seq == 5  # numbering goes on after the compaction (4 changes were logged)
    inventory.close()
    # a version whose every predecessor was made from the log alone is rebuilt from it
    restarted, models = _open(tmp_path / "cars", versions=(1, 2))
    assert _contents(restarted, 2) == ["a", "c"]
    ids, scores = restarted.search(2, models[2](_images("a2")), k=1)
    assert ids[0, 0] == "a" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_snapshots_every_n_changes(tmp_path):
    inventory, _ = _open(tmp_path / "cars", snapshot_every=3)
    for n in range(7):
        inventory.upsert_images([f"id{n}"], _images(f"id{n}"))
    saved = Index.load(tmp_path / "cars" / "1")
    assert sorted(saved.ids.tolist()) == [f"id{n}" for n in range(6)] and saved.metadata["log_seq"] == 6


def test_detaching_saves_the_version_and_a_legacy_index_is_refused(tmp_path):
    inventory, _ = _open(tmp_path / "cars", versions=(1, 2))
    inventory.upsert_images(["a"], _images("a"))
    inventory.detach(1)
    assert inventory.versions == [2] and Index.load(tmp_path / "cars" / "1").ids.tolist() == ["a"]
    inventory.upsert_images(["b"], _images("b"))
    assert inventory.upsert_images(["c"], _images("c"))[3] == [2]
    ExactIndex().build(_vectors(2), ["x", "y"]).save(tmp_path / "old")
    with pytest.raises(ValueError, match="without a model version"):
        Inventory(tmp_path / "old")


def test_search_of_an_empty_index_and_a_wrong_dimension(tmp_path):
    inventory, _ = _open(tmp_path / "cars")
    ids, scores = inventory.search(1, _vectors(2), k=5)
    assert ids.shape == (2, 0) and scores.shape == (2, 0)
    inventory.upsert_images(["a"], _images("a"))
    with pytest.raises(ServingError) as error:
        inventory.search(1, _vectors(1, dim=6), k=1)
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION


class _HeldRetraining:
    """Holds `ScannIndex.retrained` (the background retraining) until released."""

    def __init__(self, monkeypatch):
        self.started, self.release = threading.Event(), threading.Event()
        original = ScannIndex.retrained

        def held(index, embeddings, ids):
            self.started.set()
            assert self.release.wait(60)
            return original(index, embeddings, ids)

        monkeypatch.setattr(ScannIndex, "retrained", held)


def _scann_inventory(tmp_path, count=20):
    index = ScannIndex(rebalance_fraction=0.5, calibration_recall=None, progress=False)
    index.build(_vectors(count), [f"g{i}" for i in range(count)])
    index.metadata = {"model": _Model(1).record, "log_seq": 0, "gallery": "test"}
    index.save(tmp_path / "cars" / "1")
    return _open(tmp_path / "cars")[0]


def test_a_scann_retraining_runs_beside_searches_and_keeps_the_changes_made_meanwhile(tmp_path, monkeypatch):
    held = _HeldRetraining(monkeypatch)
    inventory = _scann_inventory(tmp_path)
    serving = inventory._versions[1].index
    assert inventory.upsert_embeddings(1, [f"n{i}" for i in range(11)], _vectors(11, seed=1))[2] == 31  # due
    assert held.started.wait(30)
    with futures.ThreadPoolExecutor(2) as pool:  # answered while the retraining is held
        ids, _ = pool.submit(inventory.search, 1, _vectors(11, seed=1)[3:4], 1).result(timeout=30)
        assert ids[0, 0] == "n3"
        assert pool.submit(inventory.upsert_embeddings, 1, ["late"], _vectors(1, seed=2)).result(timeout=30)[:3] == \
            (1, 0, 32)
        assert pool.submit(inventory.delete, ["g0", "n0"]).result(timeout=30) == (2, 30)
    assert inventory._versions[1].index is serving
    held.release.set()
    assert inventory.wait_for_retraining(60)
    swapped = inventory._versions[1].index
    assert swapped is not serving and swapped.config["trained_size"] == 31
    assert swapped.metadata["model"] == _Model(1).record
    expected = sorted([f"g{i}" for i in range(1, 20)] + [f"n{i}" for i in range(1, 11)] + ["late"])
    assert _contents(inventory, 1) == expected
    inventory.upsert_embeddings(1, ["after"], _vectors(1, seed=3))  # the swapped-in index takes changes too
    assert not swapped.auto_rebalance and "after" in _contents(inventory, 1)
    restarted, _ = _open(tmp_path / "cars")  # a crash now: the log still holds every change
    assert _contents(restarted, 1) == sorted(expected + ["after"])


def test_close_during_a_retraining_drops_it_and_saves_every_change(tmp_path, monkeypatch):
    held = _HeldRetraining(monkeypatch)
    inventory = _scann_inventory(tmp_path)
    serving = inventory._versions[1].index
    inventory.upsert_embeddings(1, [f"n{i}" for i in range(11)], _vectors(11, seed=1))
    assert held.started.wait(30)
    inventory.delete(["g5"])
    with futures.ThreadPoolExecutor(1) as pool:
        closing = pool.submit(inventory.close)
        held.release.set()
        closing.result(timeout=60)
    assert inventory._versions[1].index is serving
    saved = Index.load(tmp_path / "cars" / "1")
    assert sorted(saved.ids.tolist()) == sorted([f"g{i}" for i in range(20) if i != 5] + [f"n{i}" for i in range(11)])
