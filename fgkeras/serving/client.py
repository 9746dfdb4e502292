"""A Python client of the retrieval server, on the standard TF Serving stubs.

`Client` sends `PredictRequest`s through `prediction_service_pb2_grpc.PredictionServiceStub` —
exactly what any TF Serving client sends — and inventory changes through the stub generated from
`protos/inventory.proto`.

Example:
```python
with Client("127.0.0.1:8500") as client:
    client.upsert(["sku-1", "sku-2"], ["shoe1.jpg", "shoe2.jpg"])
    ids, scores = client.search(["query.jpg"], k=5)
```
"""

import os

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from fgkeras.serving.images import encode_png
from fgkeras.serving.protos import inventory_pb2, inventory_pb2_grpc
from fgkeras.serving.tensors import fill_proto, to_ndarray

_MAX_ELEMENTS = 1 << 40


def encode_images(images):
    """A list of encoded images (bytes) from paths, bytes or uint8 arrays (encoded to PNG).

    Args:
        images: one image or a sequence of them; an image is a file path (str or path-like),
            encoded bytes, or a uint8 array (H, W), (H, W, C); a uint8 (N, H, W, C) array is N images.
    """
    if isinstance(images, (str, bytes, bytearray, os.PathLike)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)):
        images = [images]
    encoded = []
    for position, image in enumerate(images):
        if isinstance(image, (bytes, bytearray)):
            encoded.append(bytes(image))
        elif isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as f:
                encoded.append(f.read())
        elif isinstance(image, np.ndarray):
            encoded.append(encode_png(image))
        else:
            raise TypeError(f"images[{position}] must be a path, bytes or a uint8 array. Received: "
                            f"{type(image).__name__}")
    return encoded


class Client:
    """Embeds, searches and edits the inventory of an fgkeras retrieval server.

    Args:
        target: the server's `host:port`.
        model_name: `model_spec.name` (default: empty, which the server answers with its model).
        timeout: deadline of each RPC, in seconds.
        batch_size: images per request; longer lists are sent in several requests.
        max_message_bytes: largest message sent or received.
        channel: an existing `grpc.Channel` to use instead of opening one to `target`.
    """

    def __init__(self, target, model_name="", timeout=30.0, batch_size=64, max_message_bytes=64 * 1024 * 1024,
                 channel=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
        self.target = target
        self.model_name = model_name
        self.timeout = timeout
        self.batch_size = batch_size
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", max_message_bytes),
                             ("grpc.max_receive_message_length", max_message_bytes)])
        self.prediction_stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.inventory_stub = inventory_pb2_grpc.InventoryServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self._search_inputs = None

    # ------------------------------------------------------------------ PredictionService

    def predict(self, signature, inputs, version=None):
        """One Predict call: `inputs` {key: list of bytes or numpy array} → {key: numpy array}.

        Returns:
            `(outputs, model_version)`.
        """
        request = predict_pb2.PredictRequest()
        self._fill_spec(request.model_spec, version, signature)
        for key, value in inputs.items():
            proto = request.inputs[key]
            if isinstance(value, list):
                proto.dtype = types_pb2.DT_STRING
                proto.tensor_shape.dim.add().size = len(value)
                proto.string_val.extend(value)
            else:
                fill_proto(proto, np.asarray(value))
        response = self.prediction_stub.Predict(request, timeout=self.timeout)
        outputs = {key: to_ndarray(proto, key, _MAX_ELEMENTS) for key, proto in response.outputs.items()}
        return outputs, response.model_spec.version.value

    def embed(self, images, version=None):
        """(N, D) float32 embeddings of N images (paths, bytes or uint8 arrays)."""
        encoded = encode_images(images)
        parts = [self.predict("embed", {"images": encoded[i:i + self.batch_size]}, version)[0]["embeddings"]
                 for i in range(0, len(encoded), self.batch_size)]
        return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)

    def search(self, images, k=10, version=None):
        """The k nearest inventory items of each image.

        Returns:
            `(ids, scores)`: (N, k) object array of str ids and (N, k) float32 scores, best first
            (fewer columns when the gallery holds fewer than k items, or when the server answers
            with an export's own `search` signature, whose k was fixed at export).
        """
        encoded = encode_images(images)
        takes_k = "k" in self._search_signature_inputs()
        ids, scores = [], []
        for i in range(0, len(encoded), self.batch_size):
            inputs = {"images": encoded[i:i + self.batch_size]}
            if takes_k:
                inputs["k"] = np.int32(k)
            outputs = self.predict("search", inputs, version)[0]
            ids.append(outputs["ids"][:, :k])
            scores.append(outputs["scores"][:, :k])
        ids = np.concatenate(ids) if ids else np.empty((0, 0), object)
        decoded = np.empty(ids.shape, object)
        decoded.ravel()[:] = [i.decode() for i in ids.ravel()]
        return decoded, (np.concatenate(scores) if scores else np.empty((0, 0), np.float32))

    def metadata(self, version=None):
        """`{signature key: SignatureDef}` of the served version (GetModelMetadata)."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._fill_spec(request.model_spec, version)
        response = self.prediction_stub.GetModelMetadata(request, timeout=self.timeout)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return dict(signature_map.signature_def)

    # ------------------------------------------------------------------ ModelService, health

    def status(self, version=None):
        """`{version: state name}` (GetModelStatus), e.g. `{2: "AVAILABLE", 1: "END"}`."""
        request = get_model_status_pb2.GetModelStatusRequest()
        self._fill_spec(request.model_spec, version)
        response = self.model_stub.GetModelStatus(request, timeout=self.timeout)
        state = get_model_status_pb2.ModelVersionStatus.State
        return {s.version: state.Name(s.state) for s in response.model_version_status}

    def health(self, service=""):
        """The health status name of a service ("" = the server): "SERVING", "NOT_SERVING", ..."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # ------------------------------------------------------------------ InventoryService

    def upsert(self, ids, images=None, embeddings=None, version=None):
        """Adds items (or replaces known ids) from images or from embeddings; durable on return.

        Images reach the index of every served version that has one (each embeds them itself), and
        stay in the server's log for the indexes of later versions. Embeddings belong to the version
        that made them: `version` is required with them, and a new version needs them sent again.

        Returns:
            `{"inserted", "updated", "count", "model_version", "versions"}` summed over the requests
            sent (`versions`: those whose index holds the change).
        """
        ids = [ids] if isinstance(ids, str) else list(ids)
        if (images is None) == (embeddings is None):
            raise ValueError("Pass either `images` or `embeddings` to upsert.")
        totals = {"inserted": 0, "updated": 0, "count": 0, "model_version": 0, "versions": []}
        if images is not None:
            encoded = encode_images(images)
            if len(encoded) != len(ids):
                raise ValueError(f"{len(ids)} ids need {len(ids)} images. Received {len(encoded)}")
            step = self.batch_size
            requests = [inventory_pb2.UpsertRequest(ids=ids[i:i + step], images=encoded[i:i + step],
                                                    model_version=version or 0)
                        for i in range(0, len(ids), step)]
        else:
            embeddings = np.asarray(embeddings, np.float32).reshape(len(ids), -1)
            if version is None:
                raise ValueError("Embeddings belong to the model version that made them: pass `version`.")
            request = inventory_pb2.UpsertRequest(ids=ids, model_version=int(version))
            request.embeddings.dim = embeddings.shape[1]
            request.embeddings.values.extend(embeddings.ravel().tolist())
            requests = [request]
        for request in requests:
            response = self.inventory_stub.Upsert(request, timeout=self.timeout)
            totals["inserted"] += response.inserted
            totals["updated"] += response.updated
            totals["count"] = response.count
            totals["model_version"] = response.model_version
            totals["versions"] = list(response.versions)
        return totals

    def delete(self, ids, missing_ok=False):
        """Removes items; durable on return. Returns `{"deleted", "count"}`."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        response = self.inventory_stub.Delete(inventory_pb2.DeleteRequest(ids=ids, missing_ok=missing_ok),
                                              timeout=self.timeout)
        return {"deleted": response.deleted, "count": response.count}

    def count(self, version=None):
        """The number of items in the index of `version` (None: the newest served version that has one)."""
        request = inventory_pb2.CountRequest(model_version=int(version or 0))
        return self.inventory_stub.Count(request, timeout=self.timeout).count

    # ------------------------------------------------------------------ plumbing

    def close(self):
        if self._own_channel:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _fill_spec(self, spec, version=None, signature=None):
        spec.name = self.model_name
        if version is not None:
            spec.version.value = int(version)
        if signature:
            spec.signature_name = signature

    def _search_signature_inputs(self):
        if self._search_inputs is None:
            signatures = self.metadata()
            if "search" not in signatures:
                raise ValueError(f"The model served at {self.target} has no `search` signature: serve it with an "
                                 "index (`index_dir`) or export it with one (`export_retrieval`).")
            self._search_inputs = set(signatures["search"].inputs)
        return self._search_inputs
