import os
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest

from fgkeras.index import Index, ScannIndex
from fgkeras.serving import Inventory, ServingError


def _vectors(n, dim=4, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _contents(inventory):
    ids, _ = inventory.search(_vectors(1), k=1000)
    return sorted(ids[0].tolist())


def test_upsert_search_delete(tmp_path):
    inventory = Inventory(tmp_path / "gallery")
    vectors = _vectors(3)
    assert inventory.upsert(["a", "b", "c"], vectors) == (3, 0, 3)
    ids, scores = inventory.search(vectors[1:2], k=2)
    assert ids[0, 0] == "b" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert inventory.upsert(["b", "d"], _vectors(2, seed=1)) == (1, 1, 4)
    assert inventory.delete(["a", "d"]) == (2, 2)
    assert _contents(inventory) == ["b", "c"]
    inventory.close()


@pytest.mark.parametrize("ids, vectors, message", [
    (["a", "a"], _vectors(2), "unique"),
    ([], np.zeros((0, 4), np.float32), "no ids"),
    ([""], _vectors(1), "non-empty"),
    (["a"], _vectors(2), r"\(1, dim\)"),
    (["a"], np.full((1, 4), np.nan, np.float32), "NaN"),
    (["a"], _vectors(1, dim=5), "4-d vectors"),
])
def test_bad_upserts_are_refused_and_change_nothing(tmp_path, ids, vectors, message):
    inventory = Inventory(tmp_path / "gallery")
    inventory.upsert(["x"], _vectors(1))
    log_size = os.path.getsize(inventory.log_path)
    with pytest.raises(ServingError, match=message) as error:
        inventory.upsert(ids, vectors)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert _contents(inventory) == ["x"] and os.path.getsize(inventory.log_path) == log_size


def test_deleting_unknown_ids_deletes_nothing_unless_missing_ok(tmp_path):
    inventory = Inventory(tmp_path / "gallery")
    inventory.upsert(["a", "b"], _vectors(2))
    with pytest.raises(ServingError, match="'zz'") as error:
        inventory.delete(["a", "zz"])
    assert error.value.code == grpc.StatusCode.NOT_FOUND and _contents(inventory) == ["a", "b"]
    assert inventory.delete(["a", "zz"], missing_ok=True) == (1, 1)


def test_acknowledged_changes_survive_a_crash(tmp_path):
    """A second Inventory on the same directory while the first was never closed: what a restart
    after `kill -9` sees."""
    crashed = Inventory(tmp_path / "gallery", snapshot_every=1000)
    crashed.upsert(["a", "b", "c"], _vectors(3))
    crashed.delete(["b"])
    crashed.upsert(["b"], _vectors(1, seed=7))
    crashed.upsert(["d"], _vectors(1, seed=8))
    crashed.delete(["d"])
    assert not os.path.exists(tmp_path / "gallery" / "manifest.json")  # nothing snapshotted: all in the log
    restarted = Inventory(tmp_path / "gallery")
    assert _contents(restarted) == ["a", "b", "c"]
    ids, scores = restarted.search(_vectors(1, seed=7), k=1)
    assert ids[0, 0] == "b" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    restarted.close()
    assert os.path.getsize(restarted.log_path) == 0  # replayed changes were snapshotted
    assert sorted(Index.load(tmp_path / "gallery").ids.tolist()) == ["a", "b", "c"]


def test_a_torn_record_at_the_end_of_the_log_is_dropped(tmp_path):
    first = Inventory(tmp_path / "gallery")
    first.upsert(["a"], _vectors(1))
    intact = os.path.getsize(first.log_path)
    first.upsert(["b"], _vectors(1, seed=1))
    with open(first.log_path, "r+b") as f:  # the process died while writing the second record
        f.truncate(intact + 10)
    second = Inventory(tmp_path / "gallery")
    assert _contents(second) == ["a"]


def test_snapshots_every_n_changes_and_replay_is_idempotent(tmp_path):
    inventory = Inventory(tmp_path / "gallery", snapshot_every=3)
    for n in range(7):
        inventory.upsert([f"id{n}"], _vectors(1, seed=n))
    assert sorted(Index.load(tmp_path / "gallery").ids.tolist()) == [f"id{n}" for n in range(6)]
    assert os.path.getsize(inventory.log_path) > 0  # the 7th change, since the last snapshot
    inventory.delete(["id6"])
    inventory.upsert(["id0"], _vectors(1, seed=99))
    log = open(inventory.log_path, "rb").read()  # upsert id6, delete id6, upsert id0
    inventory.snapshot()
    assert os.path.getsize(inventory.log_path) == 0
    # a crash between the snapshot and emptying the log: the log is replayed onto a snapshot that holds it
    with open(inventory.log_path, "wb") as f:
        f.write(log)
    again = Inventory(tmp_path / "gallery")
    assert _contents(again) == [f"id{n}" for n in range(6)]
    ids, _ = again.search(_vectors(1, seed=99), k=1)
    assert ids[0, 0] == "id0"


def test_search_of_an_empty_inventory_and_a_wrong_dimension(tmp_path):
    inventory = Inventory(tmp_path / "gallery")
    ids, scores = inventory.search(_vectors(2), k=5)
    assert ids.shape == (2, 0) and scores.shape == (2, 0)
    inventory.upsert(["a"], _vectors(1))
    with pytest.raises(ServingError) as error:
        inventory.search(_vectors(1, dim=6), k=1)
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_directory_that_is_not_an_index_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"...")
    with pytest.raises(ValueError, match="not an index directory"):
        Inventory(tmp_path / "photos")


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
    index.save(tmp_path / "gallery")
    return Inventory(tmp_path / "gallery")


def test_a_scann_retraining_runs_beside_searches_and_keeps_the_changes_made_meanwhile(tmp_path, monkeypatch):
    held = _HeldRetraining(monkeypatch)
    inventory = _scann_inventory(tmp_path)
    serving = inventory._index
    assert inventory.upsert([f"n{i}" for i in range(11)], _vectors(11, seed=1))[2] == 31  # 11 > 0.5 x 20: due
    assert held.started.wait(30)
    with futures.ThreadPoolExecutor(2) as pool:  # answered while the retraining is held
        ids, _ = pool.submit(inventory.search, _vectors(11, seed=1)[3:4], 1).result(timeout=30)
        assert ids[0, 0] == "n3"
        assert pool.submit(inventory.upsert, ["late"], _vectors(1, seed=2)).result(timeout=30) == (1, 0, 32)
        assert pool.submit(inventory.delete, ["g0", "n0"]).result(timeout=30) == (2, 30)
    assert inventory._index is serving
    held.release.set()
    assert inventory.wait_for_retraining(60)
    assert inventory._index is not serving and inventory._index.config["trained_size"] == 31
    expected = sorted([f"g{i}" for i in range(1, 20)] + [f"n{i}" for i in range(1, 11)] + ["late"])
    assert _contents(inventory) == expected
    ids, scores = inventory.search(_vectors(1, seed=2), k=1)
    assert ids[0, 0] == "late" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    inventory.upsert(["after"], _vectors(1, seed=3))  # the swapped-in index takes changes too
    assert not inventory._index.auto_rebalance and "after" in _contents(inventory)
    restarted = Inventory(tmp_path / "gallery")  # a crash now: the log still holds every change
    assert _contents(restarted) == sorted(expected + ["after"])


def test_close_during_a_retraining_drops_it_and_snapshots_every_change(tmp_path, monkeypatch):
    held = _HeldRetraining(monkeypatch)
    inventory = _scann_inventory(tmp_path)
    serving = inventory._index
    inventory.upsert([f"n{i}" for i in range(11)], _vectors(11, seed=1))
    assert held.started.wait(30)
    inventory.delete(["g5"])
    with futures.ThreadPoolExecutor(1) as pool:
        closing = pool.submit(inventory.close)
        held.release.set()
        closing.result(timeout=60)
    assert inventory._index is serving and os.path.getsize(inventory.log_path) == 0
    saved = Index.load(tmp_path / "gallery")
    assert sorted(saved.ids.tolist()) == sorted([f"g{i}" for i in range(20) if i != 5] + [f"n{i}" for i in range(11)])
