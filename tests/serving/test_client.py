"""`fgkeras.serving.Client` against a real server: embedding, the live inventory, restarts."""

import os

import grpc
import numpy as np
import pytest

from fgkeras.index import ExactIndex, Index
from fgkeras.serving import Client, encode_images
from fgkeras.serving.protos import inventory_pb2


def test_embed_accepts_paths_bytes_and_arrays(kit, model_root, tiny_exports, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 12, 10, 3), dtype=np.uint8)
    png = [kit.encode(p, "png") for p in pixels]
    paths = []
    for i, data in enumerate(png):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    reference = kit.reference_embeddings(tiny_exports[0], png)
    with kit.running(model_root) as server, Client(server.address, batch_size=2) as client:
        for images in (png, [str(p) for p in paths], paths, pixels, list(pixels)):
            np.testing.assert_allclose(client.embed(images), reference, atol=1e-6)
        np.testing.assert_allclose(client.embed(png[0]), reference[:1], atol=1e-6)  # one image
        assert client.status() == {1: "AVAILABLE"} and client.health() == "SERVING"
        assert {"embed", "serving_default", "embed_decoded"} <= set(client.metadata())
    with pytest.raises(TypeError, match="images\\[0\\]"):
        encode_images([3.5])


def test_upsert_then_search_finds_the_item_and_delete_removes_it_at_once(kit, model_root, tmp_path):
    gallery = kit.random_images(6, seed=1)
    with kit.running(model_root, index_dir=str(tmp_path / "gallery")) as server, Client(server.address) as client:
        assert client.count() == 0
        ids, scores = client.search(gallery[:1], k=3)
        assert ids.shape == (1, 0)  # an empty inventory
        summary = client.upsert([f"sku-{i}" for i in range(6)], gallery)
        assert summary["inserted"] == 6 and summary["count"] == 6 and summary["model_version"] == 1
        ids, scores = client.search(gallery[2:4], k=3)
        assert ids.shape == (2, 3) and ids[:, 0].tolist() == ["sku-2", "sku-3"]
        assert np.all(np.diff(scores, axis=1) <= 0) and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        assert client.delete(["sku-2"]) == {"deleted": 1, "count": 5}
        ids, _ = client.search(gallery[2:3], k=5)
        assert "sku-2" not in ids[0].tolist() and ids.shape == (1, 5)
        again = client.upsert(["sku-3"], gallery[:1])  # replace sku-3's vector by image 0's
        assert again["updated"] == 1 and again["count"] == 5
        ids, _ = client.search(gallery[:1], k=2)
        assert set(ids[0].tolist()) == {"sku-0", "sku-3"}
        assert "k" in client.metadata()["search"].inputs


def test_inventory_errors(kit, model_root, tmp_path):
    images = kit.random_images(2)
    with kit.running(model_root, index_dir=str(tmp_path / "gallery")) as server, Client(server.address) as client:
        client.upsert(["a"], images[:1])
        cases = [
            (lambda: client.inventory_stub.Upsert(inventory_pb2.UpsertRequest(ids=["x", "y"], images=images[:1])),
             grpc.StatusCode.INVALID_ARGUMENT, "2 ids need 2 images"),
            (lambda: client.upsert(["b"], [b"junk"]), grpc.StatusCode.INVALID_ARGUMENT, "images[0] is not a JPEG"),
            (lambda: client.upsert(["b"], embeddings=np.ones((1, 3)), version=1), grpc.StatusCode.INVALID_ARGUMENT,
             "version 1's index refuses these vectors"),
            (lambda: client.inventory_stub.Upsert(inventory_pb2.UpsertRequest(
                ids=["b"], embeddings=inventory_pb2.Embeddings(dim=1, values=[1.0])), timeout=10),
             grpc.StatusCode.INVALID_ARGUMENT, "must name the model version"),
            (lambda: client.upsert(["b"], embeddings=np.ones((1, 8)) / np.sqrt(8), version=7),
             grpc.StatusCode.FAILED_PRECONDITION, "version 7 has no index"),
            (lambda: client.upsert(["c", "c"], images), grpc.StatusCode.INVALID_ARGUMENT, "unique"),
            (lambda: client.delete(["a", "zz"]), grpc.StatusCode.NOT_FOUND, "'zz'"),
            (lambda: client.search(images, k=0), grpc.StatusCode.INVALID_ARGUMENT, "'k'"),
        ]
        for call, code, fragment in cases:
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == code and fragment in error.value.details(), error.value.details()
        assert client.count() == 1
        unit = np.ones((2, 8), np.float32) / np.sqrt(8)
        assert client.upsert(["e1", "e2"], embeddings=unit, version=1)["count"] == 3
        with pytest.raises(ValueError, match="pass `version`"):
            client.upsert(["e3"], embeddings=unit[:1])


def test_restart_keeps_acknowledged_upserts(kit, model_root, tmp_path):
    index_dir = str(tmp_path / "gallery")
    gallery = kit.random_images(4, seed=2)
    with kit.running(model_root, index_dir=index_dir) as server, Client(server.address) as client:
        client.upsert(["a", "b", "c", "d"], gallery)
        client.delete(["d"])
    assert sorted(Index.load(os.path.join(index_dir, "1")).ids.tolist()) == ["a", "b", "c"]  # saved at shutdown
    with kit.running(model_root, index_dir=index_dir) as server, Client(server.address) as client:
        assert client.count() == 3
        ids, _ = client.search(gallery[:3], k=1)
        assert ids[:, 0].tolist() == ["a", "b", "c"]


def test_an_index_made_by_another_model_is_never_searched(kit, model_root, tmp_path):
    index_dir = tmp_path / "gallery"
    foreign = ExactIndex().build(np.eye(8, dtype=np.float32), [f"x{i}" for i in range(8)])
    foreign.metadata = {"model": {"name": "tiny", "version": 1, "fingerprint": "tf:another-model"}, "log_seq": 0}
    foreign.save(index_dir / "1")
    images = kit.random_images(2)
    with kit.running(model_root, index_dir=str(index_dir)) as server, Client(server.address) as client:
        np.testing.assert_allclose(client.embed(images), kit.reference_embeddings(
            os.path.join(model_root, "1"), images), atol=1e-6)   # embed still served
        with pytest.raises(grpc.RpcError) as error:
            client.search(images, k=3)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "fgkeras index" in error.value.details()


def test_an_index_without_a_model_version_is_refused_with_the_way_out(kit, model_root, tmp_path):
    index_dir = str(tmp_path / "gallery")
    ExactIndex().build(np.eye(8, dtype=np.float32), [f"x{i}" for i in range(8)]).save(index_dir)
    with pytest.raises(ValueError, match="without a model version.*fgkeras index"):
        with kit.running(model_root, index_dir=index_dir):
            pass


def test_search_of_a_retrieval_export_without_an_index(kit, tmp_path):
    gallery_images = kit.random_images(4, seed=5)
    export = kit.save_tiny(tmp_path / "export", seed=0, warmup=False, gallery=(
        kit.reference_embeddings(kit.save_tiny(tmp_path / "plain", seed=0, warmup=False), gallery_images),
        [f"g{i}" for i in range(4)]))
    root = str(tmp_path / "tiny")
    kit.install_version(root, export, 1)
    with kit.running(root) as server, Client(server.address) as client:
        assert "k" not in client.metadata()["search"].inputs  # the export's own, fixed-k search
        ids, scores = client.search(gallery_images[1:3], k=2)
        assert ids.shape == (2, 2) and ids[:, 0].tolist() == ["g1", "g2"]
        with pytest.raises(grpc.RpcError) as error:
            client.upsert(["x"], gallery_images[:1])
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED  # no inventory service without an index
    assert not os.path.exists(tmp_path / "gallery")
