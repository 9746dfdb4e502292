"""The versions of one served model: which to load, loading with warm-up, swapping, unloading.

The model's base path is TF Serving's layout (`saved_models/<name>/<version>/`, see
`fgkeras.export`). A `ModelManager` polls it (TF Serving's `--file_system_poll_wait_seconds`):

- the *aspired* versions are the latest `num_versions` (TF Serving's default policy, `latest {
  num_versions: 1 }`), or the listed `versions` (`specific { versions: ... }`), among the versions
  that may be served: a version with a model card (`assets.extra/model_card.json`, written by
  `fgkeras.export.push`) is served only when the card records a blessing; a version without a
  card (any other TF Serving export) is served as it is;
- an aspired version is loaded, warmed up with its `assets.extra/tf_serving_warmup_requests`
  (every request must succeed, or the version is not served), and then made available with one
  swap of the version table; requests already running keep the servable they started with;
- a version that is no longer aspired is taken out of the table once an aspired one is available
  (TF Serving's availability-preserving policy), and released when its last request has ended.
"""

import contextlib
import dataclasses
import logging
import numbers
import os
import threading
import time

from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

from fgkeras.serving.signatures import SavedModelSignature
from fgkeras.serving.status import ServingError, failed_precondition, invalid_argument, not_found

logger = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State


@dataclasses.dataclass
class VersionStatus:
    """What happened to one version: its state and, for a failed load, the reason."""

    version: int
    state: int = State.START
    error: str = ""
    attempts: int = 0


class Servable:
    """One loaded version of a model.

    Attributes:
        name, version, path: which model version this is.
        signatures: `{key: Signature}` that Predict answers.
        signature_defs: `{key: SignatureDef}` as GetModelMetadata reports them (the SavedModel's,
            with the server's own signatures in place of the SavedModel's of the same key).
    """

    def __init__(self, name, version, path, loaded, signatures, signature_defs):
        self.name = name
        self.version = version
        self.path = path
        self.loaded = loaded
        self.signatures = signatures
        self.signature_defs = signature_defs
        self.in_flight = 0
        self.warmup_requests = 0

    def signature(self, key):
        """The signature `key` (empty: `serving_default`), or FAILED_PRECONDITION as TF Serving answers."""
        key = key or "serving_default"
        signature = self.signatures.get(key)
        if signature is None:
            raise failed_precondition(f'Serving signature key "{key}" not found.')
        return signature

    def signature_def_map(self):
        """The `SignatureDefMap` of GetModelMetadata's `signature_def` field."""
        result = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in self.signature_defs.items():
            result.signature_def[key].CopyFrom(signature_def)
        return result

    def __repr__(self):
        return f"Servable({self.name!r}, version={self.version})"


def read_signature_defs(path, tags=("serve",)):
    """`({key: SignatureDef}, op names)` of the meta graph with `tags` in `path/saved_model.pb`."""
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    for meta_graph in proto.meta_graphs:
        if set(tags) <= set(meta_graph.meta_info_def.tags):
            ops = {op.name for op in meta_graph.meta_info_def.stripped_op_list.op}
            return dict(meta_graph.signature_def), ops
    raise ValueError(f"{path} has no meta graph tagged {list(tags)}")


class ModelManager:
    """Loads, serves and unloads the versions of one model (see the module docstring).

    Args:
        base_path: `saved_models/<name>`: integer version directories.
        name: the model name clients put in `model_spec.name`.
        num_versions: serve the latest this many versions (when `versions` is None).
        versions: serve exactly these versions (TF Serving's `specific` policy), or None.
        poll_seconds: how often `base_path` is checked for new versions (0: never, after start).
        extend_signatures: `extend_signatures(servable) -> {key: Signature}`: signatures the server
            adds to (or replaces in) every version, e.g. the live `search`; may raise to refuse a
            version.
        on_release: `on_release(servable)`, called when a version is unloaded (its last request
            ended), before its signatures are dropped.
        limits: the server's `Limits` (the warm-up requests are checked against them too).
        warmup: replay `assets.extra/tf_serving_warmup_requests` before serving a version.
        max_load_attempts: a version that fails to load this many times is given up.
        unload_timeout: seconds a retired version waits for its in-flight requests.
    """

    def __init__(self, base_path, name, limits, num_versions=1, versions=None, poll_seconds=1.0,
                 extend_signatures=None, on_release=None, warmup=True, max_load_attempts=3, unload_timeout=60.0):
        if isinstance(num_versions, bool) or not isinstance(num_versions, int) or num_versions < 1:
            raise ValueError(f"`num_versions` must be a positive int. Received: num_versions={num_versions!r}")
        if versions is not None:
            received, versions = versions, list(versions)
            if not versions or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                       and 0 <= v < 2 ** 63 for v in versions):
                raise ValueError(f"`versions` must be version numbers (ints in [0, 2^63)). Received: "
                                 f"versions={received!r}")
            versions = sorted({int(v) for v in versions})
        if poll_seconds < 0:
            raise ValueError(f"`poll_seconds` must be >= 0. Received: poll_seconds={poll_seconds!r}")
        self.base_path = os.path.abspath(os.fspath(base_path))
        self.name = name
        self.limits = limits
        self.num_versions = num_versions
        self.versions = versions
        self.poll_seconds = poll_seconds
        self.warmup = warmup
        self.max_load_attempts = max_load_attempts
        self.unload_timeout = unload_timeout
        self._extend_signatures = extend_signatures
        self._on_release = on_release
        self._cond = threading.Condition(threading.Lock())
        self._available = {}      # version -> Servable; replaced as a whole, never changed in place
        self._latest = None
        self._status = {}         # version -> VersionStatus
        self._blessed = set()
        self._refused = set()     # unblessed versions already reported
        self._ignored_names = set()  # numeric directory names that are not versions, already reported
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    # ------------------------------------------------------------------ lifecycle

    def start(self):
        """Loads the aspired versions now, then polls for changes in a background thread.

        Raises:
            ValueError: no version could be made available; the message says why.
        """
        self.poll_once()
        if not self._available:
            raise ValueError(f"No version of model {self.name!r} could be served from {self.base_path}: "
                             f"{self._why_none()}")
        if self.poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name=f"fgkeras-models-{self.name}", daemon=True)
            self._thread.start()
        return self

    def close(self):
        """Stops polling and releases every version."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            retired, self._available, self._latest = list(self._available.values()), {}, None
        for servable in retired:
            self._release(servable)

    # ------------------------------------------------------------------ requests

    @contextlib.contextmanager
    def acquire(self, model_spec):
        """The servable a `ModelSpec` asks for; it is not unloaded before the block ends.

        Raises:
            ServingError: NOT_FOUND for another model's name or an unavailable version,
                INVALID_ARGUMENT for a version label (this server has none), with TF Serving's messages.
        """
        servable = self._resolve(model_spec)
        try:
            yield servable
        finally:
            with self._cond:
                servable.in_flight -= 1
                if servable.in_flight == 0:
                    self._cond.notify_all()

    def _resolve(self, model_spec):
        # TF Serving's order: a label is resolved first (an unknown one is INVALID_ARGUMENT, whatever
        # the name), then the (name, version) servable is looked up.
        if model_spec.version_label and not model_spec.HasField("version"):
            raise invalid_argument(f"Unrecognized servable version label: {model_spec.version_label}")
        name = model_spec.name or self.name  # an empty name is this server's only model
        pinned = model_spec.HasField("version")
        request = f"Specific({name}, {model_spec.version.value})" if pinned else f"Latest({name})"
        if name != self.name:
            raise not_found(f"Servable not found for request: {request}")
        with self._cond:
            servable = self._available.get(model_spec.version.value) if pinned else self._latest
            if servable is None:
                raise not_found(f"Servable not found for request: {request}")
            servable.in_flight += 1
            return servable

    def status(self, model_spec):
        """`[VersionStatus]` for GetModelStatus: every version seen, or the one asked for.

        Raises:
            ServingError: NOT_FOUND (an unknown model or version) or INVALID_ARGUMENT (a version
                label), with TF Serving's messages.
        """
        name = model_spec.name or self.name
        if model_spec.version_label and not model_spec.HasField("version"):
            raise invalid_argument(f"Unrecognized servable version label: {model_spec.version_label}")
        with self._cond:
            statuses = [dataclasses.replace(s) for _, s in sorted(self._status.items())] if name == self.name else []
        if model_spec.HasField("version"):
            statuses = [s for s in statuses if s.version == model_spec.version.value]
            if not statuses:
                raise not_found(f"Could not find version {model_spec.version.value} of model {name}")
        if not statuses:
            raise not_found(f"Could not find any versions of model {name}")
        return statuses

    @property
    def available_versions(self):
        with self._cond:
            return sorted(self._available)

    def latest(self):
        """The servable of the latest available version (not held: for reading its metadata)."""
        with self._cond:
            return self._latest

    # ------------------------------------------------------------------ versions

    def poll_once(self):
        """Loads the aspired versions that are not loaded and retires the others."""
        with self._poll_lock:
            aspired = self._aspired()
            for version in sorted(aspired - set(self.available_versions), reverse=True):
                status = self._status.setdefault(version, VersionStatus(version))
                if status.state == State.END and status.attempts >= self.max_load_attempts:
                    continue  # given up (the reason is in its status)
                self._load(version, status)
            available = set(self.available_versions)
            if available & aspired:
                for version in sorted(available - aspired):
                    self._retire(version)

    def _aspired(self):
        from fgkeras.export import list_versions

        on_disk = [v for v in list_versions(self.base_path, self._ignored_names) if self._may_serve(v)]
        if self.versions is not None:
            return set(on_disk) & set(self.versions)
        return set(on_disk[-self.num_versions:])

    def _may_serve(self, version):
        """False for a version whose model card records no blessing."""
        if version in self._blessed:
            return True
        from fgkeras.export import read_model_card

        path = os.path.join(self.base_path, str(version))
        try:
            card = read_model_card(path)
        except (OSError, ValueError) as error:  # being written, or damaged: not servable for now
            logger.warning("version %d of %r: unreadable model card (%s); not serving it", version, self.name, error)
            return False
        if card is not None and not card.get("blessing"):
            if version not in self._refused:
                self._refused.add(version)
                logger.warning("version %d of %r has a model card without a blessing: not serving it", version,
                               self.name)
            return False
        self._blessed.add(version)
        return True

    def _load(self, version, status):
        path = os.path.join(self.base_path, str(version))
        status.state, status.error = State.LOADING, ""
        status.attempts += 1
        started = time.monotonic()
        try:
            servable = self.load_servable(version, path)
        except Exception as error:  # any failure keeps the server on its current versions
            status.state, status.error = State.END, _one_line(error)
            logger.error("version %d of %r failed to load (attempt %d of %d): %s", version, self.name,
                         status.attempts, self.max_load_attempts, status.error)
            return
        with self._cond:
            available = dict(self._available)
            available[version] = servable
            self._available = available
            self._latest = available[max(available)]
            status.state, status.attempts = State.AVAILABLE, 0
        logger.info("version %d of %r is available (loaded and warmed up with %d requests in %.1f s)",
                    version, self.name, servable.warmup_requests, time.monotonic() - started)

    def load_servable(self, version, path):
        """Loads, checks and warms up one version; raises on any failure."""
        import tensorflow as tf

        signature_defs, ops = read_signature_defs(path)
        if any(op.startswith("Scann>") for op in ops):
            import scann  # noqa: F401  (registers the ScaNN ops the SavedModel uses)
        loaded = tf.saved_model.load(path, tags=["serve"])
        signatures = {key: SavedModelSignature(key, signature_defs[key], function)
                      for key, function in loaded.signatures.items() if key in signature_defs}
        servable = Servable(self.name, version, path, loaded, signatures, dict(signature_defs))
        if self._extend_signatures is not None:
            extra = self._extend_signatures(servable)
            servable.signatures.update(extra)
            servable.signature_defs.update({key: s.signature_def for key, s in extra.items()})
        if self.warmup:
            self._warm_up(servable)
        return servable

    def _warm_up(self, servable):
        from fgkeras.export.serving_layout import ASSETS_EXTRA, WARMUP_FILE, read_warmup_requests

        if not os.path.exists(os.path.join(servable.path, ASSETS_EXTRA, WARMUP_FILE)):
            return
        for number, log in enumerate(read_warmup_requests(servable.path)[:1000]):
            if not log.HasField("predict_log"):
                raise ValueError(f"warmup record {number} is not a PredictLog (only Predict is served)")
            request = log.predict_log.request
            try:
                signature = servable.signature(request.model_spec.signature_name)
                payload, _ = signature.parse(request.inputs, self.limits)
                signature.run_many([payload])
            except ServingError as error:
                raise ValueError(f"warmup request {number} failed: {error.message}") from None
            servable.warmup_requests += 1

    def _retire(self, version):
        with self._cond:
            servable = self._available.get(version)
            if servable is None:
                return
            available = dict(self._available)
            del available[version]
            self._available = available
            self._latest = available[max(available)] if available else None
            self._status[version].state = State.UNLOADING
        self._release(servable)

    def _release(self, servable):
        with self._cond:
            drained = self._cond.wait_for(lambda: servable.in_flight == 0, timeout=self.unload_timeout)
            if not drained:
                logger.warning("version %d of %r: %d requests still running after %.0f s; unloading anyway",
                               servable.version, self.name, servable.in_flight, self.unload_timeout)
            status = self._status.get(servable.version)
            if status is not None:
                status.state = State.END
        if self._on_release is not None:
            try:
                self._on_release(servable)
            except Exception:  # unloading must go on; the hook's owner logs what it lost
                logger.exception("releasing version %d of %r: the release hook failed", servable.version, self.name)
        servable.loaded = None
        servable.signatures = {}
        logger.info("version %d of %r unloaded", servable.version, self.name)

    def _poll_loop(self):
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
            except Exception:  # the poller must survive a bad directory; the next poll retries
                logger.exception("polling %s failed", self.base_path)

    def _why_none(self):
        from fgkeras.export import list_versions

        versions = list_versions(self.base_path, self._ignored_names)
        if not versions:
            return "it holds no integer version directory"
        failures = [f"version {s.version}: {s.error}" for _, s in sorted(self._status.items()) if s.error]
        if failures:
            return "; ".join(failures)
        if self.versions is not None:
            return f"none of the versions {self.versions} is there (found {versions})"
        return f"no version is blessed (found {versions}; their model cards record no blessing)"


def _one_line(error):
    if isinstance(error, ServingError):
        return error.message
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:500]}"
