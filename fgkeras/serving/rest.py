"""TF Serving's REST API on the retrieval server (TF Serving's `--rest_api_port`).

Endpoints, as TF Serving answers them:

- `POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict` with a JSON object:
  `signature_name` (optional, default `serving_default`) and either `instances` (row format: a
  list with one element per row; an element is the value of the signature's only input, or an
  object with one key per input) or `inputs` (columnar format: the value of the only input, or an
  object of named inputs, each a tensor of any shape). Binary strings are `{"b64": "<base64>"}`,
  other strings are UTF-8 text. The answer is `{"predictions": [...]}` (row format: one element per
  row, an object of the outputs when there are several) or `{"outputs": ...}` (columnar).
- `GET /v1/models/<name>[/versions/<v>|/labels/<l>]`: `GetModelStatusResponse` as JSON
  (`{"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {...}}]}`).
- `GET /v1/models/<name>[/versions/<v>|/labels/<l>]/metadata`: `GetModelMetadataResponse` as JSON
  (`{"model_spec": {...}, "metadata": {"signature_def": {"signature_def": {...}}}}`).

Each call is turned into the gRPC request (`PredictRequest`, ...) and answered by the same code
as the gRPC method (`PredictionServicer.predict`, `.metadata`, `ModelServicer.status`), so limits
(`Limits.max_request_bytes`, the batch size, the image checks), versions and errors are the
same. An error is `{"error": "<message>"}` with the HTTP code TF Serving gives its status:
INVALID_ARGUMENT, FAILED_PRECONDITION and OUT_OF_RANGE 400, NOT_FOUND 404, RESOURCE_EXHAUSTED
429, UNIMPLEMENTED 501, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, INTERNAL 500 (see `HTTP_STATUS`).

Where TF Serving leaves it to its HTTP library or this server differs on purpose:

- a body larger than `max_request_bytes` is refused from its `Content-Length`, before it is
  read: 413 (and the connection is closed); a POST without a length (nor chunked encoding): 411;
- an unknown path: 404; a known path with another method: 405 (TF Serving answers both 400);
- `:classify` and `:regress`: 501 (this server serves predict signatures only);
- a string output that is not UTF-8 text is sent as `{"b64": ...}` (as are outputs whose name
  ends in `_bytes`, as in TF Serving), so that the answer stays valid JSON;
- in the row format every instance must name the same inputs, a subset of the signature's, and
  the signature says which are required (a live `search` takes an optional scalar `k`, which
  only the columnar format can send: `{"inputs": {"images": [...], "k": 5}}`);
- requests have no deadline (REST has no standard deadline header);
- a connection idle for `idle_seconds`, or a body not received within `body_seconds`, is closed
  (408 for the body); connections beyond `Limits.max_concurrent_rpcs` are answered 429.

HTTP/1.1 keep-alive is supported; every answer has a `Content-Length`.
"""

import base64
import binascii
import contextlib
import json
import logging
import math
import re
import socket
import sys
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2

from fgkeras.serving import tensors
from fgkeras.serving.status import ServingError, invalid_argument

logger = logging.getLogger(__name__)

# The HTTP code of each gRPC status, as TF Serving's HTTP server maps them.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

_MODEL = r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
_PREDICT_PATH = re.compile(_MODEL + r":(?P<method>predict|classify|regress)", re.IGNORECASE)
_STATUS_PATH = re.compile(_MODEL + r"(?P<metadata>/metadata)?", re.IGNORECASE)
_NO_NAME_PATH = re.compile(r"/v1/models/?", re.IGNORECASE)
_INT64_MAX = 2 ** 63 - 1
MAX_RANK = 32
_READ_CHUNK = 64 * 1024
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 4 * 1024 * 1024


class HttpError(Exception):
    """An answer that is an HTTP matter rather than a gRPC status (404 path, 405, 411, 413 ...).

    Args:
        status: the HTTP code.
        message: the `error` of the JSON answer.
        close: close the connection after answering (the body was not read).
        headers: extra response headers.
    """

    def __init__(self, status, message, close=False, headers=None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.close = close
        self.headers = headers or {}


class _Disconnected(Exception):
    """The client went away: nothing to answer."""


# ---------------------------------------------------------------------- routes

class Route:
    """A parsed REST path: which model version, and which call (`predict`, `status`, `metadata` ...)."""

    def __init__(self, call, name, version=None, label=None):
        self.call = call
        self.name = name
        self.version = version
        self.label = label

    def model_spec(self):
        spec = model_pb2.ModelSpec(name=self.name)
        if self.version is not None:
            spec.version.value = self.version
        if self.label is not None:
            spec.version_label = self.label
        return spec


def parse_route(method, target):
    """The `Route` of a request line's method and target (query string ignored).

    Raises:
        HttpError: 404 for a path that is not the API's, 405 for a known path with another method.
        ServingError (INVALID_ARGUMENT): a version that is no int64, an undecodable name or label.
    """
    path = urllib.parse.urlsplit(target).path if target.startswith("/") else target
    predict = _PREDICT_PATH.fullmatch(path)
    status = None if predict else _STATUS_PATH.fullmatch(path)
    if predict is None and status is None:
        if _NO_NAME_PATH.fullmatch(path):
            raise invalid_argument("Missing model name in request.")
        raise HttpError(HTTPStatus.NOT_FOUND, f"Unknown REST path {_clip(path)!r}: the API is "
                        "POST /v1/models/<name>[/versions/<v>]:predict and GET /v1/models/<name>[/versions/<v>]"
                        "[/metadata]")
    allowed = "POST" if predict else "GET"
    if method != allowed:
        raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {_clip(path)!r}; use {allowed}",
                        headers={"Allow": allowed})
    match = predict or status
    version = match.group("version")
    if version is not None:
        version = int(version)
        if version > _INT64_MAX:
            raise invalid_argument(f"Failed to convert version: {_clip(match.group('version'))} to an int64")
    name, label = _unquote(match.group("name"), "model name"), match.group("label")
    label = _unquote(label, "model version label") if label is not None else None
    if predict:
        call = predict.group("method").lower()
        if call != "predict":
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                               f"{call} is not served here: only predict signatures (use :predict)")
    else:
        call = "metadata" if status.group("metadata") else "status"
    return Route(call, name, version, label)


def _unquote(text, what):
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise invalid_argument(f"Failed to decode {what}: {_clip(text)!r}") from None


def _clip(text, limit=200):
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------- JSON ↔ tensors

ROW, COLUMNAR = "row", "columnar"


def parse_json(body):
    """The JSON object of a request body; INVALID_ARGUMENT for anything else."""
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        document = json.loads(body)
    except RecursionError:
        raise invalid_argument("JSON Parse error: nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, bad UTF-8, an integer of too many digits
        raise invalid_argument(f"JSON Parse error: {_clip(error)}") from None
    if not isinstance(document, dict):
        raise invalid_argument(f"JSON Value: {_json_snippet(document)} Is not object")
    return document


def request_inputs(document, signature_inputs, max_elements):
    """The input arrays of a predict request's JSON object, and its format (`ROW` or `COLUMNAR`).

    Args:
        document: the request's JSON object.
        signature_inputs: `{key: (DataType, dims)}` of the signature's inputs.
        max_elements: the most elements one input may have.
    Returns:
        `({key: numpy array}, format)`.
    Raises:
        ServingError (INVALID_ARGUMENT): saying what is wrong with the JSON.
    """
    has_instances, has_inputs = "instances" in document, "inputs" in document
    if has_instances and has_inputs:
        raise invalid_argument("Not formatted correctly: expecting only one of 'inputs' or 'instances' keys")
    if not has_instances and not has_inputs:
        raise invalid_argument("Missing 'inputs' or 'instances' key")
    if not signature_inputs:
        raise invalid_argument("the signature takes no inputs")
    if has_instances:
        return _row_inputs(document["instances"], signature_inputs, max_elements), ROW
    return _columnar_inputs(document["inputs"], signature_inputs, max_elements), COLUMNAR


def _is_b64(value):
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _is_named(value):
    return isinstance(value, dict) and not _is_b64(value)


def _only_input(signature_inputs, where):
    if len(signature_inputs) > 1:
        raise invalid_argument(f"{where} is a plain value or list, but the signature takes several inputs "
                               f"{sorted(signature_inputs)}: send an object of named inputs")
    return next(iter(signature_inputs))


def _row_inputs(instances, signature_inputs, max_elements):
    if not isinstance(instances, list):
        raise invalid_argument(f"Expecting 'instances' to be a list; received {_json_type(instances)}")
    if not instances:
        raise invalid_argument("No values in 'instances' list")
    if not _is_named(instances[0]):
        key = _only_input(signature_inputs, "'instances'")
        for position, instance in enumerate(instances):
            if _is_named(instance):
                raise invalid_argument(f"Expecting a value or list but got an object at item {position} of "
                                       "'instances'")
        columns = {key: instances}
    else:
        keys = set(instances[0])
        unknown = sorted(keys - set(signature_inputs))
        if unknown:
            raise invalid_argument(f"'instances' item 0 names inputs {unknown} that the signature does not take; "
                                   f"it takes {sorted(signature_inputs)}")
        columns = {key: [] for key in sorted(keys)}
        for position, instance in enumerate(instances):
            if not _is_named(instance):
                raise invalid_argument(f"Expecting an object but got {_json_type(instance)} at item {position} of "
                                       "'instances'")
            if set(instance) != keys:
                raise invalid_argument(f"'instances' item {position} has keys {sorted(instance)}; item 0 has "
                                       f"{sorted(keys)}: every instance must name the same inputs")
            for key in keys:
                columns[key].append(instance[key])
    arrays = {}
    for key, values in columns.items():
        first = _dense_shape(values[0], key)
        for position, value in enumerate(values):
            shape = _dense_shape(value, key)
            if shape != first:
                raise invalid_argument(f"input {key!r}: 'instances' item {position} has shape {list(shape)}; "
                                       f"item 0 has {list(first)}: every instance must have the same shape")
        arrays[key] = to_array(values, signature_inputs[key][0], key, max_elements)
    return arrays


def _columnar_inputs(inputs, signature_inputs, max_elements):
    if not _is_named(inputs):
        key = _only_input(signature_inputs, "'inputs'")
        return {key: to_array(inputs, signature_inputs[key][0], key, max_elements)}
    unknown = sorted(set(inputs) - set(signature_inputs))
    if unknown:
        raise invalid_argument(f"'inputs' names inputs {unknown} that the signature does not take; it takes "
                               f"{sorted(signature_inputs)}")
    return {key: to_array(value, signature_inputs[key][0], key, max_elements) for key, value in inputs.items()}


def _dense_shape(value, key):
    """The shape of a nested JSON list, read along its first elements (checked by `to_array`)."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if len(shape) > MAX_RANK:
            raise invalid_argument(f"input {key!r} is nested deeper than {MAX_RANK} lists")
        if not value:
            break
        value = value[0]
    return tuple(shape)


def to_array(value, dtype, key, max_elements):
    """The numpy array of a JSON value for an input of `DataType` `dtype`.

    A JSON value is a scalar or a dense nested list (every list of a level the same length);
    strings are UTF-8 text or `{"b64": ...}`; numbers must fit the dtype exactly enough (an int
    for an int type, in its range; a float for a float type, in its range); booleans only for
    DT_BOOL.

    Raises:
        ServingError (INVALID_ARGUMENT): naming the input and the first value that does not fit.
    """
    shape = _dense_shape(value, key)
    count = math.prod(shape)
    if count > max_elements:
        raise invalid_argument(f"input {key!r} of shape {list(shape)} has {count} elements; the limit is "
                               f"{max_elements}")
    leaves = []
    _flatten(value, shape, 0, leaves, key)
    if dtype == types_pb2.DT_STRING:
        array = np.empty(len(leaves), dtype=object)
        array[:] = [_string(leaf, key) for leaf in leaves]
        return array.reshape(shape)
    if dtype not in tensors.NUMERIC:
        raise invalid_argument(f"input {key!r} has dtype {tensors.dtype_name(dtype)}, which the REST API does "
                               "not read")
    numpy_dtype = tensors.NUMERIC[dtype][0]
    check = _number_check(numpy_dtype)
    for leaf in leaves:
        check(leaf, key, dtype)
    return np.array(leaves, dtype=numpy_dtype).reshape(shape)


def _flatten(value, shape, level, leaves, key):
    if isinstance(value, list):
        if level >= len(shape) or len(value) != shape[level]:
            expected = f"{shape[level]} values" if level < len(shape) else "a value, not a list"
            raise invalid_argument(f"input {key!r} is not a dense tensor: a list of {len(value)} at depth {level} "
                                   f"where its shape {list(shape)} needs {expected}")
        for item in value:
            _flatten(item, shape, level + 1, leaves, key)
        return
    if level != len(shape):
        raise invalid_argument(f"input {key!r} is not a dense tensor: the value {_json_snippet(value)} at depth {level} "
                               f"where its shape {list(shape)} needs a list")
    leaves.append(value)


def _string(leaf, key):
    if isinstance(leaf, str):
        try:
            return leaf.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid_argument(f"input {key!r} holds a string that is not valid Unicode (a lone surrogate); "
                                   "send binary data as {\"b64\": ...}") from None
    if _is_b64(leaf):
        text = leaf["b64"]
        try:
            return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise invalid_argument(f"input {key!r}: {_json_snippet(leaf)} is not valid base64") from None
    raise invalid_argument(f"input {key!r} is DT_STRING: it must hold text or {{\"b64\": ...}}; received "
                           f"{_json_snippet(leaf)} ({_json_type(leaf)})")


def _number_check(numpy_dtype):
    if numpy_dtype.kind == "b":
        def check(leaf, key, dtype):
            if not isinstance(leaf, bool):
                raise _type_error(leaf, key, dtype)
        return check
    if numpy_dtype.kind in "iu":
        limits = np.iinfo(numpy_dtype)

        def check(leaf, key, dtype):
            if isinstance(leaf, bool) or not isinstance(leaf, int):
                raise _type_error(leaf, key, dtype)
            if not limits.min <= leaf <= limits.max:
                raise invalid_argument(f"input {key!r}: {_json_snippet(leaf)} is out of the range of "
                                       f"{tensors.dtype_name(dtype)}")
        return check
    largest = float(np.finfo(numpy_dtype).max)
    exact = 2 ** np.finfo(numpy_dtype).nmant * 2 - 1  # the largest int the type holds exactly

    def check(leaf, key, dtype):
        if isinstance(leaf, bool) or not isinstance(leaf, (int, float)):
            raise _type_error(leaf, key, dtype)
        if isinstance(leaf, int) and abs(leaf) > exact or \
                isinstance(leaf, float) and math.isfinite(leaf) and abs(leaf) > largest:
            raise invalid_argument(f"Cannot convert JSON value {_json_snippet(leaf)} of input {key!r} to "
                                   f"{tensors.dtype_name(dtype)} without loss of precision")
    return check


def _type_error(leaf, key, dtype):
    return invalid_argument(f"input {key!r}: JSON value {_json_snippet(leaf)} ({_json_type(leaf)}) is not of the expected "
                            f"type {tensors.dtype_name(dtype)}")


def _json_type(value):
    for kind, name in ((bool, "a boolean"), (str, "a string"), (list, "a list"), (dict, "an object"),
                       (type(None), "null"), ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _json_snippet(value, limit=80):
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return _clip(text, limit)


def output_json(outputs, request_format):
    """The JSON object answering a predict request: `{"predictions": ...}` or `{"outputs": ...}`.

    Args:
        outputs: `{key: TensorProto}` of the `PredictResponse`.
        request_format: `ROW` or `COLUMNAR`, as the request came.
    Raises:
        ServingError (INVALID_ARGUMENT): row format asked of outputs without one batch size.
    """
    if not outputs:
        raise invalid_argument("the signature returned no outputs")
    arrays = {key: tensors.to_ndarray(outputs[key], key, max_elements=math.inf) for key in sorted(outputs)}
    values = {key: _json_values(array, key) for key, array in arrays.items()}
    if request_format == COLUMNAR:
        return {"outputs": values if len(values) > 1 else next(iter(values.values()))}
    rows = None
    for key, array in arrays.items():
        if array.ndim == 0:
            raise invalid_argument(f"output {key!r} is a scalar, which the row format cannot split into "
                                   "instances: send the request with 'inputs' (columnar format)")
        if rows is not None and len(array) != rows:
            raise invalid_argument(f"output {key!r} has a batch size of {len(array)}, another {rows}: send the "
                                   "request with 'inputs' (columnar format)")
        rows = len(array)
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    return {"predictions": [{key: values[key][row] for key in values} for row in range(rows)]}


def _json_values(array, key):
    """Nested lists of JSON values: floats at their shortest round-trip text, strings as text or b64."""
    if array.dtype.kind == "f":
        if array.dtype.itemsize < 8:  # the shortest decimal that reads back as this float32 / float16
            return array.astype(str).astype(np.float64).tolist()
        return array.tolist()
    if array.dtype == object:
        as_bytes = key.endswith("_bytes")
        return np.frompyfunc(lambda data: _string_value(data, as_bytes), 1, 1)(array).tolist() \
            if array.size else array.tolist()
    return array.tolist()


def _string_value(data, as_bytes):
    if not as_bytes:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(data).decode("ascii")}


def _proto_json(message):
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


# ---------------------------------------------------------------------- the API

class RestApi:
    """The REST calls, each answered by the gRPC servicers' own methods.

    Args:
        prediction: the server's `PredictionServicer` (`predict`, `metadata`, `signature_inputs`).
        model_status: the server's `ModelServicer` (`status`).
        limits: the server's `Limits`.
    """

    def __init__(self, prediction, model_status, limits):
        self.prediction = prediction
        self.model_status = model_status
        self.limits = limits

    def call(self, route, body):
        """The JSON object answering `route` (with the POST `body`); raises `ServingError`."""
        if route.call == "predict":
            return self.predict(route, body)
        if route.call == "metadata":
            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            request.model_spec.CopyFrom(route.model_spec())
            response = self.prediction.metadata(request)
            signature_defs = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signature_defs)
            return {"model_spec": _proto_json(response.model_spec),
                    "metadata": {"signature_def": _proto_json(signature_defs)}}
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.CopyFrom(route.model_spec())
        return _proto_json(self.model_status.status(request))

    def predict(self, route, body):
        """`{"predictions": ...}` or `{"outputs": ...}` for a `:predict` body (see the module docstring)."""
        document = parse_json(body)
        signature_name = document.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise invalid_argument(f"'signature_name' must be a string; received {_json_snippet(signature_name)}")
        request = predict_pb2.PredictRequest()
        request.model_spec.CopyFrom(route.model_spec())
        request.model_spec.signature_name = signature_name
        signature_inputs = self.prediction.signature_inputs(request.model_spec)
        arrays, request_format = request_inputs(document, signature_inputs, self.limits.max_request_bytes)
        for key, array in arrays.items():
            tensors.fill_proto(request.inputs[key], array)
        response = self.prediction.predict(request, None)
        return output_json(response.outputs, request_format)


class _Handler(BaseHTTPRequestHandler):
    """One connection: requests one after the other (HTTP/1.1 keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = "fgkeras-serving"

    def version_string(self):
        return self.server_version

    def setup(self):
        self.timeout = self.server.rest.idle_seconds
        super().setup()

    def do_GET(self):
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_TRACE = do_CONNECT = do_GET

    def _serve(self):
        rest = self.server.rest
        with rest.request():
            try:
                if rest.stopping:
                    raise ServingError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
                route = parse_route(self.command, self.path)
                body = self._read_body() if self.command == "POST" else self._skip_body()
                self._answer(200, rest.api.call(route, body))
            except _Disconnected:
                self.close_connection = True
            except HttpError as error:
                self.close_connection = self.close_connection or error.close
                self._answer(error.status, {"error": error.message}, error.headers)
            except ServingError as error:
                self._answer(HTTP_STATUS.get(error.code, 500), {"error": error.message})
            except Exception as error:  # a bug: answered 500 (INTERNAL) and logged, the server keeps serving
                logger.exception("REST request %s %s failed", self.command, _clip(self.path))
                self._answer(500, {"error": f"{type(error).__name__}: {_clip(error, 600)}"})
        if rest.stopping:
            self.close_connection = True

    def _content_length(self):
        """The declared body length, None when chunked; HttpError for a missing, bad or too large one."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        text = self.headers.get("Content-Length")
        if text is None:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "a POST needs a Content-Length (or chunked encoding)",
                            close=True)
        if not text.strip().isdigit():
            raise HttpError(HTTPStatus.BAD_REQUEST, f"Content-Length {_clip(text)!r} is not a length", close=True)
        length = int(text)
        limit = self.server.rest.api.limits.max_request_bytes
        if length > limit:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a request body of {length} bytes exceeds the "
                            f"server's max_request_bytes of {limit}", close=True)
        return length

    def handle_expect_100(self):
        if self.command == "POST":
            try:
                self._content_length()
            except HttpError as error:
                self.close_connection = True
                self._answer(error.status, {"error": error.message})
                return False
        return super().handle_expect_100()

    def _read_body(self):
        length = self._content_length()
        rest = self.server.rest
        end = time.monotonic() + rest.body_seconds
        try:
            if length is not None:
                return self._read_exactly(length, end)
            return self._read_chunked(rest.api.limits.max_request_bytes, end)
        except TimeoutError:
            raise HttpError(HTTPStatus.REQUEST_TIMEOUT, "the request body did not arrive in time", close=True) \
                from None
        except (ConnectionError, OSError):
            raise _Disconnected() from None

    def _read_exactly(self, length, end):
        parts, remaining = [], length
        while remaining:
            if time.monotonic() > end:
                raise TimeoutError
            part = self.rfile.read(min(remaining, _READ_CHUNK))
            if not part:
                raise _Disconnected()
            parts.append(part)
            remaining -= len(part)
        return b"".join(parts)

    def _read_chunked(self, limit, end):
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise HttpError(HTTPStatus.BAD_REQUEST, "a malformed chunk of the chunked body", close=True)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HttpError(HTTPStatus.BAD_REQUEST, f"a chunk size {_clip(line[:40])!r} that is no hex number",
                                close=True) from None
            if size < 0:
                raise HttpError(HTTPStatus.BAD_REQUEST, "a negative chunk size", close=True)
            if size == 0:
                break
            total += size
            if total > limit:
                raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a chunked request body beyond the server's "
                                f"max_request_bytes of {limit}", close=True)
            parts.append(self._read_exactly(size, end))
            if self._read_exactly(2, end) != b"\r\n":
                raise HttpError(HTTPStatus.BAD_REQUEST, "a chunk not followed by CRLF", close=True)
        while True:  # trailers, up to the blank line
            line = self.rfile.readline(1024)
            if line in (b"\r\n", b"\n", b""):
                break
        return b"".join(parts)

    def _skip_body(self):
        """Requests other than POST carry no body here: one that has one is not read, and the
        connection closes after the answer (it would be read as the next request)."""
        if self.headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in self.headers:
            self.close_connection = True
        return b""

    def _answer(self, status, document, headers=None):
        data = json.dumps(document).encode("utf-8")
        try:
            if status == 499:
                self.send_response(status, "Client Closed Request")
            else:
                self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection or self.server.rest.stopping:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client went away before its answer
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """The standard library's errors (a malformed request line or header, an unknown method),
        answered in JSON like every other error, and the connection closed."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":  # an unreadable request line: answer with
            self.request_version = "HTTP/1.0"                           # a status line and headers all the same
        self._answer(int(code), {"error": message or HTTPStatus(code).phrase})

    def log_message(self, format, *args):
        logger.debug("REST %s - %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address, rest):
        self.rest = rest
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        if not self.rest.open_connection(request):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # no thread could be started
            self.rest.close_connection(request)
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.rest.close_connection(request)

    def _refuse(self, request):
        """Answers 429 from the accepting thread without waiting on the client: what it has sent
        is discarded first (closing on unread data resets the connection, which can lose the answer)."""
        limit = self.rest.max_connections
        data = json.dumps({"error": f"the server already has {limit} REST connections open (its "
                                    "max_concurrent_rpcs); retry later"}).encode()
        head = (f"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(0.05)
            _discard(request, _LINGER_BYTES, time.monotonic() + 0.05)
            request.sendall(head + data)
            request.shutdown(socket.SHUT_WR)
            _discard(request, _LINGER_BYTES, time.monotonic() + 0.05)
        except OSError:
            pass
        request.close()

    def shutdown_request(self, request):
        """A lingering close: the answer is sent, then what the client still sends (a body that was
        refused unread) is read and discarded for a moment, so that closing does not reset the
        connection before the client has read the answer."""
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(_LINGER_SECONDS)
            _discard(request, _LINGER_BYTES, time.monotonic() + _LINGER_SECONDS)
        except OSError:
            pass
        request.close()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):  # a client that resets or drops its connection
            logger.debug("REST connection from %s dropped: %s", client_address, sys.exc_info()[1])
        else:
            logger.exception("REST connection from %s failed", client_address)


def _discard(connection, limit, end):
    """Reads and drops what `connection` receives until EOF, `limit` bytes or time `end`."""
    received = 0
    while received < limit and time.monotonic() < end:
        try:
            data = connection.recv(_READ_CHUNK)
        except (TimeoutError, BlockingIOError):
            return
        if not data:
            return
        received += len(data)


class RestServer:
    """TF Serving's REST API on `host:port`, answered by the server's servicers (see the module
    docstring). Binds when built; `start()` serves, `stop()` ends.

    Args:
        prediction: the server's `PredictionServicer`.
        model_status: the server's `ModelServicer`.
        limits: the server's `Limits` (`max_concurrent_rpcs` caps the open connections).
        host: the interface (as the gRPC server's).
        port: the port (0: a free one; read it back from `port`).
        idle_seconds: how long a connection may stay silent (between or inside requests).
        body_seconds: how long a request body may take to arrive.
    Raises:
        RuntimeError: the port cannot be bound.
    """

    def __init__(self, prediction, model_status, limits, host="127.0.0.1", port=8501, idle_seconds=30.0,
                 body_seconds=60.0):
        if idle_seconds <= 0 or body_seconds <= 0:
            raise ValueError(f"`idle_seconds` and `body_seconds` must be > 0. Received: idle_seconds={idle_seconds!r}, "
                             f"body_seconds={body_seconds!r}")
        self.api = RestApi(prediction, model_status, limits)
        self.host = host
        self.idle_seconds = idle_seconds
        self.body_seconds = body_seconds
        self.max_connections = limits.max_concurrent_rpcs
        self.stopping = False
        self._cond = threading.Condition()
        self._connections = set()
        self._in_flight = 0
        self._thread = None
        self._stopped = False
        try:
            self._httpd = _HTTPServer((host, port), self)
        except OSError as error:
            raise RuntimeError(f"Cannot listen on {host}:{port} for the REST API: {error}") from None
        self.port = self._httpd.server_address[1]

    @property
    def url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self):
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="fgkeras-rest", daemon=True)
        self._thread.start()
        return self

    def begin_stop(self):
        """Stops accepting connections; requests that arrive on open ones are answered 503."""
        with self._cond:
            if self.stopping:
                return
            self.stopping = True
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()

    def stop(self, grace=0.0):
        """`begin_stop()`, then lets running requests finish for `grace` seconds, then closes every
        connection. Safe to call more than once."""
        self.begin_stop()
        with self._cond:
            if self._stopped:
                return
            self._cond.wait_for(lambda: self._in_flight == 0, timeout=grace)
            self._stopped = True
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # bookkeeping for the handler and the server

    def open_connection(self, connection):
        with self._cond:
            if self.stopping or len(self._connections) >= self.max_connections:
                return False
            self._connections.add(connection)
            return True

    def close_connection(self, connection):
        with self._cond:
            self._connections.discard(connection)

    @contextlib.contextmanager
    def request(self):
        """Counts a request in progress (what `stop` waits for)."""
        with self._cond:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()
