"""Vectors belong to the model version that made them: per-version indexes through a real server."""

import os

import grpc
import numpy as np
import pytest

from fgkeras import cli
from fgkeras.index import Index
from fgkeras.serving import Client
from fgkeras.serving.indexing import index_gallery


def _photo_folder(kit, root, count=6, corrupt=0):
    images = kit.random_images(count, seed=3)
    for i, data in enumerate(images):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:02d}.png").write_bytes(data)
    for i in range(corrupt):
        (root / "class0" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    return images


def _top_scores(reference_gallery, query, k):
    return np.sort(reference_gallery @ query)[::-1][:k]


def test_two_versions_search_only_their_own_vectors_and_a_live_upsert_reaches_a_later_index(kit, tiny_exports,
                                                                                          tmp_path):
    models, indexes = tmp_path / "saved_models" / "tiny", tmp_path / "indexes" / "tiny"
    first = kit.install_version(str(models), tiny_exports[0], 1)
    gallery = _photo_folder(kit, tmp_path / "photos")
    report = index_gallery(first, images=tmp_path / "photos", progress=False)
    assert report.path == str(indexes / "1") and report.gallery_items == 6 and report.log_upserts == 0
    arrival = kit.random_images(1, seed=9)
    with kit.running(str(models), index_dir=str(indexes), num_versions=3) as server, \
            Client(server.address, model_name="tiny") as client:
        assert client.upsert(["new-arrival"], arrival)["versions"] == [1]  # version 1 is the only one served
        second = kit.install_version(str(models), tiny_exports[1], 2)     # other weights, the same dimension
        later = index_gallery(second, progress=False, images=tmp_path / "photos")
        assert later.log_upserts == 1 and later.count == 7
        server.models.poll_once()
        assert server.models.available_versions == [1, 2] and server.inventory.versions == [1, 2]
        for version, export in ((1, first), (2, second)):
            ids, scores = client.search(arrival, k=3, version=version)
            assert ids[0, 0] == "new-arrival"
            own = kit.reference_embeddings(export, gallery + arrival)
            np.testing.assert_allclose(scores[0], _top_scores(own, own[-1], 3), atol=1e-4)
        other = kit.reference_embeddings(first, gallery + arrival)
        _, scores_2 = client.search(gallery[:1], k=3, version=2)
        assert not np.allclose(scores_2[0], _top_scores(other, other[0], 3), atol=1e-3)  # never version 1's
        # an image upsert now reaches both versions, each with its own vectors
        late = kit.random_images(1, seed=11)
        assert client.upsert(["late"], late)["versions"] == [1, 2]
        for version in (1, 2):
            assert client.search(late, k=1, version=version)[0][0, 0] == "late"
        # embeddings belong to the version that made them
        own_2 = kit.reference_embeddings(second, kit.random_images(1, seed=12))
        assert client.upsert(["vec"], embeddings=own_2, version=2)["versions"] == [2]
        assert client.count(version=1) == 8 and client.count(version=2) == 9
        # a third version without an index: its searches are answered by version 2, which says so
        kit.install_version(str(models), tiny_exports[2], 3)
        server.models.poll_once()
        assert server.inventory.versions == [1, 2]
        with kit.stubs(server) as stubs:
            response = stubs.predict.Predict(kit.predict_request(late, signature="search"), timeout=30)
            assert response.model_spec.version.value == 2
            assert response.outputs["ids"].string_val[0] == b"late"
            embedded = stubs.predict.Predict(kit.predict_request(late, signature="embed"), timeout=30)
            assert embedded.model_spec.version.value == 3
    saved = Index.load(indexes / "2")
    assert saved.metadata["model"]["version"] == 2 and "vec" in saved.ids.tolist()
    assert saved.metadata["model"]["fingerprint"] != Index.load(indexes / "1").metadata["model"]["fingerprint"]


def test_a_retrained_model_under_the_same_version_does_not_use_the_old_index(kit, tiny_exports, tmp_path):
    models, indexes = tmp_path / "saved_models" / "tiny", tmp_path / "indexes" / "tiny"
    kit.install_version(str(models), tiny_exports[0], 1)
    _photo_folder(kit, tmp_path / "photos")
    index_gallery(str(models), images=tmp_path / "photos", progress=False)   # the latest version: 1
    os.rename(models / "1", tmp_path / "old")
    kit.install_version(str(models), tiny_exports[1], 1)   # re-exported with other weights, same number
    with kit.running(str(models), index_dir=str(indexes)) as server, Client(server.address) as client:
        assert server.inventory.versions == []
        with pytest.raises(grpc.RpcError) as error:
            client.search(kit.random_images(1), k=2)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_fgkeras_index_lists_corrupt_images_and_builds_the_layout(kit, tiny_exports, tmp_path, capsys):
    models = tmp_path / "saved_models" / "tiny"
    kit.install_version(str(models), tiny_exports[0], 4)
    _photo_folder(kit, tmp_path / "photos", count=5, corrupt=2)
    assert cli.main(["index", "--model", str(models), "--images", str(tmp_path / "photos")]) == 0
    out, err = capsys.readouterr()
    assert "5 items: 5 from the gallery" in out and "2 images could not be decoded" in err
    assert "broken0.png" in err and "broken1.png" in err
    index = Index.load(tmp_path / "indexes" / "tiny" / "4")
    assert len(index) == 5 and sorted(index.ids.tolist())[0] == os.path.join("class0", "00.png")
    assert index.metadata["gallery"] == str(tmp_path / "photos") and index.metadata["model"]["version"] == 4
