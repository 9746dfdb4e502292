"""Tiny SavedModels in the export's signature shapes, and helpers shared by the serving tests."""

import contextlib
import os
import shutil
import threading
import types

import numpy as np
import pytest
import tensorflow as tf

from fgkeras.export import write_warmup_requests

DIM = 8
SIDE = 8


class TinyEmbedder(tf.Module):
    """`serving_default`/`embed` (string images → float32 [None, DIM]), `embed_decoded` (uint8
    [None, SIDE, SIDE, 3]) and optionally an in-graph `search` (k = 3): the export's signatures, on a
    random projection of the 8 × 8 thumbnail. `seed` makes versions distinguishable."""

    def __init__(self, seed, gallery=None):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.projection = tf.Variable(rng.normal(size=(SIDE * SIDE * 3, DIM)).astype("float32"), trainable=False)
        self.embed = tf.function(self._embed, input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        self.embed_decoded = tf.function(
            self._embed_decoded, input_signature=[tf.TensorSpec([None, SIDE, SIDE, 3], tf.uint8, name="images")])
        self.gallery = None
        if gallery is not None:
            embeddings, ids = gallery
            self.gallery = tf.Variable(embeddings.astype("float32"), trainable=False)
            self.gallery_ids = tf.Variable(np.asarray(ids, dtype=bytes), trainable=False)
            self.search = tf.function(self._search, input_signature=[tf.TensorSpec([None], tf.string, name="images")])

    def _project(self, pixels):
        x = tf.reshape(tf.cast(pixels, tf.float32) / 255.0, [-1, SIDE * SIDE * 3])
        return tf.math.l2_normalize(tf.matmul(x, self.projection) + 1e-3, axis=1)

    def _decode(self, images):
        def one(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            return tf.cast(tf.image.resize(image, [SIDE, SIDE]), tf.uint8)

        return tf.map_fn(one, images, fn_output_signature=tf.TensorSpec([SIDE, SIDE, 3], tf.uint8))

    def _embed(self, images):
        return {"embeddings": self._project(self._decode(images))}

    def _embed_decoded(self, images):
        return {"embeddings": self._project(images)}

    def _search(self, images):
        scores, rows = tf.math.top_k(tf.matmul(self._project(self._decode(images)), self.gallery, transpose_b=True), 3)
        return {"ids": tf.gather(self.gallery_ids, rows), "scores": scores}

    def signatures(self):
        embed = self.embed.get_concrete_function()
        result = {"serving_default": embed, "embed": embed, "embed_decoded": self.embed_decoded.get_concrete_function()}
        if self.gallery is not None:
            result["search"] = self.search.get_concrete_function()
        return result


def save_tiny(path, seed=0, gallery=None, warmup=True):
    module = TinyEmbedder(seed, gallery)
    tf.saved_model.save(module, str(path), signatures=module.signatures())
    if warmup:
        write_warmup_requests(str(path))
    return str(path)


def encode(pixels, kind="png"):
    return (tf.io.encode_png if kind == "png" else tf.io.encode_jpeg)(pixels).numpy()


def random_images(count, seed=0, size=(12, 10)):
    rng = np.random.default_rng(seed)
    return [encode(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "png" if i % 2 else "jpeg")
            for i in range(count)]


def reference_embeddings(path, images):
    """What the SavedModel itself says, in process."""
    loaded = tf.saved_model.load(path)
    return loaded.signatures["embed"](images=tf.constant(images))["embeddings"].numpy()


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory):
    """Three tiny versions saved once per session: seeds 0, 1, 2 (copy them into a model root)."""
    root = tmp_path_factory.mktemp("tiny_exports")
    return [save_tiny(root / f"seed{seed}", seed=seed) for seed in range(3)]


def install_version(root, export, version):
    """Puts `export` at `root/<version>` atomically (staged, then renamed, as `fgkeras.export.push` does)."""
    os.makedirs(root, exist_ok=True)
    staging = os.path.join(root, f".staging-{version}")
    shutil.copytree(export, staging)
    os.rename(staging, os.path.join(root, str(version)))
    return os.path.join(root, str(version))


@pytest.fixture
def model_root(tmp_path, tiny_exports):
    """A model root holding version 1 (seed 0)."""
    root = str(tmp_path / "tiny")
    install_version(root, tiny_exports[0], 1)
    return root


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Load:
    """Threads that call `fn()` in a loop until stopped; records results and errors."""

    def __init__(self, fn, threads=4):
        self._fn = fn
        self._stop = threading.Event()
        self.results, self.errors = [], []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self):
        while not self._stop.is_set():
            try:
                result = self._fn()
            except Exception as error:  # recorded: the test asserts there are none
                with self._lock:
                    self.errors.append(error)
            else:
                with self._lock:
                    self.results.append(result)

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


@contextlib.contextmanager
def running(model_root, **kwargs):
    """A started server on a free loopback port, always stopped at the end."""
    from fgkeras.serving import serve

    kwargs.setdefault("port", 0)
    kwargs.setdefault("poll_seconds", 0)
    server = serve(model_root, **kwargs)
    try:
        yield server
    finally:
        server.stop(grace=2)


@contextlib.contextmanager
def stubs(server):
    """The stock TF Serving stubs (and the health stub) on a channel to `server`."""
    import grpc
    from grpc_health.v1 import health_pb2_grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    channel = grpc.insecure_channel(server.address)
    try:
        yield types.SimpleNamespace(
            predict=prediction_service_pb2_grpc.PredictionServiceStub(channel),
            model=model_service_pb2_grpc.ModelServiceStub(channel),
            health=health_pb2_grpc.HealthStub(channel))
    finally:
        channel.close()


def predict_request(images=None, signature="embed", name="tiny", version=None, inputs=None):
    """A PredictRequest as a stock client builds it (`tf.make_tensor_proto`)."""
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if signature is not None:
        request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if images is not None:
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    for key, value in (inputs or {}).items():
        request.inputs[key].CopyFrom(value)
    return request


def embeddings_of(response):
    return tf.make_ndarray(response.outputs["embeddings"])


@pytest.fixture(scope="session")
def kit():
    """The helpers above, for test modules (which cannot import this conftest under importlib mode)."""
    return types.SimpleNamespace(
        running=running, stubs=stubs, predict_request=predict_request, embeddings_of=embeddings_of,
        random_images=random_images, reference_embeddings=reference_embeddings, install_version=install_version,
        save_tiny=save_tiny, encode=encode, rss_bytes=rss_bytes, Load=Load, DIM=DIM, SIDE=SIDE)
