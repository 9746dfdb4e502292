import json
import os

import numpy as np
import pytest

import fgkeras.index.base as base
from fgkeras.index import ExactIndex, Index, IndexFormatError, ScannIndex


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


KINDS = {
    "exact": lambda: ExactIndex(threads=1),
    "scann_brute_force": lambda: ScannIndex(),
    "scann_tree": lambda: ScannIndex(mode="tree", num_leaves=20),
}


@pytest.fixture(params=sorted(KINDS))
def built(request, rng):
    vectors = unit(rng.normal(size=(1500, 24)))
    ids = [f"img/{i:05d}.jpg" for i in range(1500)] + ["ünïcode ✓"]
    vectors = np.concatenate([vectors, unit(rng.normal(size=(1, 24)))])
    index = KINDS[request.param]().build(vectors, ids)
    index.upsert(["late"], unit(rng.normal(size=(1, 24))))
    index.delete(["img/00007.jpg"])
    return index, unit(rng.normal(size=(30, 24)))


def manifest(directory):
    with open(os.path.join(directory, "manifest.json")) as f:
        return json.load(f)


def rewrite_manifest(directory, change):
    data = manifest(directory)
    change(data)
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(data, f)


def test_round_trip_gives_equal_results(built, tmp_path):
    index, queries = built
    index.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix")
    assert type(loaded) is type(index) and len(loaded) == len(index) == 1501
    assert loaded.threads == index.threads
    np.testing.assert_array_equal(loaded.ids, index.ids)
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    for k in (1, 10):
        ids, scores = index.search(queries, k=k)
        loaded_ids, loaded_scores = loaded.search(queries, k=k)
        np.testing.assert_array_equal(loaded_ids, ids)
        np.testing.assert_allclose(loaded_scores, scores, atol=1e-6)
    # Still mutable after loading.
    loaded.upsert(["after"], queries[:1])
    assert loaded.search(queries[0], k=1)[0][0, 0] == "after"
    assert type(index).load(tmp_path / "ix").dim == 24


def test_layout_has_a_manifest_and_no_pickle(built, tmp_path):
    index, _ = built
    index.save(tmp_path / "ix")
    data = manifest(tmp_path / "ix")
    assert data["format_version"] == base.FORMAT_VERSION and data["kind"] == index.kind
    assert data["dim"] == 24 and data["count"] == 1501 and data["dtype"] == "float32"
    assert {"embeddings.npy", "ids.json"} <= set(data["files"])
    on_disk = {os.path.relpath(os.path.join(d, f), tmp_path / "ix") for d, _, fs in os.walk(tmp_path / "ix") for f in fs}
    assert on_disk == set(data["files"]) | {"manifest.json"}
    assert not any(name.endswith((".pkl", ".pickle")) for name in on_disk)
    with open(tmp_path / "ix" / "ids.json", encoding="utf-8") as f:
        assert "ünïcode ✓" in json.load(f)


def test_truncated_embeddings_are_refused(built, tmp_path):
    index, _ = built
    index.save(tmp_path / "ix")
    path = tmp_path / "ix" / "embeddings.npy"
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(IndexFormatError, match="embeddings.npy.*truncated"):
        Index.load(tmp_path / "ix")


def test_a_missing_file_is_refused(built, tmp_path):
    index, _ = built
    index.save(tmp_path / "ix")
    victim = sorted(manifest(tmp_path / "ix")["files"])[-1]
    os.remove(tmp_path / "ix" / victim)
    with pytest.raises(IndexFormatError, match=f"{victim} is missing"):
        Index.load(tmp_path / "ix")
    os.remove(tmp_path / "ix" / "manifest.json")
    with pytest.raises(IndexFormatError, match="no manifest.json"):
        Index.load(tmp_path / "ix")


def test_a_tampered_id_file_is_refused(built, tmp_path):
    index, _ = built
    index.save(tmp_path / "ix")
    path = tmp_path / "ix" / "ids.json"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("img/00001.jpg", "img/00002.jpg"), encoding="utf-8")  # same size
    with pytest.raises(IndexFormatError, match="ids.json.*SHA-256"):
        Index.load(tmp_path / "ix")
    # Without the checksum (or with a forged one), the ids themselves are still checked.
    with pytest.raises(IndexFormatError, match="ids.json.*duplicated"):
        Index.load(tmp_path / "ix", verify=False)


def test_a_changed_scann_asset_is_refused(rng, tmp_path):
    index = ScannIndex(mode="ah").build(unit(rng.normal(size=(600, 8))), [str(i) for i in range(600)])
    index.save(tmp_path / "ix")
    path = tmp_path / "ix" / "scann" / "hashed_dataset.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="scann/hashed_dataset.npy.*SHA-256"):
        Index.load(tmp_path / "ix")


def test_an_asset_list_pointing_outside_is_refused(rng, tmp_path):
    index = ScannIndex().build(unit(rng.normal(size=(50, 8))), [str(i) for i in range(50)])
    index.save(tmp_path / "ix")
    path = tmp_path / "ix" / "scann" / "scann_assets.pbtxt"
    path.write_text(path.read_text().replace('"dataset.npy"', '"/etc/dataset.npy"'))

    def forge(data):
        data["files"]["scann/scann_assets.pbtxt"] = {"bytes": os.path.getsize(path), "sha256": base._sha256(path)}

    rewrite_manifest(tmp_path / "ix", forge)
    with pytest.raises(IndexFormatError, match="outside its directory"):
        Index.load(tmp_path / "ix")


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format_version=base.FORMAT_VERSION + 1), "newer index format \\(version 2\\)"),
    (lambda m: m.update(format_version="1"), "`format_version` must be an int"),
    (lambda m: m.update(kind="faiss"), "unknown index kind 'faiss'"),
    (lambda m: m.update(count=m["count"] + 1), "ids.json.*has 1501 ids; the manifest says 1502|holds float32"),
    (lambda m: m.update(dim=12), "holds float32 \\(1501, 24\\); the manifest says float32 \\(1501, 12\\)"),
    (lambda m: m["files"].update({"../x": {"bytes": 1, "sha256": ""}}), "outside the index directory"),
])
def test_a_bad_manifest_is_refused_by_name(rng, tmp_path, change, message):
    vectors = unit(rng.normal(size=(1501, 24)))
    ExactIndex().build(vectors, [str(i) for i in range(1501)]).save(tmp_path / "ix")
    rewrite_manifest(tmp_path / "ix", change)
    with pytest.raises(IndexFormatError, match=message):
        Index.load(tmp_path / "ix")


def test_loading_as_another_kind_is_refused(rng, tmp_path):
    ExactIndex().build(unit(rng.normal(size=(5, 4))), list("abcde")).save(tmp_path / "ix")
    with pytest.raises(IndexFormatError, match="holds a 'exact' index, not 'scann'"):
        ScannIndex.load(tmp_path / "ix")


def test_a_crash_during_save_leaves_the_old_index(built, tmp_path, monkeypatch):
    index, queries = built
    index.save(tmp_path / "ix")
    before = Index.load(tmp_path / "ix").search(queries, k=5)
    index.upsert(["newer"], queries[:1])

    def crash(self, path):
        with open(path, "wb") as f:
            f.write(b"\x93NUMPY half")
        raise OSError("disk full")

    monkeypatch.setattr(type(index), "_write_embeddings", crash)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path / "ix")
    after = Index.load(tmp_path / "ix").search(queries, k=5)
    np.testing.assert_array_equal(after[0], before[0])
    assert os.listdir(tmp_path) == ["ix"]  # the staging directory was removed
    monkeypatch.undo()
    index.save(tmp_path / "ix")  # replacing an existing index
    assert Index.load(tmp_path / "ix").search(queries[0], k=1)[0][0, 0] == "newer"
    assert os.listdir(tmp_path) == ["ix"]


def test_save_refuses_to_overwrite_a_directory_that_is_not_an_index(rng, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(ValueError, match="not an index directory"):
        ExactIndex().build(unit(rng.normal(size=(2, 4))), ["a", "b"]).save(tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.jpg").exists()


@pytest.mark.parametrize("make", [ExactIndex, ScannIndex])
def test_empty_index_round_trip(tmp_path, make):
    index = make().build(np.zeros((0, 6), np.float32), [])
    index.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix")
    assert len(loaded) == 0 and loaded.dim == 6
    assert loaded.search(np.ones((2, 6), np.float32), k=3)[0].shape == (2, 0)
    loaded.upsert(["a"], np.ones((1, 6), np.float32) / np.sqrt(6))
    assert loaded.search(np.ones(6, np.float32), k=3)[0].tolist() == [["a"]]


def two_versions(kind, rng):
    """Two indexes of one kind and size whose ids, vectors and ScaNN assets all differ."""
    first = KINDS[kind]().build(unit(rng.normal(size=(900, 24))), [f"v1/{i}" for i in range(900)])
    second = KINDS[kind]().build(unit(rng.normal(size=(900, 24))), [f"v2/{i}" for i in range(900)])
    return first, second


def assert_same_index(loaded, index, queries):
    np.testing.assert_array_equal(loaded.ids, index.ids)
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    np.testing.assert_array_equal(loaded.search(queries, k=10)[0], index.search(queries, k=10)[0])


@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_save_between_verification_and_loading_gives_one_whole_version(kind, pinned, rng, tmp_path, monkeypatch):
    first, second = two_versions(kind, rng)
    if not pinned:  # as without /proc: ScaNN reads its assets by path, and a replaced version is read again
        held = base._IndexFiles.__init__

        def unpinned(self, directory):
            held(self, directory)
            self.pinned = False

        monkeypatch.setattr(base._IndexFiles, "__init__", unpinned)
    first.metadata, second.metadata = {"version": 1}, {"version": 2}
    queries = unit(rng.normal(size=(20, 24)))
    first.save(tmp_path / "ix")
    read_embeddings, swapped = base._read_embeddings, []

    def swap_then_read(*args, **kwargs):  # every file was checked: another save lands now
        if not swapped:
            second.save(tmp_path / "ix")
            swapped.append(True)
        return read_embeddings(*args, **kwargs)

    monkeypatch.setattr(base, "_read_embeddings", swap_then_read)
    loaded = Index.load(tmp_path / "ix")
    assert swapped
    whole = first if pinned else second
    assert_same_index(loaded, whole, queries)
    assert loaded.metadata == whole.metadata
    monkeypatch.undo()
    again = Index.load(tmp_path / "ix")
    assert_same_index(again, second, queries)
    assert again.metadata == {"version": 2}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_version_removed_while_loading_is_read_again_from_the_new_one(kind, rng, tmp_path, monkeypatch):
    first, second = two_versions(kind, rng)
    queries = unit(rng.normal(size=(20, 24)))
    first.save(tmp_path / "ix")
    read_files, swapped = base._read_files, []

    def swap_then_read(files, verify):  # the directory is held open: the save swaps it out and removes it
        if not swapped:
            second.save(tmp_path / "ix")
            swapped.append(True)
        return read_files(files, verify)

    monkeypatch.setattr(base, "_read_files", swap_then_read)
    loaded = Index.load(tmp_path / "ix")
    assert swapped
    assert_same_index(loaded, second, queries)


def modes(directory):
    """{relative path: permission bits} of `directory` itself ("."), its folders and files."""
    found = {}
    for folder, _, names in os.walk(directory):
        for path in [folder] + [os.path.join(folder, name) for name in names]:
            found[os.path.relpath(path, directory)] = os.stat(path).st_mode & 0o777
    return found


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_saved_index_is_readable_by_another_user(kind, rng, tmp_path, umask_022):
    first, second = two_versions(kind, rng)
    for index in (first, second):  # a new directory, then one replaced
        index.save(tmp_path / "ix")
        found = modes(tmp_path / "ix")
        assert ("scann" in found) == (kind != "exact")
        expected = {path: 0o755 if os.path.isdir(tmp_path / "ix" / path) else 0o644 for path in found}
        assert found == expected


def test_an_index_is_made_from_its_kind_and_an_unknown_kind_is_refused():
    from fgkeras.index import ExactIndex, Index, ScannIndex

    assert type(Index.of_kind("exact")) is ExactIndex and type(Index.of_kind("scann")) is ScannIndex
    with pytest.raises(ValueError, match=r"one of \['exact', 'scann'\]. Received: kind='faiss'"):
        Index.of_kind("faiss")
