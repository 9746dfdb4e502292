"""The server through TF Serving's stock stubs: Predict, GetModelMetadata, GetModelStatus, health,
errors, versions, hot reload, batching and limits."""

import json
import os
import shutil
import socket
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, prediction_log_pb2

from fgkeras.export import build_model_card, push, write_model_card
from fgkeras.serving import BatchingParameters, Limits
from fgkeras.serving.models import read_signature_defs


def _code(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as error:
        call(*args, **kwargs)
    return error.value.code(), error.value.details()


def test_predict_through_the_stock_stub_equals_the_savedmodel(kit, model_root, tiny_exports):
    images = kit.random_images(3)
    reference = kit.reference_embeddings(tiny_exports[0], images)
    decoded = np.stack([tf.image.resize(tf.io.decode_image(b, channels=3), [kit.SIDE, kit.SIDE]).numpy()
                        for b in images]).astype(np.uint8)
    with kit.running(model_root) as server, kit.stubs(server) as stub:
        for signature in ("embed", "serving_default", ""):
            response = stub.predict.Predict(kit.predict_request(images, signature=signature), timeout=30)
            np.testing.assert_allclose(kit.embeddings_of(response), reference, atol=1e-6)
            assert response.model_spec.name == "tiny" and response.model_spec.version.value == 1
            assert response.model_spec.signature_name == (signature or "serving_default")
        response = stub.predict.Predict(kit.predict_request(decoded, signature="embed_decoded"), timeout=30)
        assert kit.embeddings_of(response).shape == (3, kit.DIM)
        filtered = kit.predict_request(images, signature="embed")
        filtered.output_filter.append("embeddings")
        assert list(stub.predict.Predict(filtered, timeout=30).outputs) == ["embeddings"]
        filtered.output_filter.append("nope")
        assert _code(stub.predict.Predict, filtered, timeout=30)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_metadata_is_the_savedmodel_signature_defs(kit, model_root):
    expected, _ = read_signature_defs(os.path.join(model_root, "1"))
    with kit.running(model_root) as server, kit.stubs(server) as stub:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = "tiny"
        response = stub.predict.GetModelMetadata(request, timeout=30)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        assert response.metadata["signature_def"].Unpack(signature_map)
        assert dict(signature_map.signature_def) == expected
        assert set(expected) >= {"serving_default", "embed", "embed_decoded"}
        assert response.model_spec.version.value == 1
        for fields in ([], ["signature_def", "preprocessing_settings"]):
            bad = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
            assert _code(stub.predict.GetModelMetadata, bad, timeout=30)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_model_status_and_health(kit, model_root):
    with kit.running(model_root) as server, kit.stubs(server) as stub:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "tiny"
        (status,) = stub.model.GetModelStatus(request, timeout=30).model_version_status
        assert status.version == 1 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert status.status.error_code == 0
        request.model_spec.version.value = 7
        assert _code(stub.model.GetModelStatus, request, timeout=30)[0] == grpc.StatusCode.NOT_FOUND
        for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
            check = stub.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
    # after stop: nothing listens any more
    with kit.stubs(server) as stub:
        code, _ = _code(stub.health.Check, health_pb2.HealthCheckRequest(), timeout=5)
        assert code == grpc.StatusCode.UNAVAILABLE


def test_unknown_model_version_signature_and_label_answer_tf_servings_codes_and_messages(kit, model_root):
    images = kit.random_images(1)
    labelled = kit.predict_request(images)
    labelled.model_spec.version_label = "stable"
    labelled_other = kit.predict_request(images, name="other")
    labelled_other.model_spec.version_label = "stable"
    not_found, precondition, invalid = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                                        grpc.StatusCode.INVALID_ARGUMENT)
    cases = [(kit.predict_request(images, name="other"), not_found, "Servable not found for request: Latest(other)"),
             (kit.predict_request(images, name="other", version=1), not_found,
              "Servable not found for request: Specific(other, 1)"),
             (kit.predict_request(images, version=9), not_found, "Servable not found for request: Specific(tiny, 9)"),
             (kit.predict_request(images, signature="classify"), precondition,
              'Serving signature key "classify" not found.'),
             (labelled, invalid, "Unrecognized servable version label: stable"),
             (labelled_other, invalid, "Unrecognized servable version label: stable")]
    with kit.running(model_root) as server, kit.stubs(server) as stub:
        for request, expected_code, message in cases:
            assert _code(stub.predict.Predict, request, timeout=30) == (expected_code, message)
        metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        metadata.model_spec.name = "nope"
        assert _code(stub.predict.GetModelMetadata, metadata, timeout=30) == (
            not_found, "Servable not found for request: Latest(nope)")
        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = "nope"
        assert _code(stub.model.GetModelStatus, status, timeout=30) == (
            not_found, "Could not find any versions of model nope")
        status.model_spec.name = "tiny"
        status.model_spec.version.value = 7
        assert _code(stub.model.GetModelStatus, status, timeout=30) == (
            not_found, "Could not find version 7 of model tiny")
        status.model_spec.version_label = "canary"
        assert _code(stub.model.GetModelStatus, status, timeout=30) == (
            invalid, "Unrecognized servable version label: canary")
        # an empty name is this server's only model (documented), in Predict as in GetModelStatus
        assert stub.predict.Predict(kit.predict_request(images, name=""), timeout=30).model_spec.name == "tiny"


def _string_tensor(values, shape=None):
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=values)
    for size in (shape if shape is not None else [len(values)]):
        proto.tensor_shape.dim.add().size = size
    return proto


def _bad_requests(kit):
    good = kit.random_images(2, size=(40, 40))
    jpeg = good[0]
    floats = tf.make_tensor_proto(np.zeros(2, np.float32))
    return [
        ("wrong dtype", {"images": floats}, "must be DT_STRING; received DT_FLOAT"),
        ("wrong rank", {"images": _string_tensor([jpeg, jpeg], [1, 2])}, "must have shape [None]"),
        ("values vs shape", {"images": _string_tensor([jpeg], [3])}, "needs 3 string values"),
        ("empty batch", {"images": _string_tensor([])}, "empty batch"),
        ("empty image", {"images": _string_tensor([jpeg, b""])}, "images[1] is empty"),
        ("not an image", {"images": _string_tensor([b"%PDF-1.4 hello"])}, "images[0] is not a JPEG"),
        ("truncated header", {"images": _string_tensor([jpeg[:20]])}, "truncated JPEG"),
        ("truncated JPEG", {"images": _string_tensor([jpeg[: len(jpeg) // 2]])}, "JPEG"),
        ("huge declared size", {"images": _string_tensor(
            [b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + (50000).to_bytes(4, "big") * 2 + b"\0" * 20])}, "50000 x 50000"),
        ("missing input", {}, "missing ['images']"),
        ("extra input", {"images": _string_tensor([jpeg]), "junk": floats}, "unexpected ['junk']"),
        ("too many images", {"images": _string_tensor([jpeg] * 300)}, "max_request_batch_size"),
    ]


def test_bad_tensors_are_invalid_argument_with_a_reason_and_the_server_keeps_serving(kit, model_root):
    with kit.running(model_root) as server, kit.stubs(server) as stub:
        for name, inputs, fragment in _bad_requests(kit):
            request = kit.predict_request(signature="embed", inputs=inputs)
            code, details = _code(stub.predict.Predict, request, timeout=30)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, name
            assert fragment in details, (name, details)
        images = kit.random_images(2)
        assert kit.embeddings_of(stub.predict.Predict(kit.predict_request(images), timeout=30)).shape == (2, kit.DIM)


def test_version_pinning_serves_each_version_its_own_model(kit, tmp_path, tiny_exports):
    root = str(tmp_path / "tiny")
    for version, export in ((1, tiny_exports[0]), (2, tiny_exports[1])):
        kit.install_version(root, export, version)
    images = kit.random_images(2)
    references = {v: kit.reference_embeddings(tiny_exports[v - 1], images) for v in (1, 2)}
    assert not np.allclose(references[1], references[2])
    with kit.running(root, num_versions=2) as server, kit.stubs(server) as stub:
        for version in (1, 2):
            response = stub.predict.Predict(kit.predict_request(images, version=version), timeout=30)
            assert response.model_spec.version.value == version
            np.testing.assert_allclose(kit.embeddings_of(response), references[version], atol=1e-6)
        latest = stub.predict.Predict(kit.predict_request(images), timeout=30)
        assert latest.model_spec.version.value == 2
    with kit.running(root, versions=[1]) as server, kit.stubs(server) as stub:
        assert stub.predict.Predict(kit.predict_request(images), timeout=30).model_spec.version.value == 1
        assert _code(stub.predict.Predict, kit.predict_request(images, version=2), timeout=30)[0] == \
            grpc.StatusCode.NOT_FOUND


def _wait_for(condition, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_hot_reload_under_concurrent_load_fails_no_request(kit, tmp_path, tiny_exports):
    root = str(tmp_path / "tiny")
    assert push(tiny_exports[0], root, metrics={"recall@1": 0.5}).version == 1
    images = kit.random_images(2)
    references = {v: kit.reference_embeddings(tiny_exports[v - 1], images) for v in (1, 2)}
    with kit.running(root, poll_seconds=0.1) as server, kit.stubs(server) as stub:
        def call():
            response = stub.predict.Predict(kit.predict_request(images), timeout=60)
            version = response.model_spec.version.value
            np.testing.assert_allclose(kit.embeddings_of(response), references[version], atol=1e-6)
            return version

        with kit.Load(call, threads=4) as load:
            assert _wait_for(lambda: len(load.results) >= 20)
            assert push(tiny_exports[1], root, metrics={"recall@1": 0.6}).version == 2  # blessed
            assert not push(tiny_exports[2], root, metrics={"recall@1": 0.1})           # refused by the gate
            assert _wait_for(lambda: server.stats()["versions"] == [2])
            served = len(load.results)
            assert _wait_for(lambda: len(load.results) >= served + 20)
        assert load.errors == []
        assert load.results[0] == 1 and load.results[-1] == 2 and set(load.results) == {1, 2}
        assert server.models.status(kit.predict_request().model_spec)[0].state == \
            get_model_status_pb2.ModelVersionStatus.END  # version 1 unloaded
        assert sorted(os.listdir(root)) == ["1", "2"]


def test_unblessed_versions_and_failed_warmups_are_not_served(kit, model_root, tiny_exports):
    unblessed = kit.install_version(model_root, tiny_exports[1], 2)
    write_model_card(unblessed, build_model_card(unblessed, "tiny", metrics={"recall@1": 0.9}))  # no blessing
    images = kit.random_images(1)
    with kit.running(model_root, poll_seconds=0.1) as server, kit.stubs(server) as stub:
        assert server.stats()["versions"] == [1]
        broken = os.path.join(model_root, ".staging-3")
        shutil.copytree(tiny_exports[2], broken)
        log = prediction_log_pb2.PredictionLog()
        log.predict_log.request.CopyFrom(kit.predict_request([b"not an image"]))
        with tf.io.TFRecordWriter(os.path.join(broken, "assets.extra", "tf_serving_warmup_requests")) as writer:
            writer.write(log.SerializeToString())  # a warmup request that fails
        os.rename(broken, os.path.join(model_root, "3"))
        assert _wait_for(lambda: 3 in {s.version for s in server.models.status(kit.predict_request().model_spec)}
                         and server.models.status(kit.predict_request(version=3).model_spec)[0].error)
        (status,) = server.models.status(kit.predict_request(version=3).model_spec)
        assert status.state == get_model_status_pb2.ModelVersionStatus.END
        assert "warmup request 0 failed: images[0] is not a JPEG" in status.error, status.error
        response = stub.predict.Predict(kit.predict_request(images), timeout=30)
        assert response.model_spec.version.value == 1
        assert server.stats()["versions"] == [1]


def test_concurrent_requests_are_batched_and_split_back_to_their_callers(kit, model_root, tiny_exports):
    images = kit.random_images(16, seed=3)
    reference = kit.reference_embeddings(tiny_exports[0], images)
    batching = BatchingParameters(max_batch_size=8, batch_timeout_micros=100_000, num_batch_threads=1)
    with kit.running(model_root, batching=batching, warmup=False) as server, kit.stubs(server) as stub:
        def one(i):
            response = stub.predict.Predict(kit.predict_request([images[i]]), timeout=30)
            return kit.embeddings_of(response)[0]

        with futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(16)))
        np.testing.assert_allclose(np.stack(results), reference, atol=1e-6)
        stats = server.stats()["batching"]
        assert stats["tasks"] == 16 and stats["batches"] < 16 and stats["largest_batch"] <= 8


def test_a_full_queue_answers_resource_exhausted_and_deadlines_are_respected(kit, model_root):
    batching = BatchingParameters(max_batch_size=64, batch_timeout_micros=1_500_000, num_batch_threads=1,
                                  max_enqueued_batches=1)
    twenty = kit.random_images(20)
    with kit.running(model_root, batching=batching, warmup=False) as server, kit.stubs(server) as stub:
        late = _code(stub.predict.Predict, kit.predict_request(twenty[:1]), timeout=0.3)
        assert late[0] == grpc.StatusCode.DEADLINE_EXCEEDED
        with futures.ThreadPoolExecutor(5) as pool:
            calls = [pool.submit(stub.predict.Predict, kit.predict_request(twenty), timeout=30) for _ in range(5)]
            outcomes = [c.exception() for c in calls]
        codes = sorted(e.code().name if e else "OK" for e in outcomes)
        assert codes == ["OK", "OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
        assert server.stats()["batching"]["tasks"] == 3


def test_request_size_limit(kit, model_root):
    with kit.running(model_root, limits=Limits(max_request_bytes=64 * 1024)) as server, kit.stubs(server) as stub:
        code, _ = _code(stub.predict.Predict, kit.predict_request([b"\xff\xd8\xff" + b"\0" * 100_000]), timeout=30)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert kit.embeddings_of(stub.predict.Predict(kit.predict_request(kit.random_images(1)), timeout=30)).shape == \
            (1, kit.DIM)


def _external_address():
    """An address of this machine that is not loopback, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def _connects(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def test_listens_on_loopback_only_unless_told(kit, model_root):
    external = _external_address()
    with kit.running(model_root) as server:
        assert server.address.startswith("127.0.0.1:") and _connects("127.0.0.1", server.port)
        if external is None:
            pytest.skip("this machine has no non-loopback address to check against")
        assert not _connects(external, server.port)
    with kit.running(model_root, host="0.0.0.0") as server:
        assert _connects(external, server.port)


def test_a_port_in_use_and_a_model_dir_without_versions_are_refused(kit, model_root, tmp_path):
    with kit.running(model_root) as server:
        with pytest.raises(RuntimeError, match="Cannot listen"):
            with kit.running(model_root, port=server.port):
                pass
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no integer version directory"):
        with kit.running(str(tmp_path / "empty")):
            pass


def test_intra_op_parallelism_is_validated_and_refused_once_tensorflow_runs_otherwise(kit, model_root):
    from fgkeras.serving import Server

    for bad in (0, True, "2"):
        with pytest.raises(ValueError, match="intra_op_parallelism"):
            Server(model_root, intra_op_parallelism=bad)
    tf.constant(0.0) + 1.0  # TensorFlow runs in this process, with its default
    one_per_op = Server(model_root, intra_op_parallelism=1)  # not started: only the batching is resolved
    assert one_per_op.batching.num_batch_threads == (os.cpu_count() or 1)
    other = tf.config.threading.get_intra_op_parallelism_threads() + 3
    with pytest.raises(ValueError, match="before TensorFlow runs"):
        with kit.running(model_root, intra_op_parallelism=other):
            pass


def test_serves_a_real_fgkeras_export_with_its_warmup_and_model_card(kit, tmp_path):
    from fgkeras.export import export_and_push
    from fgkeras.models import build_embedder
    from fgkeras.serving import Client

    embedder = build_embedder(width=0.25, embedding_dim=16, image_size=32)
    root = str(tmp_path / "cars")
    result = export_and_push(embedder, root, 32, metrics={"recall@1": 0.3})
    assert result.pushed and json.load(open(os.path.join(result.path, "assets.extra", "model_card.json")))["blessing"]
    images = kit.random_images(3, size=(40, 30))
    with kit.running(root, index_dir=str(tmp_path / "gallery")) as server, Client(server.address) as client:
        servable = server.models.latest()
        assert servable.warmup_requests > 0  # assets.extra/tf_serving_warmup_requests was replayed
        reference = servable.loaded.signatures["embed"](images=tf.constant(images))["embeddings"].numpy()
        np.testing.assert_allclose(client.embed(images), reference, atol=1e-5)
        client.upsert(["a", "b", "c"], images)
        ids, scores = client.search(images[1:2], k=2)
        assert ids[0, 0] == "b" and scores[0, 0] == pytest.approx(1.0, abs=1e-4)
