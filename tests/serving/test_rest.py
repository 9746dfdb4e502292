"""TF Serving's REST API through plain HTTP clients (`http.client`, raw sockets) on 127.0.0.1:
predict in row and columnar format against gRPC's answers, versions and labels, status and
metadata JSON, every error class's HTTP code, keep-alive, slow clients, limits, and a fuzz of 2,000
malformed requests (`benchmarks/rest_fuzz.py` runs the same generator on 10,000)."""

import base64
import http.client
import importlib.util
import json
import os
import re
import socket
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

from fgkeras.serving import Limits, Server
from fgkeras.serving.rest import HTTP_STATUS


@pytest.fixture(scope="module")
def fuzz():
    """`benchmarks/rest_fuzz.py`, whose generator and raw-socket client the benchmark uses too."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "rest_fuzz.py")
    spec = importlib.util.spec_from_file_location("rest_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def b64(data):
    return {"b64": base64.b64encode(data).decode("ascii")}


def call(server, method, path, document=None, body=None, headers=None, connection=None):
    """`(status, headers, JSON answer)` of one request (on `connection` when given: keep-alive)."""
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    try:
        if document is not None:
            body = json.dumps(document).encode()
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), json.loads(data) if data else None
    finally:
        if own:
            connection.close()


def predict(server, document, path="/v1/models/tiny:predict"):
    status, _, answer = call(server, "POST", path, document)
    assert status == 200, answer
    return answer


def grpc_embeddings(kit, server, images, signature="embed", version=None):
    with kit.stubs(server) as stub:
        response = stub.predict.Predict(kit.predict_request(images, signature=signature, version=version), timeout=30)
    return kit.embeddings_of(response)


def test_predict_row_and_columnar_equal_grpc_predict(kit, model_root):
    images = kit.random_images(3)
    encoded = [b64(image) for image in images]
    with kit.running(model_root, rest_api_port=0) as server:
        expected = grpc_embeddings(kit, server, images)
        assert expected.shape == (3, kit.DIM)
        answers = {
            "row": predict(server, {"signature_name": "embed", "instances": encoded})["predictions"],
            "row, named": predict(server, {"signature_name": "embed",
                                           "instances": [{"images": e} for e in encoded]})["predictions"],
            "row, serving_default": predict(server, {"instances": encoded})["predictions"],
            "columnar": predict(server, {"signature_name": "embed", "inputs": encoded})["outputs"],
            "columnar, named": predict(server, {"signature_name": "embed", "inputs": {"images": encoded}})["outputs"],
        }
        for name, answer in answers.items():
            np.testing.assert_allclose(np.asarray(answer, dtype=np.float32), expected, atol=1e-6, err_msg=name)

        decoded = np.random.default_rng(0).integers(0, 256, (2, kit.SIDE, kit.SIDE, 3), dtype=np.uint8)
        expected = grpc_embeddings(kit, server, decoded, signature="embed_decoded")
        row = predict(server, {"signature_name": "embed_decoded", "instances": decoded.tolist()})["predictions"]
        columnar = predict(server, {"signature_name": "embed_decoded", "inputs": {"images": decoded.tolist()}})
        np.testing.assert_allclose(row, expected, atol=1e-6)
        np.testing.assert_allclose(columnar["outputs"], expected, atol=1e-6)


def test_floats_are_written_at_their_shortest_exact_text(kit, model_root):
    images = kit.random_images(2)
    with kit.running(model_root, rest_api_port=0) as server:
        expected = grpc_embeddings(kit, server, images)
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
        connection.request("POST", "/v1/models/tiny:predict", json.dumps({"instances": [b64(i) for i in images]}))
        text = connection.getresponse().read().decode()
        connection.close()
    got = np.asarray(json.loads(text)["predictions"], dtype=np.float64)
    assert np.array_equal(got.astype(np.float32), expected)  # the exact float32 values
    digits = [len(number.lstrip("-").replace(".", "").split("e")[0].lstrip("0"))
              for number in re.findall(r"-?[0-9][0-9.e+-]*", text)]
    assert len(digits) == expected.size and max(digits) <= 9  # float32's shortest text, not float64's 17 digits


def test_several_outputs_and_string_outputs(kit, tmp_path, tiny_exports):
    gallery = np.eye(3, kit.DIM, dtype=np.float32)
    ids = [b"a", "\u00e9t\u00e9".encode(), b"\xff\xfe"]  # text, UTF-8 text, bytes that are no text
    export = kit.save_tiny(tmp_path / "with_search", seed=0, gallery=(gallery, ids))
    root = str(tmp_path / "tiny")
    kit.install_version(root, export, 1)
    images = kit.random_images(2)
    with kit.running(root, rest_api_port=0) as server:
        with kit.stubs(server) as stub:
            response = stub.predict.Predict(kit.predict_request(images, signature="search"), timeout=30)
        expected_ids = tf.make_ndarray(response.outputs["ids"])
        expected_scores = tf.make_ndarray(response.outputs["scores"])
        as_json = [[{b"a": "a", b"\xc3\xa9t\xc3\xa9": "\u00e9t\u00e9", b"\xff\xfe": {"b64": "//4="}}[v] for v in r]
                   for r in expected_ids]
        assert sorted(as_json[0], key=str) == sorted(["a", "\u00e9t\u00e9", {"b64": "//4="}], key=str)
        row = predict(server, {"signature_name": "search", "instances": [b64(i) for i in images]})["predictions"]
        assert [sorted(p) for p in row] == [["ids", "scores"]] * 2
        assert [p["ids"] for p in row] == as_json
        np.testing.assert_allclose([p["scores"] for p in row], expected_scores, atol=1e-6)
        columnar = predict(server, {"signature_name": "search", "inputs": {"images": [b64(i) for i in images]}})
        assert columnar["outputs"]["ids"] == as_json
        np.testing.assert_allclose(columnar["outputs"]["scores"], expected_scores, atol=1e-6)


def test_versions_and_labels_paths(kit, model_root, tiny_exports):
    kit.install_version(model_root, tiny_exports[1], 2)
    images = kit.random_images(2)
    instances = {"signature_name": "embed", "instances": [b64(i) for i in images]}
    with kit.running(model_root, rest_api_port=0, num_versions=2) as server:
        for version, export in ((1, tiny_exports[0]), (2, tiny_exports[1])):
            answer = predict(server, instances, f"/v1/models/tiny/versions/{version}:predict")
            np.testing.assert_allclose(answer["predictions"], kit.reference_embeddings(export, images), atol=1e-6)
            np.testing.assert_allclose(answer["predictions"], grpc_embeddings(kit, server, images, version=version),
                                       atol=1e-6)
        latest = predict(server, instances)["predictions"]
        np.testing.assert_allclose(latest, kit.reference_embeddings(tiny_exports[1], images), atol=1e-6)
        with kit.stubs(server) as stub:
            for path, name, version, label in (("/v1/models/tiny/versions/7:predict", "tiny", 7, None),
                                               ("/v1/models/tiny/labels/stable:predict", "tiny", None, "stable"),
                                               ("/v1/models/other:predict", "other", None, None),
                                               ("/v1/models/other/versions/1:predict", "other", 1, None)):
                request = kit.predict_request(images, name=name, version=version)
                if label:
                    request.model_spec.version_label = label
                with pytest.raises(grpc.RpcError) as error:
                    stub.predict.Predict(request, timeout=30)
                status, headers, answer = call(server, "POST", path, instances)
                assert status == HTTP_STATUS[error.value.code()] and status in (400, 404), (path, answer)
                assert headers["Content-Type"] == "application/json"
                assert answer["error"] == error.value.details()  # the same message as over gRPC
        status, _, answer = call(server, "GET", "/v1/models/tiny/versions/2")
        assert status == 200 and [s["version"] for s in answer["model_version_status"]] == ["2"]
        status, _, answer = call(server, "GET", "/v1/models/tiny/versions/1/metadata")
        assert status == 200 and answer["model_spec"]["version"] == "1"
        status, _, answer = call(server, "GET", "/v1/models/tiny/labels/stable/metadata")
        assert status in (400, 404) and "label" in answer["error"]


def test_status_and_metadata_json_are_the_grpc_answers(kit, model_root):
    with kit.running(model_root, rest_api_port=0) as server, kit.stubs(server) as stub:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "tiny"
        grpc_status = stub.model.GetModelStatus(request, timeout=30)
        status, headers, answer = call(server, "GET", "/v1/models/tiny")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert answer == {"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
        assert json_format.ParseDict(answer, get_model_status_pb2.GetModelStatusResponse()) == grpc_status

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = "tiny"
        grpc_metadata = stub.predict.GetModelMetadata(request, timeout=30)
        signature_defs = get_model_metadata_pb2.SignatureDefMap()
        grpc_metadata.metadata["signature_def"].Unpack(signature_defs)
        status, _, answer = call(server, "GET", "/v1/models/tiny/metadata")
        assert status == 200
        assert answer["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
        assert set(answer["metadata"]) == {"signature_def"}
        parsed = json_format.ParseDict(answer["metadata"]["signature_def"], get_model_metadata_pb2.SignatureDefMap())
        assert parsed == signature_defs
        embed = answer["metadata"]["signature_def"]["signature_def"]["embed"]
        assert embed["inputs"]["images"]["dtype"] == "DT_STRING"
        assert embed["inputs"]["images"]["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
        assert embed["method_name"] == "tensorflow/serving/predict"
        # a query string is ignored, the path is case-insensitive, as in TF Serving
        assert call(server, "GET", "/V1/Models/tiny?x=1")[2] == {"model_version_status": answer_status(server)}


def answer_status(server):
    return call(server, "GET", "/v1/models/tiny")[2]["model_version_status"]


def test_every_error_class_gets_its_http_code_and_a_json_error(kit, model_root):
    image = kit.random_images(1)[0]
    good = {"signature_name": "embed", "instances": [b64(image)]}
    limits = Limits(max_request_bytes=64 * 1024, max_request_batch_size=4)
    cases = [  # (what, method, path, body, headers, HTTP code, a word of the message)
        ("bad JSON", "POST", "/v1/models/tiny:predict", b"{not json", {}, 400, "JSON Parse error"),
        ("not an object", "POST", "/v1/models/tiny:predict", b"[1, 2]", {}, 400, "Is not object"),
        ("empty body", "POST", "/v1/models/tiny:predict", b"", {}, 400, "empty"),
        ("deep nesting", "POST", "/v1/models/tiny:predict", b"[" * 60000, {}, 400, "JSON Parse error"),
        ("no instances", "POST", "/v1/models/tiny:predict", b'{"signature_name": "embed"}', {}, 400,
         "'inputs' or 'instances'"),
        ("both formats", "POST", "/v1/models/tiny:predict", json.dumps({**good, "inputs": [b64(image)]}).encode(),
         {}, 400, "only one of"),
        ("signature_name", "POST", "/v1/models/tiny:predict", b'{"signature_name": 3, "instances": ["x"]}', {},
         400, "signature_name"),
        ("wrong dtype", "POST", "/v1/models/tiny:predict", b'{"instances": [1.5]}', {}, 400, "DT_STRING"),
        ("out of range", "POST", "/v1/models/tiny:predict",
         json.dumps({"signature_name": "embed_decoded",
                     "instances": [[[[300, 0, 0]] * kit.SIDE] * kit.SIDE]}).encode(), {}, 400, "range of DT_UINT8"),
        ("ragged", "POST", "/v1/models/tiny:predict", b'{"inputs": [["a"], ["b", "c"]]}', {}, 400, "dense"),
        ("bad base64", "POST", "/v1/models/tiny:predict", b'{"instances": [{"b64": "%%%"}]}', {}, 400, "base64"),
        ("not an image", "POST", "/v1/models/tiny:predict",
         json.dumps({"instances": [b64(b"hello, world")]}).encode(), {}, 400, "images[0]"),
        ("wrong shape", "POST", "/v1/models/tiny:predict",
         json.dumps({"signature_name": "embed_decoded", "instances": [[[[0, 0, 0]] * 7] * kit.SIDE]}).encode(), {},
         400, "shape"),
        ("batch too large", "POST", "/v1/models/tiny:predict", json.dumps({"instances": ["x"] * 5}).encode(), {},
         400, "max_request_batch_size"),
        ("unknown signature", "POST", "/v1/models/tiny:predict", json.dumps({**good, "signature_name": "x"}).encode(),
         {}, {400, 404}, "signature"),  # as gRPC answers it: TF Serving's INVALID_ARGUMENT, or NOT_FOUND
        ("unknown model", "POST", "/v1/models/nope:predict", json.dumps(good).encode(), {}, 404, "nope"),
        ("unknown version", "GET", "/v1/models/tiny/versions/9", None, {}, 404, "version 9"),
        ("version overflow", "GET", "/v1/models/tiny/versions/99999999999999999999", None, {}, 400, "version"),
        ("no model name", "GET", "/v1/models", None, {}, 400, "Missing model name"),
        ("unknown path", "GET", "/v2/health", None, {}, 404, "Unknown REST path"),
        ("wrong method", "GET", "/v1/models/tiny:predict", None, {}, 405, "use POST"),
        ("wrong method", "DELETE", "/v1/models/tiny", None, {}, 405, "use GET"),
        ("classify", "POST", "/v1/models/tiny:classify", b'{"examples": []}', {}, 501, "predict"),
        ("too large", "POST", "/v1/models/tiny:predict", b"x" * (64 * 1024 + 1), {}, 413, "max_request_bytes"),
    ]
    with kit.running(model_root, rest_api_port=0, limits=limits) as server:
        for what, method, path, body, headers, code, word in cases:
            status, answer_headers, answer = call(server, method, path, body=body, headers=headers)
            assert status in (code if isinstance(code, set) else {code}), (what, status, answer)
            assert answer_headers["Content-Type"] == "application/json", what
            assert isinstance(answer["error"], str) and word in answer["error"], (what, answer)
            if code == 405:
                assert answer_headers["Allow"] in ("GET", "POST")
        assert np.asarray(predict(server, good)["predictions"]).shape == (1, kit.DIM)


def test_http_level_errors_are_answered_before_the_body(kit, model_root, fuzz):
    limits = Limits(max_request_bytes=64 * 1024)
    with kit.running(model_root, rest_api_port=0, limits=limits) as server:
        port = server.rest_port
        # a huge declared body is refused from its Content-Length, without reading (or waiting for) it
        started = time.monotonic()
        status, headers, body = fuzz.send_raw(port, fuzz.http_request(
            "POST", "/v1/models/tiny:predict", headers={"Content-Length": 10 ** 12}, content_length=False))
        assert status == 413 and "max_request_bytes" in json.loads(body)["error"]
        assert headers["connection"] == "close"
        # Expect: 100-continue gets the 413 instead of the 100
        status, _, body = fuzz.send_raw(port, fuzz.http_request(
            "POST", "/v1/models/tiny:predict", headers={"Content-Length": 10 ** 6, "Expect": "100-continue"},
            content_length=False))
        assert status == 413
        assert time.monotonic() - started < 20  # not the server's body timeout (60 s)
        status, _, body = fuzz.send_raw(port, fuzz.http_request("POST", "/v1/models/tiny:predict", b"{}",
                                                                content_length=False))
        assert status == 411 and json.loads(body)["error"]
        for line in (b"NONSENSE\r\n\r\n", b"GET / HTTP/1.1 x\r\n\r\n"):
            status, headers, body = fuzz.send_raw(port, line)
            assert status == 400 and headers["content-type"] == "application/json", body
        status, _, body = fuzz.send_raw(port, fuzz.http_request("BREW", "/v1/models/tiny"))
        assert status == 501 and json.loads(body)["error"]


def test_chunked_body_and_keep_alive(kit, model_root):
    images = kit.random_images(2)
    document = json.dumps({"signature_name": "embed", "instances": [b64(i) for i in images]}).encode()
    with kit.running(model_root, rest_api_port=0) as server:
        expected = grpc_embeddings(kit, server, images)
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
        try:
            connection.request("POST", "/v1/models/tiny:predict", body=iter([document[:100], document[100:]]),
                               encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
            response = connection.getresponse()
            np.testing.assert_allclose(json.loads(response.read())["predictions"], expected, atol=1e-6)
            first_socket = connection.sock
            # the same connection serves the next requests, errors included
            for _ in range(3):
                assert call(server, "POST", "/v1/models/tiny:predict", body=document, connection=connection)[0] == 200
                assert call(server, "GET", "/v1/models/nope", connection=connection)[0] == 404
                assert call(server, "POST", "/v1/models/tiny:predict", body=b"{", connection=connection)[0] == 400
            assert connection.sock is first_socket
        finally:
            connection.close()


def test_slow_and_silent_clients_are_cut_off_and_others_served(kit, model_root):
    images = kit.random_images(1)
    with kit.running(model_root, rest_api_port=0) as server:
        server._rest.idle_seconds, server._rest.body_seconds = 0.5, 1.0
        port = server.rest_port
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        partial_headers = socket.create_connection(("127.0.0.1", port), timeout=10)
        partial_headers.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\n")
        partial_body = socket.create_connection(("127.0.0.1", port), timeout=10)
        partial_body.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{\"inst")
        try:
            # meanwhile another client is served
            answer = predict(server, {"signature_name": "embed", "instances": [b64(images[0])]})
            assert np.asarray(answer["predictions"]).shape == (1, kit.DIM)
            assert _read_until_closed(silent) == b""
            assert _read_until_closed(partial_headers) == b""
            answer = _read_until_closed(partial_body)
            assert answer.startswith(b"HTTP/1.1 408") and b'"error"' in answer, answer
        finally:
            for connection in (silent, partial_headers, partial_body):
                connection.close()
        assert call(server, "GET", "/v1/models/tiny")[0] == 200


def _read_until_closed(connection):
    chunks = []
    while True:
        chunk = connection.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_connections_beyond_the_limit_get_429(kit, model_root):
    limits = Limits(max_concurrent_rpcs=2)
    with kit.running(model_root, rest_api_port=0, limits=limits) as server:
        held = [http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30) for _ in range(2)]
        try:
            for connection in held:  # each answered, so each is accepted and counted
                assert call(server, "GET", "/v1/models/tiny", connection=connection)[0] == 200
            status, _, answer = call(server, "GET", "/v1/models/tiny")
            assert status == 429 and "max_concurrent_rpcs" in answer["error"]
        finally:
            for connection in held:
                connection.close()
        deadline = time.monotonic() + 10
        while call(server, "GET", "/v1/models/tiny")[0] != 200:  # the closed ones are released
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_rest_is_off_by_default_and_stops_with_the_server(kit, model_root):
    with kit.running(model_root) as server:
        assert server.rest_port is None and server._rest is None
    with pytest.raises(ValueError, match="rest_api_port"):
        Server(model_root, rest_api_port=70000)
    with kit.running(model_root, rest_api_port=0) as server:
        port = server.rest_port
        assert port and port != server.port
        assert call(server, "GET", "/v1/models/tiny")[0] == 200
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_stopping_answers_503_then_closes_open_connections(kit, model_root):
    with kit.running(model_root, rest_api_port=0) as server:
        kept, idle = (http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30) for _ in range(2))
        try:
            for connection in (kept, idle):
                assert call(server, "GET", "/v1/models/tiny", connection=connection)[0] == 200
            time.sleep(0.5)  # both handlers back to waiting for a next request (else they close on their own)
            server._rest.begin_stop()  # what `Server.stop` does first
            status, headers, answer = call(server, "GET", "/v1/models/tiny", connection=kept)
            assert status == 503 and "shutting down" in answer["error"] and headers["Connection"] == "close"
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", server.rest_port), timeout=5).close()
            server.stop(grace=2)
            idle.sock.settimeout(5)  # well before the server's own idle timeout (30 s)
            assert _read_until_closed(idle.sock) == b""  # the idle keep-alive connection is closed, not left open
        finally:
            kept.close()
            idle.close()


def test_cli_has_the_rest_api_port_flag():
    from fgkeras.cli import build_parser

    args = build_parser().parse_args(["serve", "--model-dir", "m", "--rest-api-port", "8501"])
    assert args.rest_api_port == 8501
    assert build_parser().parse_args(["serve", "--model-dir", "m"]).rest_api_port is None


def test_status_codes_follow_tf_serving():
    assert HTTP_STATUS[grpc.StatusCode.INVALID_ARGUMENT] == 400
    assert HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404
    assert HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED] == 429
    assert HTTP_STATUS[grpc.StatusCode.FAILED_PRECONDITION] == 400
    assert HTTP_STATUS[grpc.StatusCode.DEADLINE_EXCEEDED] == 504
    assert HTTP_STATUS[grpc.StatusCode.UNAVAILABLE] == 503
    assert set(HTTP_STATUS) == set(grpc.StatusCode)


def test_fuzz_malformed_requests(kit, model_root, fuzz):
    images = [kit.encode(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8), kind)
              for i, kind in enumerate(["jpeg", "png", "jpeg", "png"])]
    limits = Limits(max_request_bytes=fuzz.MAX_REQUEST_BYTES, max_request_batch_size=fuzz.MAX_BATCH)
    with kit.running(model_root, rest_api_port=0, limits=limits) as server:
        warm = fuzz.run_fuzz(server.rest_port, 300, images, seed=2, threads=8, side=kit.SIDE)
        before = kit.rss_bytes()
        answers = warm + fuzz.run_fuzz(server.rest_port, 2000, images, seed=1, threads=8, side=kit.SIDE)
        growth = kit.rss_bytes() - before
        problems = [problem for _, _, problem in answers if problem]
        assert problems == [], problems[:10]
        assert len(answers) == 2300 and len({category for category, _, _ in answers}) >= 15
        assert growth < 64 * 1024 * 1024, f"RSS grew by {growth / 2 ** 20:.0f} MiB over 2,000 malformed requests"
        assert {status for _, status, _ in answers} >= {400, 404, 405, 411, 413, 414, 431, 501}
        status, answer = fuzz.good_request(server.rest_port, images)
        assert status == 200 and np.asarray(answer["predictions"]).shape == (4, kit.DIM)
        assert call(server, "GET", "/v1/models/tiny")[0] == 200
        assert grpc_embeddings(kit, server, images).shape == (4, kit.DIM)  # gRPC unharmed too
