"""1,100 malformed requests: each answered with an error status, the server healthy and its memory bounded."""

import random
from concurrent import futures

import grpc
import numpy as np
import tensorflow as tf
from grpc_health.v1 import health_pb2
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from fgkeras.serving import Client, Limits
from fgkeras.serving.protos import inventory_pb2

INVALID, NOT_FOUND, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)
MAX_REQUEST_BYTES = 256 * 1024


def _strings(values, shape=None):
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=values)
    for size in (shape if shape is not None else [len(values)]):
        proto.tensor_shape.dim.add().size = size
    return proto


def _predict(inputs, signature="embed", name="tiny", version=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(value)
    return request


class Malformed:
    """Seeded generators of malformed requests: `(kind, rpc name, request, expected codes)`."""

    def __init__(self, seed, images):
        self.rng = random.Random(seed)
        self.images = images  # valid JPEG and PNG bytes to damage

    def image(self):
        return self.rng.choice(self.images)

    def make(self):
        kind = self.rng.choice([k for k in dir(self) if k.startswith("bad_")])
        rpc, request, codes = getattr(self, kind)()
        return kind, rpc, request, codes

    def bad_dtype(self):
        dtype = self.rng.choice([np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_, np.float16])
        value = np.zeros([self.rng.randint(1, 4)], dtype)
        return "Predict", _predict({"images": tf.make_tensor_proto(value)}), {INVALID}

    def bad_rank(self):
        shape = self.rng.choice([[], [1, 1], [2, 1, 1], [1, 2]])
        count = int(np.prod(shape)) if shape else 1
        return "Predict", _predict({"images": _strings([self.image()] * count, shape)}), {INVALID}

    def bad_value_count(self):
        n = self.rng.randint(2, 6)
        return "Predict", _predict({"images": _strings([self.image()] * (n - 1), [n])}), {INVALID}

    def bad_negative_or_huge_shape(self):
        shape = self.rng.choice([[-1], [-5], [10 ** 12], [2 ** 40]])
        return "Predict", _predict({"images": _strings([self.image()], shape)}), {INVALID}

    def bad_empty(self):
        choice = self.rng.randrange(3)
        inputs = [{"images": _strings([])}, {"images": _strings([b""])}, {}][choice]
        return "Predict", _predict(inputs), {INVALID}

    def bad_not_an_image(self):
        data = bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(1, 3000)))
        if data[:1] in (b"\xff", b"\x89", b"G", b"B", b"R"):
            data = b"x" + data
        return "Predict", _predict({"images": _strings([self.image(), data])}), {INVALID}

    def bad_truncated(self):
        image = self.image()
        cut = image[: self.rng.randint(1, len(image) - 2)]
        return "Predict", _predict({"images": _strings([cut])}), {INVALID}

    def bad_declared_dimensions(self):
        side = self.rng.randint(5000, 100000)
        png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + side.to_bytes(4, "big") + (7).to_bytes(4, "big") + b"\0" * 30
        return "Predict", _predict({"images": _strings([png])}), {INVALID}

    def bad_unknown_signature_model_or_version(self):
        choice = self.rng.randrange(3)
        inputs = {"images": _strings([self.image()])}
        request = [_predict(inputs, signature=f"sig{self.rng.randint(0, 99)}"),
                   _predict(inputs, name=f"model{self.rng.randint(0, 99)}"),
                   _predict(inputs, version=self.rng.randint(2, 99))][choice]
        return "Predict", request, {NOT_FOUND}

    def bad_input_names(self):
        inputs = {f"input{self.rng.randint(0, 9)}": _strings([self.image()])}
        if self.rng.random() < 0.5:
            inputs["images"] = _strings([self.image()])
        return "Predict", _predict(inputs), {INVALID}

    def bad_decoded_images(self):
        shape = self.rng.choice([[1, 7, 8, 3], [1, 8, 8], [2, 8, 8, 4]])
        dtype = self.rng.choice([np.uint8, np.float32])
        if dtype == np.float32:
            shape = [1, 8, 8, 3]
        return "Predict", _predict({"images": tf.make_tensor_proto(np.zeros(shape, dtype))}, "embed_decoded"), {INVALID}

    def bad_search_k(self):
        k = self.rng.choice([tf.make_tensor_proto(0, tf.int32), tf.make_tensor_proto(-3, tf.int32),
                             tf.make_tensor_proto(10 ** 6, tf.int32), tf.make_tensor_proto(2.5, tf.float32),
                             tf.make_tensor_proto([1, 2], tf.int32)])
        return "Predict", _predict({"images": _strings([self.image()]), "k": k}, "search"), {INVALID}

    def bad_too_large(self):
        if self.rng.random() < 0.9:  # cheap to make; the oversized messages below are rarer
            return "Predict", _predict({"images": _strings([b"x"] * 300)}), {INVALID}
        return "Predict", _predict({"images": _strings([b"\xff\xd8\xff" + b"\0" * MAX_REQUEST_BYTES])}), {EXHAUSTED}

    def bad_metadata(self):
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(
            metadata_field=self.rng.choice([[], ["x"], ["signature_def", "y"]]))
        return "GetModelMetadata", request, {INVALID}

    def bad_upsert(self):
        choice = self.rng.randrange(5)
        request = [
            inventory_pb2.UpsertRequest(ids=["a", "b"], images=[self.image()]),
            inventory_pb2.UpsertRequest(ids=["a"]),
            inventory_pb2.UpsertRequest(ids=["a", "a"], images=[self.image()] * 2),
            inventory_pb2.UpsertRequest(ids=[""], images=[self.image()]),
            inventory_pb2.UpsertRequest(ids=["a"], images=[self.image()[:30]]),
        ][choice]
        return "Upsert", request, {INVALID}

    def bad_upsert_embeddings(self):
        dim = self.rng.choice([0, 3, 9])
        request = inventory_pb2.UpsertRequest(ids=["a"])
        request.embeddings.dim = dim
        request.embeddings.values.extend([0.1] * max(dim, 1))
        return "Upsert", request, {INVALID}

    def bad_delete(self):
        return "Delete", inventory_pb2.DeleteRequest(ids=[f"missing{self.rng.randint(0, 9)}"]), {NOT_FOUND}


def test_fuzz_malformed_requests(kit, model_root, tmp_path):
    images = [kit.encode(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8), kind)
              for i, kind in enumerate(["jpeg", "png", "jpeg", "png"])]
    limits = Limits(max_request_bytes=MAX_REQUEST_BYTES)
    with kit.running(model_root, index_dir=str(tmp_path / "gallery"), limits=limits) as server, \
            Client(server.address) as client:
        client.upsert(["seed"], images[:1])
        calls = {"Predict": client.prediction_stub.Predict, "GetModelMetadata": client.prediction_stub.GetModelMetadata,
                 "Upsert": client.inventory_stub.Upsert, "Delete": client.inventory_stub.Delete}
        generator = Malformed(0, images)

        def send(_):
            kind, rpc, request, codes = generator.make()
            try:
                calls[rpc](request, timeout=30)
            except grpc.RpcError as error:
                return kind, error.code(), codes, error.details()
            return kind, grpc.StatusCode.OK, codes, ""

        def run(count):
            with futures.ThreadPoolExecutor(8) as pool:
                return list(pool.map(send, range(count)))

        warm = run(200)  # allocations settle (thread pools, caches) before memory is measured
        before = kit.rss_bytes()
        answers = warm + run(1000)
        growth = kit.rss_bytes() - before

        wrong = [(kind, code, details) for kind, code, codes, details in answers if code not in codes]
        assert wrong == [], wrong[:10]
        assert len(answers) == 1200 and len({kind for kind, *_ in answers}) >= 15
        assert growth < 64 * 1024 * 1024, f"RSS grew by {growth / 2 ** 20:.0f} MiB over 1,000 malformed requests"
        assert client.health() == "SERVING"
        assert client.embed(images).shape == (4, kit.DIM)
        assert client.count() == 1
        check = client.health_stub.Check(health_pb2.HealthCheckRequest(service="fgkeras.serving.InventoryService"))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
