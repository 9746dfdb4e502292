"""The retrieval server: TF Serving's gRPC API for an fgkeras export, with a live inventory.

Services on one port:

- `tensorflow.serving.PredictionService`: `Predict` (every signature of the served version;
  `model_spec.version` pins a version, none means the latest; `signature_name` defaults to
  `serving_default`) and `GetModelMetadata` (`signature_def`, as TF Serving answers it).
- `tensorflow.serving.ModelService`: `GetModelStatus`.
- `fgkeras.serving.InventoryService` (`protos/inventory.proto`), when the server has an inventory
  (`index_dir` = `indexes/<name>`): `Upsert`, `Delete`, `Count`; the `search` signature is then the
  version's `embed` followed by a search of that version's own live index
  (`indexes/<name>/<version>/`, see `fgkeras.serving.inventory`), so a search sees every
  acknowledged change and never another version's vectors; a version without an index has its
  searches answered by the newest version with one, whose number the response carries.
- `grpc.health.v1.Health`: SERVING once a version is loaded, NOT_SERVING while shutting down.

Any TF Serving client works unchanged (`prediction_service_pb2_grpc.PredictionServiceStub`); the
`fgkeras.serving.Client` wraps the stubs for Python users.

With `rest_api_port` (TF Serving's `--rest_api_port`; off unless asked), the server also answers
TF Serving's REST API on the same host (`fgkeras.serving.rest`): `POST /v1/models/<name>[/versions/<v>]
:predict` with `{"instances": [...]}` (row format) or `{"inputs": ...}` (columnar), binary strings
as `{"b64": ...}`; `GET /v1/models/<name>[/versions/<v>]` (status) and `.../metadata`. Each call
runs the same code as its gRPC twin, with the same limits; errors are `{"error": "..."}` with the
HTTP code TF Serving gives the status (400 INVALID_ARGUMENT, 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED ...).

Errors are gRPC statuses, with TF Serving's codes: NOT_FOUND for an unknown model or version;
FAILED_PRECONDITION for an unknown signature, or a search when no served version has an index;
INVALID_ARGUMENT for an unknown version label and saying what is wrong with a tensor or an image;
RESOURCE_EXHAUSTED when a request is too large or the server is saturated; DEADLINE_EXCEEDED when
the client's deadline passed in the queue.

Example:
```python
server = fgkeras.serving.serve("saved_models/cars", port=8500, index_dir="indexes/cars")
server.wait()      # until SIGTERM / SIGINT (or another thread's `server.stop()`)
```
"""

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import error_codes_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from fgkeras.serving.batching import BatchingParameters, BatchScheduler, default_batch_threads
from fgkeras.serving.inventory import Inventory, InventoryServicer
from fgkeras.serving.models import ModelManager
from fgkeras.serving.protos import inventory_pb2, inventory_pb2_grpc
from fgkeras.serving.signatures import Limits, LiveSearchSignature, check_images
from fgkeras.serving.status import (
    ServingError,
    abort_on_error,
    deadline_exceeded,
    deadline_of,
    invalid_argument,
)
from fgkeras.serving.tensors import fill_proto

logger = logging.getLogger(__name__)

SIGNATURE_DEF_FIELD = "signature_def"
EMBED_SIGNATURE_KEYS = ("embed", "serving_default")
# (tensorflow_serving.apis' prediction_service_pb2 / model_service_pb2 do not import with protobuf 7;
# their *_pb2_grpc stubs and servicers do.)
SERVICE_NAMES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
INVENTORY_SERVICE_NAME = inventory_pb2.DESCRIPTOR.services_by_name["InventoryService"].full_name


def embed_signature(servable):
    """The signature that embeds encoded images: `embed`, else `serving_default`, when it takes
    one string `[None]` input and returns a float32 `[None, D]` output; else None."""
    for key in EMBED_SIGNATURE_KEYS:
        signature = servable.signatures.get(key)
        if signature is None or len(signature.inputs) != 1 or len(signature.outputs) < 1:
            continue
        ((dtype, dims),) = signature.inputs.values()
        output = signature.outputs.get("embeddings") or next(iter(signature.outputs.values()))
        if dtype == types_pb2.DT_STRING and dims == [-1] and output[0] == types_pb2.DT_FLOAT and \
                output[1] is not None and len(output[1]) == 2:
            return signature
    return None


class _Executor:
    """Runs a signature on a payload: through the batch scheduler when batching, else directly."""

    def __init__(self, batcher):
        self.batcher = batcher

    def run(self, servable, signature, payload, rows, deadline):
        if self.batcher is not None and signature.batched:
            return self.batcher.run((servable, signature.name), signature.run_many, payload, rows, deadline)
        if deadline is not None and time.monotonic() >= deadline:
            raise deadline_exceeded("the deadline passed before the request ran")
        return signature.run_many([payload])[0]


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`tensorflow.serving.PredictionService`: Predict and GetModelMetadata.

    `predict` and `metadata` hold the logic, raising `ServingError`; the gRPC methods answer with
    them and the REST API (`fgkeras.serving.rest`) calls them too.
    """

    def __init__(self, models, executor, limits):
        self._models = models
        self._executor = executor
        self._limits = limits

    def Predict(self, request, context):
        with abort_on_error(context):
            return self.predict(request, deadline_of(context))

    def GetModelMetadata(self, request, context):
        with abort_on_error(context):
            return self.metadata(request)

    def predict(self, request, deadline):
        """The `PredictResponse` to a `PredictRequest`.

        Args:
            request: a `predict_pb2.PredictRequest`.
            deadline: a `time.monotonic()` value after which the request is not run, or None.
        Raises:
            ServingError: what the client asked for cannot be served (its status code says why).
        """
        with contextlib.ExitStack() as held:
            servable = held.enter_context(self._models.acquire(request.model_spec))
            signature = servable.signature(request.model_spec.signature_name)
            answering = signature.answering_version() if isinstance(signature, LiveSearchSignature) else None
            if answering is not None and answering != servable.version:
                # A version without an index of its own: the newest version that has one embeds the
                # query and searches its own vectors, and the response names it.
                spec = model_pb2.ModelSpec(name=request.model_spec.name)
                spec.version.value = answering
                servable = held.enter_context(self._models.acquire(spec))
                signature = servable.signature(signature.name)
            payload, rows = signature.parse(request.inputs, self._limits)
            wanted = list(request.output_filter)
            unknown = [key for key in wanted if key not in signature.outputs]
            if unknown:
                raise invalid_argument(f"output_filter names {unknown}, which signature {signature.name!r} does not "
                                       f"have; its outputs are {sorted(signature.outputs)}")
            outputs = self._executor.run(servable, signature, payload, rows, deadline)
            response = predict_pb2.PredictResponse()
            spec = response.model_spec
            spec.name = servable.name
            spec.version.value = servable.version
            spec.signature_name = signature.name
            for key, value in outputs.items():
                if not wanted or key in wanted:
                    fill_proto(response.outputs[key], value)
            return response

    def signature_inputs(self, model_spec):
        """`{key: (DataType, dims)}` of the inputs of the signature `model_spec` names (what the REST
        API needs to read JSON values as tensors); raises `ServingError` (NOT_FOUND) as `predict` does."""
        with self._models.acquire(model_spec) as servable:
            return dict(servable.signature(model_spec.signature_name).inputs)

    def metadata(self, request):
        """The `GetModelMetadataResponse` to a `GetModelMetadataRequest`; raises `ServingError`."""
        if not request.metadata_field:
            raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != SIGNATURE_DEF_FIELD:
                raise invalid_argument(f"Metadata field {field} is not supported")  # TF Serving's words
        with self._models.acquire(request.model_spec) as servable:
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.metadata[SIGNATURE_DEF_FIELD].Pack(servable.signature_def_map())
            return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """`tensorflow.serving.ModelService`: GetModelStatus (HandleReloadConfigRequest is UNIMPLEMENTED)."""

    def __init__(self, models):
        self._models = models

    def GetModelStatus(self, request, context):
        with abort_on_error(context):
            return self.status(request)

    def status(self, request):
        """The `GetModelStatusResponse` to a `GetModelStatusRequest`; raises `ServingError`.

        Every version's `status` is set, OK or the error of its failed load, as TF Serving sets it."""
        response = get_model_status_pb2.GetModelStatusResponse()
        for status in self._models.status(request.model_spec):
            entry = response.model_version_status.add(version=status.version, state=status.state)
            entry.status.SetInParent()
            if status.error:
                entry.status.error_code = error_codes_pb2.UNKNOWN
                entry.status.error_message = status.error
        return response


class Server:
    """A gRPC retrieval server for one model (see the module docstring); `serve()` builds and starts one.

    Args:
        model_dir: the model's base path, `saved_models/<name>` (integer version directories).
        model_name: the name clients use in `model_spec.name` (default: the directory's name).
            Requests with an empty name are served too (this server has one model).
        host: the interface to listen on. The default is loopback only; "0.0.0.0" or "::" listen
            on every interface (no TLS: put the server behind a proxy that adds it).
        port: the port (0: a free one; read it back from `server.port`).
        rest_api_port: the port of TF Serving's REST API on the same `host` (TF Serving's
            `--rest_api_port`, 8501 there; see `fgkeras.serving.rest`): None (default) serves no
            REST API, 0 a free port (read it back from `server.rest_port`).
        batching: True (default parameters), False, or `BatchingParameters`.
        index_dir: the live inventory's index directory (see `fgkeras.serving.inventory`); None
            serves the export's own signatures only, without InventoryService.
        limits: `Limits` of one request.
        num_versions: serve the latest this many versions.
        versions: serve exactly these versions instead.
        poll_seconds: how often `model_dir` is polled for new versions (0: never).
        default_k: neighbours of a live search without `k`.
        grace_seconds: how long `stop()` lets running requests finish.
        snapshot_every: inventory changes between two snapshots of the indexes.
        wal_recovery: how the inventory opens a log corrupted before its last record: "strict"
            (refuse to start, naming the file, the offset and the records after it) or
            "skip-corrupt" (start, skipping those records and logging which). See `fgkeras.serving.wal`.
        warmup: replay each version's warmup requests before serving it.
        intra_op_parallelism: threads of TensorFlow's intra-op pool, which one op (a convolution)
            splits its work over (TF Serving's `--tensorflow_intra_op_parallelism`); None leaves
            TensorFlow's choice (a thread per core, or `TF_NUM_INTRAOP_THREADS`). A small model on
            a few cores serves more with 1: its ops are too small to split, and concurrent requests
            or batches already keep the cores busy. It is the process's setting: `start()` applies it
            before loading, and refuses a value that TensorFlow, already running, does not have.
    """

    def __init__(self, model_dir, model_name=None, host="127.0.0.1", port=8500, batching=True, index_dir=None,
                 limits=None, num_versions=1, versions=None, poll_seconds=1.0, default_k=10, grace_seconds=10.0,
                 snapshot_every=1000, warmup=True, intra_op_parallelism=None, rest_api_port=None,
                 wal_recovery="strict"):
        if not os.path.isdir(model_dir):
            raise ValueError(f"`model_dir` must be a directory of integer versions. Received: model_dir={model_dir!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"`port` must be an int in [0, 65535]. Received: port={port!r}")
        if rest_api_port is not None and (isinstance(rest_api_port, bool) or not isinstance(rest_api_port, int) or
                                          not 0 <= rest_api_port <= 65535):
            raise ValueError(f"`rest_api_port` must be None or an int in [0, 65535]. "
                             f"Received: rest_api_port={rest_api_port!r}")
        if isinstance(default_k, bool) or not isinstance(default_k, int) or default_k < 1:
            raise ValueError(f"`default_k` must be a positive int. Received: default_k={default_k!r}")
        if intra_op_parallelism is not None and (isinstance(intra_op_parallelism, bool) or
                                                 not isinstance(intra_op_parallelism, int) or intra_op_parallelism < 1):
            raise ValueError("`intra_op_parallelism` must be None or a positive int. "
                             f"Received: intra_op_parallelism={intra_op_parallelism!r}")
        if batching is True:
            batching = BatchingParameters()
        elif batching is not False and not isinstance(batching, BatchingParameters):
            raise ValueError(f"`batching` must be True, False or a BatchingParameters. Received: batching={batching!r}")
        self.model_name = model_name or os.path.basename(os.path.normpath(os.path.abspath(model_dir)))
        self.host = host
        self.limits = limits or Limits()
        self.default_k = default_k
        self.grace_seconds = grace_seconds
        if batching and batching.num_batch_threads is None:
            batching = dataclasses.replace(batching, num_batch_threads=default_batch_threads(intra_op_parallelism))
        self.batching = batching or None
        self.intra_op_parallelism = intra_op_parallelism
        self._requested_port = port
        self._index_dir = index_dir
        self._snapshot_every = snapshot_every
        self._wal_recovery = wal_recovery
        self.inventory = None
        self.batcher = BatchScheduler(batching) if batching else None
        self._executor = _Executor(self.batcher)
        self.models = ModelManager(model_dir, self.model_name, self.limits, num_versions=num_versions,
                                   versions=versions, poll_seconds=poll_seconds,
                                   extend_signatures=self._extend_signatures if index_dir else None,
                                   on_release=self._release_version, warmup=warmup)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._prediction = PredictionServicer(self.models, self._executor, self.limits)
        self._model_status = ModelServicer(self.models)
        self.port = None
        self._grpc = None
        self._requested_rest_port = rest_api_port
        self.rest_port = None
        self._rest = None
        self._state_lock = threading.Lock()
        self._started = False
        self._stopping = False
        self._stopped = threading.Event()
        self._stop_requested = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self):
        """Loads the model (and the inventory), binds the port and starts serving.

        Raises:
            ValueError: no version of the model can be served.
            RuntimeError: the port cannot be bound.
        """
        with self._state_lock:
            if self._started:
                raise RuntimeError("This server was already started; build a new one.")
            self._started = True
        try:
            if self.intra_op_parallelism is not None:
                _set_intra_op_parallelism(self.intra_op_parallelism)
            if self._index_dir:
                self.inventory = Inventory(self._index_dir, snapshot_every=self._snapshot_every,
                                           wal_recovery=self._wal_recovery)
            self.models.start()
            self._grpc = self._build_grpc_server()
            address = f"[{self.host}]:{self._requested_port}" if ":" in self.host else \
                f"{self.host}:{self._requested_port}"
            try:
                self.port = self._grpc.add_insecure_port(address)
            except RuntimeError as error:
                raise RuntimeError(f"Cannot listen on {address}: {error}") from None
            if not self.port:
                raise RuntimeError(f"Cannot listen on {address} (in use, or not an interface of this machine)")
            if self._requested_rest_port is not None:
                from fgkeras.serving.rest import RestServer

                self._rest = RestServer(self._prediction, self._model_status, self.limits, self.host,
                                        self._requested_rest_port)
                self.rest_port = self._rest.port
            self._grpc.start()
            if self._rest is not None:
                self._rest.start()
        except BaseException:
            self._release()
            with self._state_lock:
                self._stopping = True
            self._stopped.set()
            raise
        for service in ("", *SERVICE_NAMES, *([INVENTORY_SERVICE_NAME] if self.inventory is not None else [])):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("listening on %s: reachable from other machines, without TLS", self.host)
        logger.info("serving model %r versions %s on %s (batching %s%s)", self.model_name,
                    self.models.available_versions, self.address, "on" if self.batcher else "off",
                    f", inventory of {len(self.inventory)} items" if self.inventory is not None else "")
        if self._rest is not None:
            logger.info("REST API of model %r on %s", self.model_name, self._rest.url)
        return self

    @property
    def address(self):
        """`host:port` to give a client."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace=None):
        """Stops gracefully: health turns NOT_SERVING, new RPCs are refused, running ones get
        `grace` seconds (default `grace_seconds`) to finish; then the inventory is snapshotted
        and the model released. Safe to call more than once and from any thread."""
        with self._state_lock:
            if not self._started:
                return
            stopping, self._stopping = self._stopping, True
        if stopping:
            self._stopped.wait()
            return
        logger.info("stopping the server on %s", self.address)
        self.health.enter_graceful_shutdown()
        grace = self.grace_seconds if grace is None else grace
        try:
            if self._rest is not None:
                self._rest.begin_stop()
            if self._grpc is not None:
                self._grpc.stop(grace).wait()
            if self._rest is not None:
                self._rest.stop(grace)
            self._release()
        finally:
            self._stopped.set()
        logger.info("server stopped")

    def wait(self, timeout=None, handle_signals=True):
        """Blocks until the server has stopped; SIGTERM or SIGINT stops it gracefully.

        Args:
            timeout: seconds to wait at most (None: until stopped).
            handle_signals: install SIGTERM / SIGINT handlers while waiting (main thread only).
        Returns:
            True when the server has stopped, False on timeout.
        """
        previous = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._on_signal)
        end = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._stopped.is_set():
                if self._stop_requested.is_set():
                    self.stop()
                    break
                if end is not None and time.monotonic() >= end:
                    return False
                self._stop_requested.wait(0.2)
            return True
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def stats(self):
        """Batching counters and the available versions (for tests and benchmarks)."""
        return {"versions": self.models.available_versions,
                "batching": self.batcher.stats() if self.batcher else None,
                "inventory": len(self.inventory) if self.inventory is not None else None}

    def __enter__(self):
        return self if self._started else self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # ------------------------------------------------------------------ internals

    def _on_signal(self, signum, frame):
        logger.info("received %s: shutting down", signal.Signals(signum).name)
        self._stop_requested.set()

    def _release(self):
        if self._rest is not None:
            self._rest.stop(0)
        if self.batcher is not None:
            self.batcher.close()
        self.models.close()
        if self.inventory is not None:
            self.inventory.close()

    def _build_grpc_server(self):
        limits = self.limits
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=limits.max_concurrent_rpcs, thread_name_prefix="fgkeras-rpc"),
            options=[("grpc.max_receive_message_length", limits.max_request_bytes),
                     ("grpc.max_send_message_length", max(limits.max_request_bytes, 64 * 1024 * 1024)),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self._prediction, server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self._model_status, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.inventory is not None:
            inventory_pb2_grpc.add_InventoryServiceServicer_to_server(
                InventoryServicer(self.inventory, lambda images: check_images(images, "images", limits), limits),
                server)
        return server

    def _extend_signatures(self, servable):
        """Pairs a version with its own index (see `fgkeras.serving.inventory`) and gives it the live
        `search`; a version without an index gets it too, answered by the newest version that has one."""
        from fgkeras.export import model_record

        embed = embed_signature(servable)
        if embed is None:
            raise ValueError(f"version {servable.version} has no `embed` / `serving_default` signature from "
                             "string images to float32 [None, D] embeddings, which a live inventory needs")
        (key,) = embed.inputs
        output = "embeddings" if "embeddings" in embed.outputs else next(iter(embed.outputs))

        def embed_images(images):
            outputs = self._executor.run(servable, embed, {key: images}, len(images), None)
            return outputs[output]

        record = model_record(servable.path, self.model_name, servable.version)
        self.inventory.attach(servable.version, record, embed_images)
        return {"search": LiveSearchSignature(embed, self.inventory, servable.version, default_k=self.default_k)}

    def _release_version(self, servable):
        if self.inventory is not None:
            self.inventory.detach(servable.version)


def _set_intra_op_parallelism(threads):
    import tensorflow as tf

    current = tf.config.threading.get_intra_op_parallelism_threads()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        raise ValueError(f"`intra_op_parallelism` must be set before TensorFlow runs anything in this process, "
                         f"which already runs with {current or 'its default'}. "
                         f"Received: intra_op_parallelism={threads}") from None


def serve(model_dir, model_name=None, host="127.0.0.1", port=8500, batching=True, index_dir=None, **kwargs):
    """Starts a `Server` (see its arguments) and returns it; `server.wait()` blocks until SIGTERM.

    Example:
    ```python
    server = serve("saved_models/cars", port=0)
    client = fgkeras.serving.Client(server.address)
    ...
    server.stop()
    ```
    """
    return Server(model_dir, model_name=model_name, host=host, port=port, batching=batching, index_dir=index_dir,
                  **kwargs).start()
