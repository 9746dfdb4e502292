"""Malformed requests against a running server: each one answered with the right status, the
server's memory bounded, and well-formed requests interleaved with them all answered.

`Malformed` makes the requests (seeded), one category per `bad_*` method: wrong dtypes, ranks,
shapes and value counts, declared batches and tensors far over the limits, truncated, corrupted
and hostile images of every format (huge declared dimensions, GIF frames larger than their
screen, thousands of frames, animated WebP, requests over the pixel budget), unknown models,
versions, labels and signatures, bad metadata and status requests, bad upserts and deletes.
`fuzz()` sends them from several threads, one well-formed Predict every `every` requests, and
samples the process's RSS meanwhile. The default test sends a few thousand;
`benchmarks/fuzz.py` sends 10,000+ through the same code and reports the counts.
"""

import collections
import dataclasses
import io
import random
import struct
import threading
from concurrent import futures

import grpc
import numpy as np
import tensorflow as tf
from grpc_health.v1 import health_pb2
from PIL import Image
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from fgkeras.serving import Client, Limits
from fgkeras.serving.protos import inventory_pb2

OK = grpc.StatusCode.OK
INVALID, NOT_FOUND, EXHAUSTED, PRECONDITION = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                               grpc.StatusCode.RESOURCE_EXHAUSTED,
                                               grpc.StatusCode.FAILED_PRECONDITION)
# The fuzzed server's limits: small enough that the hostile requests below cross them cheaply.
LIMITS = dict(max_request_bytes=256 * 1024, max_pixels_per_request=200_000, max_animation_frames=50)
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WebP")


def encode(pixels, kind):
    """`pixels` (uint8 H x W x 3) encoded as `kind` (one of FORMATS)."""
    if kind == "JPEG":
        return tf.io.encode_jpeg(pixels).numpy()
    if kind == "PNG":
        return tf.io.encode_png(pixels).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, kind.upper(), **({"lossless": True} if kind == "WebP" else {}))
    return buffer.getvalue()


def sample_images(count=10, seed=0):
    """`{format: [encoded images]}`: small valid images of every format (20-31 x 24-35 pixels)."""
    rng = np.random.default_rng(seed)
    return {kind: [encode(rng.integers(0, 256, (20 + i, 24 + i, 3), dtype=np.uint8), kind) for i in range(count // 5)]
            for kind in FORMATS}


def _strings(values, shape=None):
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=values)
    for size in (shape if shape is not None else [len(values)]):
        proto.tensor_shape.dim.add().size = size
    return proto


def _typed(dtype, shape, **fields):
    proto = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for size in shape:
        proto.tensor_shape.dim.add().size = size
    return proto


def _predict(inputs, signature="embed", name="tiny", version=None, label=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(value)
    return request


def _gif_frame(data):
    """`(start, end)` of the first frame (image descriptor to the end of its data) of a GIF."""
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while data[position] == 0x21:  # extensions before the frame
        position += 2
        while data[position]:
            position += 1 + data[position]
        position += 1
    start, flags = position, data[position + 9]
    position += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
    while data[position]:
        position += 1 + data[position]
    return start, position + 1


class Malformed:
    """Seeded generators of malformed requests: `make()` gives `(kind, rpc name, request, expected
    codes, fragment)`; `fragment`, when not None, must be in the error's details (the request was
    refused for the right reason: before any decoder ran, for the hostile images)."""

    def __init__(self, seed, images):
        self.rng = random.Random(seed)
        self.images = images  # {format: [valid encoded images]}
        self.tiny_gif = encode(np.zeros((2, 2, 3), np.uint8), "GIF")  # ~40 bytes a frame
        self.kinds = sorted(k for k in dir(self) if k.startswith("bad_"))

    def image(self, kind=None):
        return self.rng.choice(self.images[kind or self.rng.choice(FORMATS)])

    def make(self):
        kind = self.rng.choice(self.kinds)
        rpc, request, codes, *fragment = getattr(self, kind)()
        return kind, rpc, request, codes, (fragment or [None])[0]

    # --- tensors ----------------------------------------------------------------------------

    def bad_dtype(self):
        if self.rng.random() < 0.3:  # strings where the decoded signature takes uint8
            return "Predict", _predict({"images": _strings([self.image()], [1, 8, 8, 3])}, "embed_decoded"), {INVALID}
        dtype = self.rng.choice([np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_, np.float16,
                                 np.complex64])
        value = np.zeros([self.rng.randint(1, 4)], dtype)
        return "Predict", _predict({"images": tf.make_tensor_proto(value)}), {INVALID}

    def bad_unreadable_dtype(self):
        dtype = self.rng.choice([types_pb2.DT_RESOURCE, types_pb2.DT_VARIANT, types_pb2.DT_QINT8, 999])
        return "Predict", _predict({"images": _typed(dtype, [1])}), {INVALID}

    def bad_rank(self):
        shape = self.rng.choice([[], [1, 1], [2, 1, 1], [1, 2]])
        count = int(np.prod(shape)) if shape else 1
        return "Predict", _predict({"images": _strings([self.image()] * count, shape)}), {INVALID}

    def bad_value_count(self):
        n = self.rng.randint(2, 6)
        values = [self.image()] * (n + self.rng.choice([-1, 1]))
        return "Predict", _predict({"images": _strings(values, [n])}), {INVALID}

    def bad_negative_or_huge_shape(self):
        shape = self.rng.choice([[-1], [-5], [10 ** 12], [2 ** 40], [2 ** 62], [2 ** 63 - 1]])
        return "Predict", _predict({"images": _strings([self.image()], shape)}), {INVALID}

    def bad_unknown_rank(self):
        proto = _strings([self.image()])
        proto.tensor_shape.unknown_rank = True
        return "Predict", _predict({"images": proto}), {INVALID}

    def bad_declared_batch(self):
        # a batch far over the limit declared, few or no values sent: refused from the shape alone
        rows = self.rng.choice([257, 300, 10 ** 6, 2 ** 31])
        return "Predict", _predict({"images": _strings([self.image()] * self.rng.randint(0, 2), [rows])}), {INVALID}, \
            "max_request_batch_size"

    def bad_declared_tensor(self):
        # embed_decoded: rows of uint8 declared with a wrong or missing tensor_content
        rows = self.rng.choice([1, 2, 200, 256])
        content = b"\0" * self.rng.choice([0, 1, rows * 192 - 1, rows * 192 + 3])
        proto = _typed(types_pb2.DT_UINT8, [rows, 8, 8, 3], tensor_content=content)
        return "Predict", _predict({"images": proto}, "embed_decoded"), {INVALID}

    def bad_empty(self):
        choice = self.rng.randrange(3)
        inputs = [{"images": _strings([])}, {"images": _strings([b""])}, {}][choice]
        return "Predict", _predict(inputs), {INVALID}

    def bad_input_names(self):
        inputs = {f"input{self.rng.randint(0, 9)}": _strings([self.image()])}
        if self.rng.random() < 0.5:
            inputs["images"] = _strings([self.image()])
        return "Predict", _predict(inputs), {INVALID}

    def bad_decoded_images(self):
        shape = self.rng.choice([[1, 7, 8, 3], [1, 8, 8], [2, 8, 8, 4]])
        return "Predict", _predict({"images": tf.make_tensor_proto(np.zeros(shape, np.uint8))}, "embed_decoded"), \
            {INVALID}

    def bad_search_k(self):
        k = self.rng.choice([tf.make_tensor_proto(0, tf.int32), tf.make_tensor_proto(-3, tf.int32),
                             tf.make_tensor_proto(10 ** 6, tf.int32), tf.make_tensor_proto(2.5, tf.float32),
                             tf.make_tensor_proto([1, 2], tf.int32), _typed(types_pb2.DT_INT64, [2 ** 40])])
        return "Predict", _predict({"images": _strings([self.image()]), "k": k}, "search"), {INVALID}

    def bad_too_large(self):
        if self.rng.random() < 0.9:  # cheap to make; the oversized messages below are rarer
            return "Predict", _predict({"images": _strings([b"x"] * 300)}), {INVALID}
        return "Predict", _predict({"images": _strings([b"\xff\xd8\xff" + b"\0" * LIMITS["max_request_bytes"]])}), \
            {EXHAUSTED}

    # --- images -----------------------------------------------------------------------------

    def bad_not_an_image(self):
        data = bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(1, 3000)))
        if data[:1] in (b"\xff", b"\x89", b"G", b"B", b"R"):
            data = b"x" + data
        return "Predict", _predict({"images": _strings([self.image(), data])}), {INVALID}

    def bad_truncated(self):
        image = self.image()
        cut = image[: self.rng.randint(1, len(image) // 2)]
        return "Predict", _predict({"images": _strings([cut])}), {INVALID}

    def bad_corrupted(self):
        # the header intact, bytes of the body overwritten: the decoder refuses it or decodes
        # noise; either answer is right, a crash or a hang is not
        image = bytearray(self.image())
        for _ in range(self.rng.randint(1, 20)):
            image[self.rng.randrange(min(40, len(image) - 1), len(image))] = self.rng.getrandbits(8)
        return "Predict", _predict({"images": _strings([bytes(image)])}), {OK, INVALID}

    def bad_declared_dimensions(self):
        side = self.rng.choice([4097, 5000, 46000, 65535, 100000, 2 ** 31 - 1])
        other = self.rng.randint(1, 4096)
        kind = self.rng.choice(FORMATS)
        if kind == "PNG":
            data = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + struct.pack(">II", side, other) + b"\x08\x02\0\0\0" + b"\0" * 20
        elif kind == "JPEG":
            side = min(side, 65535)
            data = b"\xff\xd8\xff\xc0\x00\x11\x08" + struct.pack(">HH", other, side) + b"\x03" + b"\0" * 40
        elif kind == "GIF":
            side = min(side, 65535)
            data = b"GIF89a" + struct.pack("<HH", side, other) + b"\0\0\0" + b"\x2c" + struct.pack(
                "<HHHHB", 0, 0, side, other, 0) + b"\x02\x01\x00\x00\x3b"
        elif kind == "BMP":
            data = b"BM" + b"\0" * 12 + struct.pack("<Iii", 40, side, -other) + b"\0" * 40
        else:
            side = min(side, 1 << 24)
            data = b"RIFF\0\0\0\0WEBPVP8X" + b"\0" * 8 + (side - 1).to_bytes(3, "little") + \
                (other - 1).to_bytes(3, "little")
        return "Predict", _predict({"images": _strings([data])}), {INVALID}, "pixels a side"

    def bad_gif_frame_bomb(self):
        # a real GIF whose frame descriptor is rewritten to 46000 x 46000: the screen stays small
        image = bytearray(self.image("GIF"))
        start, _ = _gif_frame(image)
        side = self.rng.choice([4097, 46000, 65535])
        image[start + 5:start + 9] = struct.pack("<HH", side, side)
        return "Predict", _predict({"images": _strings([bytes(image)])}), {INVALID}, "does not fit its"

    def bad_gif_frames(self):
        # a real GIF with its frame repeated: more frames than allowed, or more pixels than the budget
        image = self.tiny_gif
        start, end = _gif_frame(image)
        copies = self.rng.choice([LIMITS["max_animation_frames"] + 1, 400, 3000])
        animated = image[:start] + image[start:end] * copies + image[end:]
        return "Predict", _predict({"images": _strings([animated])}), {INVALID}, f"animated GIF of {copies} frames"

    def bad_animated_webp(self):
        frames = [Image.fromarray(np.full((8, 8, 3), i * 60, np.uint8)) for i in range(self.rng.randint(2, 4))]
        buffer = io.BytesIO()
        frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:])
        return "Predict", _predict({"images": _strings([buffer.getvalue()])}), {INVALID}, "is an animated WebP"

    def bad_pixel_budget(self):
        # each image within the per-image limits, together over max_pixels_per_request
        side = self.rng.choice([250, 400, 1000])
        png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + struct.pack(">II", side, side) + b"\x08\x02\0\0\0" + b"\0" * 20
        count = LIMITS["max_pixels_per_request"] // (side * side) + 1
        return "Predict", _predict({"images": _strings([png] * count)}), {INVALID}, "max_pixels_per_request"

    # --- model specs ------------------------------------------------------------------------

    def bad_unknown_signature(self):
        signature = self.rng.choice([f"sig{self.rng.randint(0, 99)}", "classify", "serving_default ", "SEARCH"])
        return "Predict", _predict({"images": _strings([self.image()])}, signature=signature), {PRECONDITION}, \
            f'Serving signature key "{signature}" not found.'

    def bad_unknown_model_or_version(self):
        inputs = {"images": _strings([self.image()])}
        request = self.rng.choice([_predict(inputs, name=f"model{self.rng.randint(0, 99)}"),
                                   _predict(inputs, version=self.rng.choice([0, 2, 99, 2 ** 63 - 1, -1])),
                                   _predict(inputs, name="tiny ", version=1)])
        return "Predict", request, {NOT_FOUND}

    def bad_version_label(self):
        request = _predict({"images": _strings([self.image()])}, label=self.rng.choice(["stable", "canary", "1"]),
                           name=self.rng.choice(["tiny", "other"]))
        return "Predict", request, {INVALID}, "Unrecognized servable version label"

    def bad_metadata(self):
        choice = self.rng.randrange(4)
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            metadata_field=[[], ["x"], ["signature_def", "y"], ["signature_def"]][choice])
        request.model_spec.name = "tiny" if choice < 3 else "other"
        return "GetModelMetadata", request, {NOT_FOUND if choice == 3 else INVALID}

    def bad_model_status(self):
        request = get_model_status_pb2.GetModelStatusRequest()
        choice = self.rng.randrange(3)
        request.model_spec.name = "other" if choice == 0 else "tiny"
        if choice == 1:
            request.model_spec.version.value = self.rng.randint(2, 10 ** 6)
        if choice == 2:
            request.model_spec.version_label = "stable"
        return "GetModelStatus", request, {INVALID if choice == 2 else NOT_FOUND}

    # --- inventory --------------------------------------------------------------------------

    def bad_upsert(self):
        gif = bytearray(self.image("GIF"))
        start, _ = _gif_frame(gif)
        gif[start + 5:start + 9] = struct.pack("<HH", 46000, 46000)
        choice = self.rng.randrange(7)
        request = [
            lambda: inventory_pb2.UpsertRequest(ids=["a", "b"], images=[self.image()]),
            lambda: inventory_pb2.UpsertRequest(ids=["a"]),
            lambda: inventory_pb2.UpsertRequest(ids=["a", "a"], images=[self.image()] * 2),
            lambda: inventory_pb2.UpsertRequest(ids=[""], images=[self.image()]),
            lambda: inventory_pb2.UpsertRequest(ids=["a"], images=[self.image()[:30]]),
            lambda: inventory_pb2.UpsertRequest(ids=["a"], images=[bytes(gif)]),
            lambda: inventory_pb2.UpsertRequest(ids=[f"p{i}" for i in range(5)], images=[
                b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + struct.pack(">II", 300, 300) + b"\0" * 25] * 5),
        ][choice]()
        return "Upsert", request, {INVALID}

    def bad_upsert_embeddings(self):
        dim = self.rng.choice([0, 3, 9])
        request = inventory_pb2.UpsertRequest(ids=["a"])
        request.embeddings.dim = dim
        request.embeddings.values.extend([0.1] * max(dim, 1))
        return "Upsert", request, {INVALID}

    def bad_delete(self):
        return "Delete", inventory_pb2.DeleteRequest(ids=[f"missing{self.rng.randint(0, 9)}"]), {NOT_FOUND}


@dataclasses.dataclass
class FuzzReport:
    """What `fuzz` saw: per category, the requests and the codes they got; the well-formed
    requests sent among them and those answered correctly; the RSS growth over the start."""

    codes: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
    wrong: list = dataclasses.field(default_factory=list)
    good_sent: int = 0
    good_answered: int = 0
    rss_start: int = 0
    rss_max: int = 0

    @property
    def requests(self):
        return sum(sum(counter.values()) for counter in self.codes.values())

    @property
    def rss_growth(self):
        return self.rss_max - self.rss_start


def fuzz(calls, generator, count, good_request, check_good, rss_bytes, threads=8, every=10):
    """Sends `count` malformed requests from `threads` threads, and one well-formed request every
    `every` of them; samples `rss_bytes()` every 20 ms meanwhile.

    Args:
        calls: `{rpc name: stub method}`.
        generator: a `Malformed`.
        good_request: `good_request(i) -> (PredictRequest, images sent)`.
        check_good: `check_good(response, images) -> bool`.
    """
    report = FuzzReport(rss_start=rss_bytes())
    report.rss_max = report.rss_start
    lock, stop = threading.Lock(), threading.Event()

    def sample():
        while not stop.wait(0.02):
            report.rss_max = max(report.rss_max, rss_bytes())

    def send(i):
        if i % every == every - 1:
            request, images = good_request(i)
            try:
                answered = check_good(calls["Predict"](request, timeout=60), images)
            except grpc.RpcError as error:
                answered = False
                with lock:
                    report.wrong.append(("well-formed", error.code(), error.details()))
            with lock:
                report.good_sent += 1
                report.good_answered += answered
            return
        with lock:  # the generator's random state is shared
            kind, rpc, request, codes, fragment = generator.make()
        try:
            calls[rpc](request, timeout=60)
            code, details = OK, ""
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
        with lock:
            report.codes[kind][code.name] += 1
            if code not in codes or (fragment is not None and code != OK and fragment not in details):
                report.wrong.append((kind, code, details))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        total = count + count // (every - 1)
        with futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(send, range(total)))
    finally:
        stop.set()
        sampler.join()
    report.rss_max = max(report.rss_max, rss_bytes())
    return report


def start(kit, model_root, index_dir):
    """The server under test, with the fuzz's limits (a context manager)."""
    return kit.running(model_root, index_dir=index_dir, limits=Limits(**LIMITS))


def stubs_of(client):
    return {"Predict": client.prediction_stub.Predict, "GetModelMetadata": client.prediction_stub.GetModelMetadata,
            "GetModelStatus": client.model_stub.GetModelStatus, "Upsert": client.inventory_stub.Upsert,
            "Delete": client.inventory_stub.Delete}


def good_requests(images, dim, seed=1):
    """`(good_request, check_good)` for `fuzz`: 1-4 valid images of any format through `embed`."""
    flat = [image for kind in FORMATS for image in images[kind]]

    def good_request(i):
        rng = random.Random(seed * 1_000_003 + i)
        chosen = [rng.choice(flat) for _ in range(rng.randint(1, 4))]
        return _predict({"images": _strings(chosen)}), chosen

    def check_good(response, chosen):
        return tf.make_ndarray(response.outputs["embeddings"]).shape == (len(chosen), dim)

    return good_request, check_good


def test_fuzz_malformed_requests(kit, model_root, tmp_path):
    images = sample_images()
    with start(kit, model_root, str(tmp_path / "gallery")) as server, Client(server.address) as client:
        client.upsert(["seed"], images["JPEG"][:1])
        calls = stubs_of(client)
        generator = Malformed(0, images)
        good_request, check_good = good_requests(images, kit.DIM)
        fuzz(calls, generator, 300, good_request, check_good, kit.rss_bytes)  # thread pools and caches settle
        report = fuzz(calls, generator, 3000, good_request, check_good, kit.rss_bytes)

        assert report.wrong == [], report.wrong[:10]
        assert report.requests == 3000 and set(report.codes) == set(generator.kinds)
        assert report.good_sent == 333 and report.good_answered == report.good_sent
        assert report.rss_growth < 64 * 1024 * 1024, \
            f"RSS grew by {report.rss_growth / 2 ** 20:.0f} MiB over 3,000 malformed requests"
        assert client.health() == "SERVING"
        assert client.embed([images[kind][0] for kind in FORMATS]).shape == (5, kit.DIM)
        assert client.count() == 1
        check = client.health_stub.Check(health_pb2.HealthCheckRequest(service="fgkeras.serving.InventoryService"))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
