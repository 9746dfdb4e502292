"""The TF Serving layout: versions, warmup requests, a model card and a blessing gate.

```
saved_models/<name>/            the root that TF Serving watches (`--model_base_path`)
  1/ 2/ ...                     integer versions; TF Serving serves the highest
    saved_model.pb variables/
    assets.extra/
      tf_serving_warmup_requests   TFRecord of PredictionLog (PredictRequests)
      model_card.json model_card.md
  .staging-*/                   a version being written (TF Serving ignores non-integer names)
```

A version appears atomically: it is written (or copied) into a staging directory inside the
root, flushed to disk, and renamed to its number. Its folders and files get the modes the umask
gives new ones (0755 / 0644 under 022), whatever the candidate's, so that a TF Serving process
running as another user can read it. `push` is the gate of TFX's Evaluator +
Pusher: a candidate is promoted only if its metric is at least the serving version's (read from
that version's model card) minus a threshold; otherwise the refusal says why.
"""

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil

import numpy as np

from fgkeras._files import fsync_dir, fsync_tree, make_temp_dir

logger = logging.getLogger(__name__)

ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
MODEL_CARD_JSON = "model_card.json"
MODEL_CARD_MD = "model_card.md"
MODEL_CARD_FORMAT = "fgkeras-model-card/1"
STAGING_PREFIX = ".staging-"
_MAX_WARMUP_RECORDS = 1000  # TF Serving reads at most this many


# --- versions -------------------------------------------------------------------------------


def is_version_name(name):
    """True for a directory name that is a version number: `[0-9]+` in ASCII without leading zeros, below 2^63."""
    return name.isascii() and name.isdigit() and (name == "0" or name[0] != "0") and int(name) < 2 ** 63


def list_versions(root, ignored=None):
    """The versions under `root`, ascending: the directories named by a version number.

    A version's name is `[0-9]+` in ASCII without leading zeros ("0" is one), at most 2^63 - 1
    (`ModelSpec.version` is an int64), so `str(version)` is always its directory. Other entries
    are ignored, as TF Serving ignores what is not a version: `.staging-*` directories and files
    silently (logged at DEBUG), and directories whose name is numeric but not a version number
    (`007`, which TF Serving would serve as 7 beside a `7`; `²` or `٣`, digits to `str.isdigit`
    but not to a path) with a WARNING.

    Args:
        root: the model's base path.
        ignored: a set kept by a caller that lists the same root again and again (a poller): a
            numeric name is warned about only the first time it is added to it. None: every call.
    """
    if not os.path.isdir(root):
        return []
    versions = []
    for entry in os.listdir(root):
        if not os.path.isdir(os.path.join(root, entry)):
            continue
        if is_version_name(entry):
            versions.append(int(entry))
        elif entry.isnumeric() and (ignored is None or entry not in ignored):
            if ignored is not None:
                ignored.add(entry)
            logger.warning("%s: ignoring the directory %r: a version is named by a decimal number without "
                           "leading zeros, below 2^63", root, entry)
        else:
            logger.debug("%s: %r is not a version directory", root, entry)
    return sorted(versions)


def latest_version(root, ignored=None):
    """The highest version under `root` (the one TF Serving serves), or None (see `list_versions`)."""
    versions = list_versions(root, ignored)
    return versions[-1] if versions else None


def next_version(root):
    """One more than the highest version under `root` (1 for an empty or missing root)."""
    return (latest_version(root) or 0) + 1


def version_dir(root, version):
    return os.path.join(root, str(int(version)))


def resolve_model_dir(model_dir):
    """`(name, version, path)` of `saved_models/<name>/<version>`, or of the latest version of
    `saved_models/<name>`."""
    model_dir = os.path.abspath(os.fspath(model_dir))
    if os.path.isfile(os.path.join(model_dir, "saved_model.pb")):
        base, version = os.path.split(model_dir)
        if not is_version_name(version):
            raise ValueError(f"`model_dir` must be saved_models/<name>/<version> with an integer version, or "
                             f"saved_models/<name>. Received: model_dir={model_dir!r}")
        return os.path.basename(base), int(version), model_dir
    versions = list_versions(model_dir) if os.path.isdir(model_dir) else []
    if not versions:
        raise ValueError(f"`model_dir` holds no SavedModel and no integer version directory. "
                         f"Received: model_dir={model_dir!r}")
    return os.path.basename(model_dir), versions[-1], os.path.join(model_dir, str(versions[-1]))


# --- warmup requests ------------------------------------------------------------------------


def sample_encoded_images(num_images=2, seed=0):
    """A few tiny, valid encoded images (alternately PNG and JPEG, of different sizes)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    encoded = []
    for i in range(num_images):
        height, width = (24, 40) if i % 2 == 0 else (40, 24)
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        encode = tf.io.encode_png if i % 2 == 0 else tf.io.encode_jpeg
        encoded.append(encode(pixels).numpy())
    return encoded


def warmup_requests(signatures, model_name="", num_images=2, batch_sizes=(1, 2), seed=0):
    """PredictionLogs of PredictRequests for every signature of an export.

    Args:
        signatures: `signature_summary(export_dir)`: names, dtypes and shapes of the inputs.
        model_name: written into each request's `model_spec.name` (TF Serving's warmup
            ignores it; clients replaying the file may use it).
        num_images: tiny images per request at most.
        batch_sizes: one request per signature and batch size.
    Returns:
        A list of `prediction_log_pb2.PredictionLog`.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    encoded = sample_encoded_images(max(num_images, max(batch_sizes)), seed=seed)
    logs = []
    for name, spec in sorted(signatures.items()):
        for batch_size in batch_sizes:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = name
            for key, tensor in spec["inputs"].items():
                value = _sample_input(tensor, encoded[:batch_size], batch_size, seed)
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            logs.append(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)))
    if len(logs) > _MAX_WARMUP_RECORDS:
        raise ValueError(f"TF Serving reads at most {_MAX_WARMUP_RECORDS} warmup records; got {len(logs)}")
    return logs


def _sample_input(tensor, encoded, batch_size, seed):
    dtype, shape = tensor["dtype"], tensor["shape"]
    if dtype == "string" and len(shape) == 1:
        return np.array(encoded, dtype=object)
    if dtype == "uint8" and len(shape) == 4:
        shape = [batch_size] + [d if d > 0 else 1 for d in shape[1:]]
        return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    raise ValueError(f"No warmup input for a {dtype} tensor of shape {shape}")


def write_warmup_requests(export_dir, model_name="", **kwargs):
    """Writes `assets.extra/tf_serving_warmup_requests` for every signature of the export.

    Returns:
        The path of the file (a TFRecord of serialized `PredictionLog`s).
    """
    import tensorflow as tf

    from fgkeras.export.saved_model import signature_summary

    logs = warmup_requests(signature_summary(export_dir), model_name=model_name, **kwargs)
    path = os.path.join(export_dir, ASSETS_EXTRA, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(export_dir):
    """The `PredictionLog`s of an export's warmup file (parsed: a corrupt file raises)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(export_dir, ASSETS_EXTRA, WARMUP_FILE)
    logs = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record)
        logs.append(log)
    return logs


# --- model card -----------------------------------------------------------------------------


def library_versions():
    """Versions of the software an export was made with."""
    import keras
    import tensorflow as tf

    import fgkeras

    versions = {"fgkeras": fgkeras.__version__, "tensorflow": tf.__version__,
                "keras": keras.__version__, "python": platform.python_version()}
    try:
        versions["scann"] = importlib.metadata.version("scann")
    except importlib.metadata.PackageNotFoundError:
        pass
    return versions


def build_model_card(export_dir, name, metrics=None, data=None, config=None, model=None, notes=""):
    """The model card of an export as a dict (see `write_model_card`)."""
    from fgkeras.export.saved_model import signature_summary

    return {
        "format": MODEL_CARD_FORMAT,
        "name": name,
        "version": None,  # set when the version is pushed
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": _jsonable(model or {}),
        "data": _jsonable(data or {}),
        "config": _jsonable(config or {}),
        "metrics": {key: float(value) for key, value in (metrics or {}).items()},
        "signatures": signature_summary(export_dir),
        "versions": library_versions(),
        "notes": notes,
        "blessing": None,
    }


def write_model_card(export_dir, card):
    """Writes `assets.extra/model_card.json` and `model_card.md`; returns the JSON path."""
    directory = os.path.join(export_dir, ASSETS_EXTRA)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MODEL_CARD_JSON)
    with open(path, "w") as f:
        json.dump(card, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(directory, MODEL_CARD_MD), "w") as f:
        f.write(model_card_markdown(card))
    return path


def read_model_card(export_dir):
    """The model card dict of an export, or None when it has none."""
    path = os.path.join(export_dir, ASSETS_EXTRA, MODEL_CARD_JSON)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def model_card_markdown(card):
    """A readable Markdown rendering of a model card."""
    lines = [f"# Model card: {card.get('name')} (version {card.get('version') or 'unpushed'})", "",
             f"Created {card.get('created')}.", ""]
    if card.get("notes"):
        lines += [card["notes"], ""]
    lines += ["## Metrics", ""]
    metrics = card.get("metrics") or {}
    lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
    if not metrics:
        lines = lines[:-2] + ["No metrics recorded."]
    blessing = card.get("blessing")
    if blessing:
        lines += ["", "## Blessing", "", blessing.get("reason", "")]
    lines += ["", "## Signatures", "", "| signature | inputs | outputs |", "|---|---|---|"]
    for name, spec in sorted((card.get("signatures") or {}).items()):
        lines.append(f"| `{name}` | {_tensors_md(spec['inputs'])} | {_tensors_md(spec['outputs'])} |")
    for title, key in (("Model", "model"), ("Data", "data"), ("Configuration", "config"), ("Versions", "versions")):
        lines += ["", f"## {title}", "", "```json", json.dumps(card.get(key) or {}, indent=2, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def _tensors_md(tensors):
    return ", ".join(f"`{k}` {t['dtype']} {[d if d >= 0 else None for d in t['shape']]}" for k, t in tensors.items())


def _jsonable(value):
    """Config dataclasses, numpy scalars and arrays → JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# --- blessing gate and push -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PushResult:
    """What `push` did.

    Attributes:
        pushed: True when the candidate became a new version.
        version: the new version (pushed) or the serving one (refused; None if there is none).
        reason: one sentence saying why.
        path: the new version's directory when pushed, else None.
        candidate_value: the candidate's metric.
        baseline_value: the serving version's metric, or None.
    """

    pushed: bool
    version: int | None
    reason: str
    path: str | None = None
    candidate_value: float | None = None
    baseline_value: float | None = None

    def __bool__(self):
        return self.pushed


def bless(candidate_metrics, baseline_card, metric="recall@1", threshold=0.0, greater_is_better=True):
    """The gate alone: `(blessed, reason, candidate_value, baseline_value)`.

    Blessed when there is no serving version, or when the candidate's `metric` is at least
    the serving one minus `threshold` (plus, when `greater_is_better=False`).
    """
    if threshold < 0 or not math.isfinite(threshold):
        raise ValueError(f"`threshold` must be a finite number >= 0. Received: threshold={threshold}")
    if metric not in (candidate_metrics or {}):
        raise ValueError(
            f"The candidate has no {metric!r} metric to be judged on. "
            f"Its metrics: {sorted(candidate_metrics or {})}"
        )
    value = float(candidate_metrics[metric])
    if not math.isfinite(value):
        return False, f"the candidate's {metric} is {value}, not a finite number", value, None
    if baseline_card is None:
        return True, f"no version is serving; the candidate ({metric}={value:.4f}) is the first", value, None
    baseline_version = baseline_card.get("version")
    baseline = (baseline_card.get("metrics") or {}).get(metric)
    if baseline is None:
        return (False, f"the serving version {baseline_version} has no {metric!r} in its model card, "
                       "so the candidate cannot be compared (pass force=True to push anyway)", value, None)
    baseline = float(baseline)
    if greater_is_better:
        ok, bound, relation = value >= baseline - threshold, baseline - threshold, ">="
    else:
        ok, bound, relation = value <= baseline + threshold, baseline + threshold, "<="
    comparison = (f"candidate {metric}={value:.4f} vs serving version {baseline_version} "
                  f"{metric}={baseline:.4f} (threshold {threshold:g}: needs {relation} {bound:.4f})")
    if ok:
        return True, f"blessed: {comparison}", value, baseline
    return False, f"not blessed: {comparison}", value, baseline


def push(candidate_dir, root, metrics=None, metric="recall@1", threshold=0.0, greater_is_better=True,
         force=False, name=None):
    """Pushes a candidate export as the next version of `root` if the gate blesses it.

    The candidate is copied into a staging directory inside `root`, flushed, and renamed to
    its version number, so TF Serving never sees a half-written version. The candidate
    directory itself is left as it is.

    Args:
        candidate_dir: a SavedModel directory (usually with a model card from `write_model_card`).
        root: the model's base path, `saved_models/<name>`.
        metrics: the candidate's evaluation; default: the metrics of its model card. Given
            metrics are written into the pushed version's card (the next push compares with them).
        metric: the metric the gate compares.
        threshold: how much worse than the serving version the candidate may be (>= 0).
        greater_is_better: False for metrics where lower is better.
        force: push even when the gate refuses (the card records that it was forced).
        name: the model name for a card created here when the candidate has none
            (default: the root's directory name).
    Returns:
        A `PushResult`.
    """
    if not os.path.isfile(os.path.join(candidate_dir, "saved_model.pb")):
        raise ValueError(f"`candidate_dir` must be a SavedModel directory. Received: {candidate_dir!r}")
    card = read_model_card(candidate_dir)
    if card is None:
        card = build_model_card(candidate_dir, name or os.path.basename(os.path.normpath(root)))
    if metrics is not None:
        card["metrics"] = {key: float(value) for key, value in metrics.items()}
    os.makedirs(root, exist_ok=True)
    staging = make_temp_dir(root, STAGING_PREFIX)
    try:
        shutil.copytree(candidate_dir, staging, dirs_exist_ok=True)  # keeps the candidate's modes
        return _gate_and_promote(staging, root, card, metric, threshold, greater_is_better, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def serving_card(root):
    """The model card of the serving (latest) version of `root`, its "version" set; None when no
    version is serving. A version without a card gives no metrics. What `bless` judges against."""
    serving = latest_version(root)
    if serving is None:
        return None
    card = read_model_card(version_dir(root, serving)) or {"metrics": {}}
    card["version"] = serving
    return card


def _gate_and_promote(staging, root, card, metric, threshold, greater_is_better, force):
    """Judges the staged export against the serving version; renames it into place if blessed."""
    serving = latest_version(root)
    baseline_card = serving_card(root)
    blessed, reason, value, baseline = bless(card["metrics"], baseline_card, metric, threshold, greater_is_better)
    if not blessed and not force:
        logger.info("push refused: %s", reason)
        return PushResult(False, serving, reason, candidate_value=value, baseline_value=baseline)
    if not blessed:
        reason = f"forced push; the gate said {reason}"
    for _ in range(100):  # another pusher may take a number between our choice and our rename
        version = next_version(root)
        card.update(version=version, blessing={
            "metric": metric, "threshold": threshold, "greater_is_better": greater_is_better,
            "baseline_version": serving, "baseline_value": baseline, "candidate_value": value,
            "forced": bool(force and not blessed), "reason": reason,
        })
        write_model_card(staging, card)
        _make_readable(staging)
        fsync_tree(staging)
        target = version_dir(root, version)
        try:
            os.rename(staging, target)
        except OSError:
            if os.path.isdir(target):
                continue
            raise
        fsync_dir(root)
        logger.info("pushed version %d: %s", version, reason)
        return PushResult(True, version, reason, path=target, candidate_value=value, baseline_value=baseline)
    raise RuntimeError(f"Could not claim a version number under {root!r}")


def export_and_push(embedder, root, image_size, metrics, index=None, k=10, flavour="exact",
                    name=None, data=None, config=None, metric="recall@1", threshold=0.0,
                    greater_is_better=True, force=False, warmup=True, notes=""):
    """Exports the embedder (or embedder + index) with warmup and model card, then `push`es it.

    The export is written straight into a staging directory of `root` and renamed into
    place only when blessed; a refused candidate leaves nothing behind.

    Args:
        embedder: an `fgkeras.models.Embedder`.
        root: `saved_models/<name>`.
        image_size: S, as in training.
        metrics: the candidate's evaluation (e.g. `retrieval_metrics(...)`); recorded in the card.
        index: an index (`.embeddings`, `.ids`) to add the `search` signature, or None.
        k, flavour: of the `search` signature (see `export_retrieval`).
        name: the model name (default: the root's directory name).
        data, config: what the model was trained and evaluated on, for the card (dicts,
            dataclasses or objects with `to_dict`).
        metric, threshold, greater_is_better, force: the gate (see `push`).
        warmup: write `assets.extra/tf_serving_warmup_requests`.
        notes: free text for the card.
    Returns:
        A `PushResult`.
    """
    name = name or os.path.basename(os.path.normpath(root))
    if not force:  # a candidate the gate refuses now is not worth exporting (judged again after)
        blessed, reason, value, baseline = bless(metrics, serving_card(root), metric, threshold, greater_is_better)
        if not blessed:
            logger.info("push refused: %s", reason)
            return PushResult(False, latest_version(root), reason, candidate_value=value, baseline_value=baseline)
    os.makedirs(root, exist_ok=True)
    staging = make_temp_dir(root, STAGING_PREFIX)
    try:
        card = export_candidate(embedder, staging, image_size, metrics, index=index, k=k, flavour=flavour, name=name,
                                data=data, config=config, warmup=warmup, notes=notes)
        return _gate_and_promote(staging, root, card, metric, threshold, greater_is_better, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_candidate(embedder, path, image_size, metrics, index=None, k=10, flavour="exact", name="fgkeras",
                     data=None, config=None, warmup=True, notes=""):
    """Writes an unpushed candidate at `path`: the SavedModel (embedder, or embedder + index), its warmup
    requests and its model card (version None, not blessed). `push` promotes it; `export_and_push` does both.

    Args: as for `export_and_push`; `name` is the model name the card and the warmup requests carry.
    Returns:
        the model card (a dict), also written to `path/assets.extra/`.
    """
    from fgkeras.export import saved_model

    model = {"kind": "embedder", "image_size": int(image_size),
             "embedding_dim": getattr(embedder, "embedding_dim", None),
             "class": type(embedder).__name__}
    if index is None:
        saved_model.export_embedder(embedder, path, image_size)
    else:
        saved_model.export_retrieval(embedder, index, path, image_size, k=k, flavour=flavour)
        model.update(kind="retrieval", flavour=flavour, index_size=len(index.ids), index_class=type(index).__name__,
                     k=saved_model.retrieval_signature_k(path))
        settings = getattr(index, "config", None)
        if flavour == "scann" and isinstance(settings, dict):
            model["index_config"] = settings
    if warmup:
        write_warmup_requests(path, model_name=name)
    card = build_model_card(path, name, metrics=metrics, data=data, config=config, model=model, notes=notes)
    write_model_card(path, card)
    return card


def _make_readable(directory):
    """Gives the folders and files under `directory` the modes the umask gives new ones (0755 and 0644
    under 022), so that a TF Serving process running as another user can read the version, whatever
    the modes of the candidate it was copied from."""
    umask = os.umask(0)
    os.umask(umask)
    for parent, _, files in os.walk(directory):
        os.chmod(parent, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~umask)
