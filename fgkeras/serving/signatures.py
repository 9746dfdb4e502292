"""The signatures a servable answers: input checks against the SignatureDef, and how each runs.

- `SavedModelSignature`: a signature of the loaded SavedModel (`serving_default`, `embed`,
  `embed_decoded`, an exported `search` ...), called with the request's tensors.
- `LiveSearchSignature`: `search` over the live inventory — the model's `embed` signature, then
  the inventory's index — so a search sees an upsert as soon as it is acknowledged.

Every signature parses a request into a *payload* (a dict of numpy arrays, checked) and runs a
list of payloads as one batch (`run_many`), which is what the batch scheduler calls.
"""

import dataclasses
import math

import grpc
import numpy as np
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from fgkeras.serving import tensors
from fgkeras.serving.images import ImageError, check_image
from fgkeras.serving.status import ServingError, from_tensorflow, invalid_argument

PREDICT_METHOD = "tensorflow/serving/predict"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server.

    Attributes:
        max_request_bytes: largest request message (gRPC refuses bigger ones with RESOURCE_EXHAUSTED).
        max_request_batch_size: most images (rows) in one Predict or Upsert request.
        max_image_side: largest width or height an encoded image may declare.
        max_image_pixels: most pixels one encoded image may decode to: width × height, times the
            frames of an animated GIF (`fgkeras.serving.images.ImageHeader.pixels`).
        max_pixels_per_request: most pixels all the encoded images of one Predict or Upsert
            request may decode to together (the default: 16 images at `max_image_pixels`); over it
            the request is INVALID_ARGUMENT (a retry cannot succeed; a client splits the batch).
        max_animation_frames: most frames of one animated GIF (animated WebP is refused).
        max_k: most neighbours a live search returns.
        max_concurrent_rpcs: RPCs in progress at once; gRPC answers RESOURCE_EXHAUSTED beyond it.
    """

    max_request_bytes: int = 16 * 1024 * 1024
    max_request_batch_size: int = 256
    max_image_side: int = 4096
    max_image_pixels: int = 4096 * 4096
    max_pixels_per_request: int = 16 * 4096 * 4096
    max_animation_frames: int = 1000
    max_k: int = 1000
    max_concurrent_rpcs: int = 128

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{field.name}` must be a positive int. Received: {field.name}={value!r}")


def is_image_input(key, dtype):
    """String inputs whose name mentions images hold encoded images (checked before decoding)."""
    return dtype == types_pb2.DT_STRING and "image" in key.lower()


def _dims(tensor_info):
    """The dimensions of a TensorInfo (-1 unknown), or None for an unknown rank."""
    if tensor_info.tensor_shape.unknown_rank:
        return None
    return [d.size for d in tensor_info.tensor_shape.dim]


def _shape_text(dims):
    return "[" + ", ".join("None" if d < 0 else str(d) for d in dims) + "]"


class Signature:
    """A signature: its `SignatureDef`, request checks and batch execution.

    Subclasses implement `run_many(payloads) -> [outputs]` where `outputs` is a dict of numpy
    arrays, one per output key, for that payload.
    """

    def __init__(self, name, signature_def):
        self.name = name
        self.signature_def = signature_def
        self.inputs = {key: (info.dtype, _dims(info)) for key, info in signature_def.inputs.items()}
        self.outputs = {key: (info.dtype, _dims(info)) for key, info in signature_def.outputs.items()}
        shapes = [dims for _, dims in list(self.inputs.values()) + list(self.outputs.values())]
        # Batchable as in TF Serving: every input and output has an unknown leading dimension.
        self.batched = bool(shapes) and all(dims and dims[0] == -1 for dims in shapes)
        self._batched_inputs = set(self.inputs) if self.batched else set()
        self._required = set(self.inputs)

    def parse(self, request_inputs, limits):
        """The checked payload of a request's inputs, and its number of rows (1 when not batched).

        Raises:
            ServingError (INVALID_ARGUMENT): saying which input is wrong and how.
        """
        keys = set(request_inputs)
        if not self._required <= keys <= set(self.inputs):
            missing, extra = sorted(self._required - keys), sorted(keys - set(self.inputs))
            parts = [f"signature {self.name!r} takes inputs {sorted(self.inputs)}"]
            if missing:
                parts.append(f"missing {missing}")
            if extra:
                parts.append(f"unexpected {extra}")
            raise invalid_argument("; ".join(parts))
        # Every input's dtype, shape, batch size and bytes are checked from the protos before any is read.
        shapes, rows = {}, None
        for key in sorted(keys):
            shape = shapes[key] = self._check_proto(key, request_inputs[key], limits)
            if key in self._batched_inputs:
                if rows is not None and shape[0] != rows:
                    raise invalid_argument(f"the inputs of signature {self.name!r} must have the same batch size; "
                                           f"{key!r} has {shape[0]}, another has {rows}")
                rows = shape[0]
        if rows == 0:
            raise invalid_argument(f"the request to signature {self.name!r} is an empty batch")
        payload = {key: self._parse_input(key, request_inputs[key], limits) for key in sorted(keys)}
        pixels = 0  # the pixel budget is the request's, over all its image inputs
        for key in sorted(keys):
            if is_image_input(key, self.inputs[key][0]):
                pixels = check_images(payload[key], key, limits, spent=pixels)
        return payload, rows or 1

    def _check_proto(self, key, proto, limits):
        """The declared shape of input `key`, after checking its dtype, shape, batch size and bytes."""
        dtype, dims = self.inputs[key]
        if proto.dtype != dtype:
            raise invalid_argument(f"input {key!r} of signature {self.name!r} must be {tensors.dtype_name(dtype)}; "
                                   f"received {tensors.dtype_name(proto.dtype)}")
        shape = tensors.shape_of(proto, key)
        if dims is not None and (len(shape) != len(dims) or any(d >= 0 and d != s for d, s in zip(dims, shape))):
            raise invalid_argument(f"input {key!r} of signature {self.name!r} must have shape {_shape_text(dims)}; "
                                   f"received {list(shape)}")
        if key in self._batched_inputs and shape and shape[0] > limits.max_request_batch_size:
            raise invalid_argument(f"a batch of {shape[0]} exceeds the server's max_request_batch_size of "
                                   f"{limits.max_request_batch_size}")
        tensors.check_size(proto, key, shape, limits.max_request_bytes)
        return shape

    def _parse_input(self, key, proto, limits):
        """The array of input `key` (its proto already passed `_check_proto`)."""
        return tensors.to_ndarray(proto, key, max_elements=limits.max_request_bytes)

    def run_many(self, payloads):
        raise NotImplementedError


def check_images(array, key, limits, spent=0):
    """Checks encoded images against `limits` before anything decodes them.

    Each image is checked alone (`max_image_side`, `max_image_pixels`, `max_animation_frames`),
    then the pixels they decode to together, with the `spent` pixels of the request's other image
    inputs, against `max_pixels_per_request`.

    Returns:
        `spent` plus the pixels of these images.

    Raises:
        ServingError (INVALID_ARGUMENT): naming the first element that is not an acceptable
            image, or the element at which the request's pixels exceed the budget.
    """
    total = spent
    for position, data in enumerate(np.asarray(array, dtype=object).ravel()):
        try:
            header = check_image(data, limits.max_image_side, limits.max_image_pixels, limits.max_animation_frames)
        except ImageError as error:
            raise invalid_argument(f"{key}[{position}] {error}") from None
        total += header.pixels
        if total > limits.max_pixels_per_request:
            others = f" (with {spent} of the request's other images)" if spent else ""
            raise invalid_argument(
                f"{key}[0..{position}] decode to {total} pixels{others}, over the server's max_pixels_per_request "
                f"of {limits.max_pixels_per_request}; send fewer or smaller images per request")
    return total


def concatenate(payloads):
    """One payload of the rows of several (the inputs of a batch)."""
    if len(payloads) == 1:
        return payloads[0]
    return {key: np.concatenate([p[key] for p in payloads]) for key in payloads[0]}


def split(outputs, sizes):
    """The outputs of a batch, cut back into one dict per payload of `sizes` rows."""
    if len(sizes) == 1:
        return [outputs]
    bounds = np.cumsum([0, *sizes])
    return [{key: value[a:b] for key, value in outputs.items()} for a, b in zip(bounds[:-1], bounds[1:])]


class SavedModelSignature(Signature):
    """A signature of a loaded SavedModel.

    Args:
        name: the signature key.
        signature_def: its `SignatureDef` proto (as stored in saved_model.pb).
        function: the loaded concrete function (`loaded.signatures[name]`).
    """

    def __init__(self, name, signature_def, function):
        super().__init__(name, signature_def)
        self._function = function

    def run_many(self, payloads):
        inputs = concatenate(payloads)
        outputs = self.call(inputs)
        if not self.batched:
            return [outputs]
        sizes = [len(next(iter(p.values()))) for p in payloads]
        for key, value in outputs.items():
            if value.ndim == 0 or len(value) != sum(sizes):
                raise ServingError(
                    grpc.StatusCode.INTERNAL,
                    f"signature {self.name!r} returned {key!r} of shape {list(value.shape)} for a batch of "
                    f"{sum(sizes)}: its rows cannot be split between requests")
        return split(outputs, sizes)

    def call(self, inputs):
        """Runs the signature on numpy inputs; numpy outputs."""
        import tensorflow as tf

        try:
            outputs = self._function(**{key: tf.constant(value) for key, value in inputs.items()})
            return {key: value.numpy() for key, value in outputs.items()}
        except tf.errors.OpError as error:
            raise from_tensorflow(error, f"signature {self.name!r}") from None


def tensor_info(name, dtype, dims):
    info = meta_graph_pb2.TensorInfo(name=name, dtype=dtype)
    for size in dims:
        info.tensor_shape.dim.add().size = size
    return info


class LiveSearchSignature(Signature):
    """`search` on the live inventory: embed the query images, then search the index.

    Inputs: `images` string `[None]` and, optionally, `k` int32 scalar (default `default_k`).
    Outputs: `ids` string `[None, k]` and `scores` float32 `[None, k]` (inner products, best first;
    fewer than k columns when the inventory holds fewer items).

    The queries are embedded by this signature's version and searched in that version's own
    index; a version without one has its searches answered by the newest version that has one
    (`answering_version`, which the server resolves before running the request).

    Args:
        embed: the servable's `embed` signature (a `SavedModelSignature` with one string input).
        inventory: an `fgkeras.serving.inventory.Inventory`.
        version: the servable's version.
        default_k: neighbours when the request has no `k`.
    """

    def __init__(self, embed, inventory, version, default_k=10):
        signature_def = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
        signature_def.inputs["images"].CopyFrom(tensor_info("images:0", types_pb2.DT_STRING, [-1]))
        signature_def.inputs["k"].CopyFrom(tensor_info("k:0", types_pb2.DT_INT32, []))
        signature_def.outputs["ids"].CopyFrom(tensor_info("Identity:0", types_pb2.DT_STRING, [-1, -1]))
        signature_def.outputs["scores"].CopyFrom(tensor_info("Identity_1:0", types_pb2.DT_FLOAT, [-1, -1]))
        super().__init__("search", signature_def)
        self.batched = True
        self._batched_inputs = self._required = {"images"}
        self._embed = embed
        (self._embed_input,) = embed.inputs
        self._embed_output = "embeddings" if "embeddings" in embed.outputs else next(iter(embed.outputs))
        self._inventory = inventory
        self.version = version
        self.default_k = default_k

    def answering_version(self):
        """The version whose embeddings and index answer this version's searches."""
        return self._inventory.answering(self.version)

    def _check_proto(self, key, proto, limits):
        if key != "k":
            return super()._check_proto(key, proto, limits)
        if proto.dtype not in (types_pb2.DT_INT32, types_pb2.DT_INT64):
            raise invalid_argument(f"input 'k' of signature 'search' must be DT_INT32 (or DT_INT64); received "
                                   f"{tensors.dtype_name(proto.dtype)}")
        shape = tensors.shape_of(proto, key)
        if math.prod(shape) != 1:
            raise invalid_argument(f"input 'k' of signature 'search' must be a scalar; received shape {list(shape)}")
        return shape

    def _parse_input(self, key, proto, limits):
        if key != "k":
            return super()._parse_input(key, proto, limits)
        k = int(tensors.to_ndarray(proto, key, max_elements=1).reshape(()))
        if not 1 <= k <= limits.max_k:
            raise invalid_argument(f"input 'k' of signature 'search' must be in [1, {limits.max_k}]; received {k}")
        return k

    def parse(self, request_inputs, limits):
        payload, rows = super().parse(request_inputs, limits)
        payload.setdefault("k", self.default_k)
        return payload, rows

    def run_many(self, payloads):
        images = np.concatenate([p["images"] for p in payloads]) if len(payloads) > 1 else payloads[0]["images"]
        queries = self._embed.call({self._embed_input: images})[self._embed_output]
        ids, scores = self._inventory.search(self.version, queries, max(p["k"] for p in payloads))
        sizes = [len(p["images"]) for p in payloads]
        parts = split({"ids": ids, "scores": scores}, sizes)
        return [{"ids": part["ids"][:, :p["k"]], "scores": part["scores"][:, :p["k"]]}
                for part, p in zip(parts, payloads)]
