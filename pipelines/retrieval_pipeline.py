"""The retrieval pipeline, TFX-style without TFX: ingest → train → evaluate → bless → export →
embed gallery → index → push (issue 15).

```
fgkeras pipeline run demo --root runs/pipeline [--serving-root DIR] [--set train.epochs=3] [--set pipeline.threshold=0.01]
```
or `run(config, root)`. Each step is the library code a command runs (`experiments.load_data`,
`experiments.train`, `experiments.evaluate`, `fgkeras.export.bless` / `export_candidate` / `push`,
`SavedModelEmbedder` or the Beam pipeline, `fgkeras.serving.indexing.build_version_index`), and
writes its artefact under `root/<step>/`:

| step | artefact | inputs (besides the upstream artefacts named) | TFX |
|---|---|---|---|
| `ingest` | `images/`, `train.csv`, `gallery.csv` | `data.*`; the source's files, by content | ExampleGen |
| `train` | `model.keras`, `embedder.keras`, `history.json` | ingest's train split; `data.image_size`, `data.augment`, `model.*`, `train.*`, `fggan.*`, `eval.batch_size` | Trainer |
| `evaluate` | `metrics.json` (retrieval on the gallery's unseen classes) | ingest's gallery, train; `data.image_size`, `eval.batch_size` | Evaluator |
| `bless` | `blessing.json` (the decision) | evaluate; `pipeline.metric`, `pipeline.threshold`, the serving root | Evaluator's blessing |
| `export` | `<name>/0/`: the candidate SavedModel, warmup requests, model card | train, evaluate, bless; `data.image_size`, the name | Trainer's export |
| `embed_gallery` | `embeddings/`, `dead_letter/` (`pipelines.embedding_records`) | ingest's gallery, export; `pipeline.batch_size`, `pipeline.num_shards`, Beam or in process | (BulkInferrer) |
| `index` | `index/` (an `fgkeras.index` index of the candidate's vectors) | embed_gallery, export; `pipeline.index_kind` | |
| `push` | `push.json`; at the serving root `saved_models/<name>/<v>/` and `indexes/<name>/<v>/` | export, index, bless; the serving root, the name | Pusher |

Each step directory holds a `manifest.json`: its inputs (config keys and values, upstream artefacts
and files with their SHA-256), the digest of those inputs, its outputs (every file with its size
and SHA-256, and their digest), the whole configuration, its metrics and its timings.

Re-run semantics:
- A step is skipped when its manifest records the digest of its current inputs and its artefact
  still has the digest the manifest recorded (for push: the version it pushed is still served).
  Otherwise it runs. A step that ran gives its readers a new input digest unless its artefact came
  out byte for byte the same, so a re-run starts at the first step whose inputs changed, and runs
  every later step that reads what changed.
- A step writes into a staging directory `root/.<step>.tmp-*`, fsyncs it with the manifest written
  last, then swaps it in with one atomic rename (`fgkeras._files.swap_in`): a step killed halfway
  leaves its staging directory (removed by the next run), never a `root/<step>/` that looks complete;
  the previous execution, if any, stays in place with the manifest of its own inputs.
- `bless` not blessing blocks the steps after it (status "blocked"); the root keeps one
  execution per step, the last.

Design decisions:
- `ingest` copies the splits (image files as they are; images in memory, such as the synthetic
  vehicles, as PNG) so that every later step reads a snapshot: a source file changed after ingest
  cannot change what train or the gallery see without ingest seeing it first.
- `blessing.json` holds the decision alone (blessed, metric, the candidate's value); the reason and
  the baseline go into the manifest. A new threshold that blesses as before re-runs `bless` only.
- `push` judges again with the same gate (`fgkeras.export.push`): a better version pushed at the
  serving root since `bless` ran is not overtaken.
- The candidate is version 0 (`export/<name>/0/`: `resolve_model_dir` and the Beam pipeline take
  `<name>/<version>`; pushed versions start at 1). `push` builds the served version's index with
  `build_version_index` (what `fgkeras index` runs) from the `index` step's vectors, so it records
  the served version, holds the items the inventory's log upserted, and `fgkeras serve` pairs it.
- `embed_gallery` uses the Beam pipeline (`pipelines.embed_gallery`, DirectRunner) when apache_beam
  imports (`pipeline.embedding=auto`), else the SavedModel in process; both write the same
  embedding and dead-letter files, and the manifest says which ran (Beam also writes index shards).
  Apache Beam needs protobuf < 7 and `fgkeras.serving` (the push step) protobuf 7, so on the pinned
  platform they live in two environments: `pipeline.beam_python` names the Beam environment's
  interpreter, and the step runs `python -m pipelines.embed_gallery` there (docs/scale_out.md).
- Code is not an input: after upgrading fgkeras, run in a new root (or delete the step directories
  to redo). One run per root at a time (`root/.lock`).
- `push` is the one step with an effect outside the root: a run killed after a version was renamed
  into place but before the push manifest was written pushes again on the next run (a new version,
  never a half-written one).
"""

import contextlib
import csv
import dataclasses
import datetime
import glob
import hashlib
import json
import logging
import os
import shutil
import time

from fgkeras import configs
from fgkeras._files import fsync_tree, make_temp_dir, swap_in

logger = logging.getLogger(__name__)

STEPS = ("ingest", "train", "evaluate", "bless", "export", "embed_gallery", "index", "push")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fgkeras-pipeline-step/1"
EMBEDDINGS = ("auto", "beam", "in_process")
INDEX_KINDS = ("exact", "scann")
CANDIDATE_VERSION = 0
TRAIN_CSV, GALLERY_CSV = "train.csv", "gallery.csv"
_CSV_COLUMNS = ("path", "class_id", "class_name", "split")
_OPTIONAL_COLUMNS = (("view", "views"), ("year", "years"), ("is_stock", "is_stock"))


@dataclasses.dataclass
class PipelineConfig:
    """The pipeline's own settings (`--set pipeline.<key>=<value>`, or a "pipeline" section of a JSON config).

    Args:
        name: the model name, `saved_models/<name>/` (empty: the experiment's name).
        metric, threshold: the blessing gate (`fgkeras.export.bless`): the candidate's `metric` must be
            at least the serving version's minus `threshold`.
        embedding: "auto" (the Beam pipeline when apache_beam imports, else in process), "beam" or
            "in_process".
        beam_python: the Python of an environment where Apache Beam imports (e.g. venv-beam/bin/python):
            the gallery is then embedded by the Beam pipeline run there (with "auto" or "beam").
        batch_size: images per call of the SavedModel when embedding the gallery.
        num_shards: index shards of the Beam pipeline.
        index_kind: "exact" or "scann".
    """

    name: str = ""
    metric: str = "recall@1"
    threshold: float = 0.0
    embedding: str = "auto"
    beam_python: str = ""
    batch_size: int = 64
    num_shards: int = 1
    index_kind: str = "exact"


@dataclasses.dataclass
class StepResult:
    """One step of a run: `status` is "ran", "skipped" (its inputs did not change) or "blocked"
    (the candidate was not blessed); `summary` its key figure; `manifest` what it recorded."""

    step: str
    status: str
    seconds: float
    summary: str
    manifest: dict | None = None


def load_config(name_or_path, assignments=(), smoke=False):
    """`(ExperimentConfig, PipelineConfig)` of an experiment name or a JSON file, shrunk by `smoke`, then
    with the dotted `assignments` applied: `pipeline.<key>=...` to the pipeline's, the others to the
    experiment's (`fgkeras.configs.override`)."""
    config = configs.load_config(name_or_path)
    settings = PipelineConfig()
    if str(name_or_path).lower().endswith(".json"):
        with open(name_or_path, encoding="utf-8") as f:
            section = json.load(f).get("pipeline", {})
        try:
            settings = PipelineConfig(**section)
        except TypeError as error:
            raise ValueError(f"{name_or_path!r}: bad \"pipeline\" section: {error}") from None
    if smoke:
        configs.smoke(config)
    ours = [a.removeprefix("pipeline.") for a in assignments if a.strip().startswith("pipeline.")]
    configs.override(config, [a for a in assignments if not a.strip().startswith("pipeline.")])
    configs.override(settings, ours)
    return config, settings


@dataclasses.dataclass
class _Context:
    config: object
    settings: PipelineConfig
    root: str
    serving_root: str
    verbose: object
    manifests: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self):
        return self.settings.name or self.config.name

    @property
    def models_root(self):
        return os.path.join(self.serving_root, "saved_models", self.name)

    def step_dir(self, step):
        return os.path.join(self.root, step)

    @property
    def candidate(self):
        return os.path.join(self.step_dir("export"), self.name, str(CANDIDATE_VERSION))


def run(config, root, settings=None, serving_root=None, verbose="auto"):
    """Runs the pipeline in `root`, skipping every step whose inputs did not change (module docstring).

    Args:
        config: an `ExperimentConfig` (a method with a retrieval embedder: not "viewgan").
        root: the pipeline root; created if missing.
        settings: a `PipelineConfig` (default: its defaults).
        serving_root: where `push` writes `saved_models/<name>/` and `indexes/<name>/` (default:
            `root/serving`).
        verbose: Keras's `verbose` for training.
    Returns:
        a `StepResult` per step of `STEPS`, in order.
    """
    settings = settings or PipelineConfig()
    _check(config, settings)
    root = os.path.abspath(os.fspath(root))
    os.makedirs(root, exist_ok=True)
    serving_root = os.path.abspath(os.fspath(serving_root) if serving_root else default_serving_root(root))
    context = _Context(config, settings, root, serving_root, verbose)
    results, blocked = [], False
    with _locked(root):
        _remove_staging(root)
        for number, step in enumerate(STEPS, 1):
            if blocked:
                results.append(StepResult(step, "blocked", 0.0, "not blessed"))
                continue
            results.append(_run_step(context, step, number))
            context.manifests[step] = results[-1].manifest
            blocked = step == "bless" and not results[-1].manifest["metrics"]["blessed"]
    return results


def format_summary(results):
    """A Markdown table of a run: step, status, seconds and the step's key figure."""
    rows = [("step", "status", "seconds", "result"), ("---",) * 4]
    rows += [(r.step, r.status, f"{r.seconds:.1f}", r.summary.replace("|", "/")) for r in results]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def default_serving_root(root):
    """`root/serving`: where `push` writes when no serving root is given."""
    return os.path.join(os.path.abspath(os.fspath(root)), "serving")


def served(results, serving_root):
    """`(model_dir, index_dir)` under `serving_root` of the version a run's push step pushed (in this run
    or an earlier one), or None when it pushed none."""
    push = results[-1].manifest if results and results[-1].step == "push" else None
    if push is None or not push["metrics"]["pushed"]:
        return None
    return (os.path.join(serving_root, push["metrics"]["saved_model"]),
            os.path.join(serving_root, push["metrics"]["index"]))


def read_manifest(directory):
    """The manifest of a step directory, or None when it has none (never complete)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --- running a step -----------------------------------------------------------------------------


def _run_step(context, step, number):
    start = time.perf_counter()
    inputs = _inputs(context, step)
    digest = _digest(inputs)
    directory = context.step_dir(step)
    manifest = read_manifest(directory)
    if (manifest is not None and manifest.get("format") == MANIFEST_FORMAT and manifest.get("inputs_digest") == digest
            and _listing_digest(_listing(directory)) == manifest["outputs"]["digest"]
            and _EXTERNAL_CHECKS.get(step, lambda context, manifest: True)(context, manifest)):
        logger.info("[%d/%d] %s: skipped, its inputs did not change (%s)", number, len(STEPS), step, manifest["summary"])
        return StepResult(step, "skipped", time.perf_counter() - start, manifest["summary"], manifest)
    logger.info("[%d/%d] %s: running", number, len(STEPS), step)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    staging = make_temp_dir(context.root, f".{step}.tmp-")
    try:
        metrics, summary = _RUNNERS[step](context, staging)
        listing = _listing(staging)
        seconds = time.perf_counter() - start
        manifest = {
            "format": MANIFEST_FORMAT, "step": step,
            "inputs": inputs, "inputs_digest": digest,
            "outputs": {"files": listing, "digest": _listing_digest(listing)},
            "config": {"experiment": context.config.to_dict(), "pipeline": dataclasses.asdict(context.settings)},
            "metrics": metrics, "summary": summary,
            "started": started, "seconds": round(seconds, 3),
        }
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:  # last: the step is complete
            json.dump(manifest, f, indent=2, sort_keys=True, default=float)
            f.write("\n")
        fsync_tree(staging)
        swap_in(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("[%d/%d] %s: ran in %.1f s (%s)", number, len(STEPS), step, seconds, summary)
    return StepResult(step, "ran", seconds, summary, manifest)


def _inputs(context, step):
    """What a step reads: config keys and their values, the upstream artefacts' digests, other things."""
    upstream, keys = _STEP_INPUTS[step]
    values = {"pipeline": {**dataclasses.asdict(context.settings), "name": context.name}, **context.config.to_dict()}
    inputs = {
        "config": {key: _lookup(values, key) for key in keys},
        "artefacts": {reference: _artefact_digest(context, reference) for reference in upstream},
    }
    if step == "ingest":
        inputs["files"] = _source_files(context.config.data)
    if step in ("bless", "push"):
        inputs["serving_root"] = _relative_to_root(context, context.serving_root)
    if step == "embed_gallery":
        inputs["embedding"] = _embedding_method(context.settings)
    return inputs


# Per step: the artefacts it reads ("step", or "step:part" for a part of one) and the config keys.
_STEP_INPUTS = {
    "ingest": ((), ("data",)),
    "train": (("ingest:train",), ("data.image_size", "data.augment", "model", "train", "fggan", "eval.batch_size")),
    "evaluate": (("ingest:gallery", "train"), ("data.image_size", "eval.batch_size")),
    "bless": (("evaluate",), ("pipeline.metric", "pipeline.threshold", "pipeline.name")),
    "export": (("train", "evaluate", "bless"), ("data.image_size", "pipeline.name")),
    "embed_gallery": (("ingest:gallery", "export"), ("pipeline.batch_size", "pipeline.num_shards")),
    "index": (("embed_gallery", "export"), ("pipeline.index_kind", "pipeline.name")),
    "push": (("export", "index", "bless"), ("pipeline.name",)),
}


# The parts of an artefact that steps read separately: (CSV, image folder) of each split of ingest's.
_PARTS = {"ingest": {"train": (TRAIN_CSV, "images/train/"), "gallery": (GALLERY_CSV, "images/gallery/")}}


def _artefact_digest(context, reference):
    """The digest of an upstream artefact, or of a part of it ("ingest:gallery": train does not read it)."""
    step, _, part = reference.partition(":")
    outputs = context.manifests[step]["outputs"]
    if not part:
        return outputs["digest"]
    csv_name, folder = _PARTS[step][part]
    return _listing_digest({relative: entry for relative, entry in outputs["files"].items()
                            if relative == csv_name or relative.startswith(folder)})


def _lookup(values, key):
    for part in key.split("."):
        values = values[part]
    return values


def _digest(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=float).encode()).hexdigest()


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listing(directory):
    """`{relative path: {"bytes", "sha256"}}` of every file under `directory` but the manifest."""
    listing = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            relative = os.path.relpath(path, directory).replace(os.sep, "/")
            if relative != MANIFEST:
                listing[relative] = {"bytes": os.path.getsize(path), "sha256": _file_sha256(path)}
    return dict(sorted(listing.items()))


def _listing_digest(listing):
    return _digest({relative: entry["sha256"] for relative, entry in listing.items()})


def _source_files(data):
    """`{path: sha256}` of the files a data source reads (none for the synthetic and TFDS sources)."""
    from fgkeras import data as fg_data

    if data.source == "csv":
        paths = [data.path, *fg_data.read_csv(data.path).paths]
    elif data.source == "folder":
        paths = list(fg_data.image_folder(data.path).paths)
    else:
        return {}
    return {os.path.abspath(str(path)): _file_sha256(path) for path in paths}


def _relative_to_root(context, path):
    relative = os.path.relpath(path, context.root)
    return path if relative.startswith("..") else relative


def _embedding_method(settings):
    """"in_process", "beam" (here) or "beam_python" (`pipeline.beam_python`'s environment)."""
    embedding = settings.embedding
    if embedding == "in_process":
        return embedding
    if settings.beam_python:
        return "beam_python"
    try:
        from pipelines import embed_gallery  # noqa: F401  (imports apache_beam)
    except ImportError as error:
        if embedding == "beam":
            raise ValueError(f"pipeline.embedding=beam needs Apache Beam, which does not import here: {error}. "
                             "See docs/scale_out.md for its environment") from None
        return "in_process"
    return "beam"


def _check(config, settings):
    if config.train.method == "viewgan":
        raise ValueError("The retrieval pipeline trains an embedder; ViewGAN has none (train.method=viewgan). "
                         "Use `fgkeras train --method viewgan`.")
    if settings.embedding not in EMBEDDINGS:
        raise ValueError(f"`pipeline.embedding` must be one of {EMBEDDINGS}. Received: {settings.embedding!r}")
    if settings.index_kind not in INDEX_KINDS:
        raise ValueError(f"`pipeline.index_kind` must be one of {INDEX_KINDS}. Received: {settings.index_kind!r}")
    for key in ("batch_size", "num_shards"):
        if getattr(settings, key) < 1:
            raise ValueError(f"`pipeline.{key}` must be >= 1. Received: {getattr(settings, key)}")


@contextlib.contextmanager
def _locked(root):
    import fcntl

    with open(os.path.join(root, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"Another pipeline run holds {root!r}: one run per root at a time") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_staging(root):
    """Removes what killed runs left: staging directories, never read."""
    for entry in os.listdir(root):
        if entry.startswith(".") and ".tmp-" in entry and os.path.isdir(os.path.join(root, entry)):
            logger.info("removing %s, left by a run that did not finish", entry)
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


# --- the steps: each writes into `out` and returns (metrics, summary) ---------------------------


def _ingest(context, out):
    from fgkeras import experiments

    train_set, gallery = experiments.load_data(context.config.data)
    _write_split(train_set, out, "train", TRAIN_CSV)
    _write_split(gallery, out, "gallery", GALLERY_CSV)
    metrics = {"train_images": len(train_set), "train_classes": len(train_set.classes),
               "gallery_images": len(gallery), "gallery_classes": len(gallery.classes)}
    return metrics, (f"{len(train_set)} train images of {len(train_set.classes)} classes, "
                     f"{len(gallery)} gallery images of {len(gallery.classes)}")


def _write_split(imageset, out, split, csv_name):
    """Writes the images of `imageset` under `out/images/<split>/` and `out/<csv_name>` (the CSV
    `fgkeras.data.read_csv` reads: path, class_id, class_name, split, and view, year, is_stock if known)."""
    from PIL import Image
    from tqdm.auto import tqdm

    optional = [(column, getattr(imageset, attribute)) for column, attribute in _OPTIONAL_COLUMNS
                if getattr(imageset, attribute) is not None]
    names = imageset.class_names
    rows = []
    for i in tqdm(range(len(imageset)), desc=f"ingesting {split}", unit="image", leave=False):
        label = int(imageset.labels[i])
        if imageset.images is not None:
            extension = ".png"
        else:
            extension = os.path.splitext(str(imageset.paths[i]))[1].lower()
        relative = f"images/{split}/{label:04d}/{i:06d}{extension}"
        target = os.path.join(out, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if imageset.images is not None:
            Image.fromarray(imageset.images[i]).save(target)
        else:
            shutil.copyfile(str(imageset.paths[i]), target)
        rows.append([relative, label, names[label] if names else str(label), split]
                    + [int(values[i]) for _, values in optional])
    with open(os.path.join(out, csv_name), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*_CSV_COLUMNS, *(column for column, _ in optional)])
        writer.writerows(rows)


def _read_split(context, split):
    from fgkeras import data as fg_data

    csv_name = TRAIN_CSV if split == "train" else GALLERY_CSV
    return fg_data.read_csv(os.path.join(context.step_dir("ingest"), csv_name), split=split)


def _load_embedder(context):
    import keras

    return keras.saving.load_model(os.path.join(context.step_dir("train"), "embedder.keras"))


def _train(context, out):
    from fgkeras import experiments

    config = context.config
    model, history = experiments.train(config, train_set=_read_split(context, "train").relabeled(),
                                       verbose=context.verbose)
    model.save(os.path.join(out, "model.keras"))
    experiments.save_embedder(model.embedder, out)
    figures = {key: [float(v) for v in values] for key, values in history.history.items()}
    with open(os.path.join(out, "history.json"), "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=2)
    metrics = {key: values[-1] for key, values in figures.items() if values}
    shown = next((key for key in ("val_recall@1", "loss", "f_loss") if key in metrics), None)
    summary = f"{config.train.method}, {len(next(iter(figures.values()), []))} epochs"
    return metrics, summary + (f", final {shown} {metrics[shown]:.3f}" if shown else "")


def _evaluate(context, out):
    from fgkeras import experiments

    metrics = experiments.evaluate(_load_embedder(context), _read_split(context, "gallery"), context.config)
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2, sort_keys=True, default=float)
    metric = context.settings.metric
    return metrics, f"{metric} {metrics[metric]:.3f}" if metric in metrics else f"{len(metrics)} metrics"


def _bless(context, out):
    from fgkeras import export

    metrics = context.manifests["evaluate"]["metrics"]
    baseline = export.serving_card(context.models_root)
    blessed, reason, value, baseline_value = export.bless(metrics, baseline, context.settings.metric,
                                                          context.settings.threshold)
    with open(os.path.join(out, "blessing.json"), "w", encoding="utf-8") as f:
        json.dump({"blessed": blessed, "metric": context.settings.metric, "candidate_value": value}, f, indent=2)
    return ({"blessed": blessed, "reason": reason, "candidate_value": value, "baseline_value": baseline_value,
             "baseline_version": baseline["version"] if baseline else None},
            "blessed" if blessed else f"not blessed: {reason}")


def _export(context, out):
    from fgkeras import export

    embedder = _load_embedder(context)
    path = os.path.join(out, context.name, str(CANDIDATE_VERSION))
    os.makedirs(path)
    config = context.config
    card = export.export_candidate(embedder, path, config.data.image_size, context.manifests["evaluate"]["metrics"],
                                   name=context.name, data=config.data, config=config)
    return ({"saved_model": os.path.relpath(path, out), "fingerprint": export.model_fingerprint(path),
             "embedding_dim": card["model"]["embedding_dim"]},
            f"{context.name}/{CANDIDATE_VERSION}: embedder on image bytes, {card['model']['embedding_dim']}-d")


def _embed_gallery(context, out):
    from fgkeras.data.sources import gallery_files
    from fgkeras.export.saved_model import SavedModelEmbedder
    from pipelines import embedding_records

    images = os.path.join(context.step_dir("ingest"), GALLERY_CSV)
    settings = context.settings
    method = _embedding_method(settings)
    if method == "beam_python":
        embedded, dead = _embed_in_beam_environment(context, images, out)
    elif method == "beam":
        from pipelines import embed_gallery

        report = embed_gallery.run(context.candidate, images, out, kind="exact", num_shards=settings.num_shards,
                                   batch_size=settings.batch_size)
        embedded, dead = report.embedded, [(item["path"], item["reason"]) for item in report.dead_letter_records]
    else:
        ids, vectors, dead = SavedModelEmbedder(context.candidate, settings.batch_size).embed_files(
            gallery_files(images))
        if vectors is None:
            raise ValueError(f"No image of the gallery {images} could be embedded")
        embedding_records.write_local(out, ids, vectors, dead)
        embedded = len(ids)
    metrics = {"method": method, "embedded": embedded, "dead_letters": len(dead)}
    shown = {"in_process": "in process", "beam": "Beam", "beam_python": "Beam, in pipeline.beam_python"}[method]
    return metrics, f"{embedded} images ({shown}), {len(dead)} dead letters"


def _embed_in_beam_environment(context, images, out):
    """Runs `python -m pipelines.embed_gallery` with `pipeline.beam_python`; `(embedded, dead letters)`."""
    import subprocess

    from pipelines import embedding_records

    settings = context.settings
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    command = [settings.beam_python, "-m", "pipelines.embed_gallery", "--model", context.candidate, "--images", images,
               "--out", out, "--index", "exact", "--num_shards", str(settings.num_shards),
               "--batch_size", str(settings.batch_size)]
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    if finished.returncode != 0:
        raise RuntimeError(f"The Beam pipeline failed ({' '.join(command)}, exit {finished.returncode}):\n"
                           f"{finished.stderr[-3000:]}")
    files = sorted(glob.glob(os.path.join(out, embedding_records.EMBEDDINGS_DIR, "embeddings-*.tfrecord")))
    ids, _ = embedding_records.read_embedding_files(files)
    dead = []
    for path in sorted(glob.glob(os.path.join(out, embedding_records.DEAD_LETTER_DIR, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            dead += [(record["path"], record["reason"]) for record in map(json.loads, filter(str.strip, f))]
    return len(ids), dead


def _index(context, out):
    from fgkeras.export import model_record
    from fgkeras.index import Index
    from pipelines import embedding_records

    files = sorted(glob.glob(os.path.join(context.step_dir("embed_gallery"), embedding_records.EMBEDDINGS_DIR,
                                          "embeddings-*.tfrecord")))
    ids, vectors = embedding_records.read_embedding_files(files)
    index = Index.of_kind(context.settings.index_kind).build(vectors, ids)
    index.metadata = {"model": model_record(context.candidate, context.name, CANDIDATE_VERSION), "log_seq": 0,
                      "gallery": os.path.join("ingest", GALLERY_CSV)}
    index.save(os.path.join(out, "index"))
    return {"kind": index.kind, "count": len(index)}, f"{index.kind}, {len(index)} items"


def _push(context, out):
    from fgkeras import export
    from fgkeras.index import Index
    from fgkeras.serving.indexing import build_version_index

    settings = context.settings
    result = export.push(context.candidate, context.models_root, metric=settings.metric, threshold=settings.threshold)
    record = {"pushed": result.pushed, "version": result.version, "reason": result.reason}
    if result.pushed:
        index = Index.load(os.path.join(context.step_dir("index"), "index"))
        report = build_version_index(result.path, index.ids.tolist(), index.embeddings, kind=index.kind,
                                     gallery=os.path.join(context.step_dir("ingest"), GALLERY_CSV))
        record.update(saved_model=os.path.relpath(result.path, context.serving_root),
                      index=os.path.relpath(report.path, context.serving_root),
                      fingerprint=report.model["fingerprint"], index_items=report.count)
    with open(os.path.join(out, "push.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return record, f"version {result.version} pushed" if result.pushed else f"refused: {result.reason}"


def _pushed_version_is_there(context, manifest):
    """The version a push manifest records is still at the serving root, with its index."""
    record = manifest["metrics"]
    if not record["pushed"]:
        return True
    from fgkeras.export import model_fingerprint

    model_dir = os.path.join(context.serving_root, record["saved_model"])
    return (os.path.isfile(os.path.join(model_dir, "saved_model.pb"))
            and model_fingerprint(model_dir) == record["fingerprint"]
            and os.path.isfile(os.path.join(context.serving_root, record["index"], MANIFEST)))


_RUNNERS = {"ingest": _ingest, "train": _train, "evaluate": _evaluate, "bless": _bless, "export": _export,
            "embed_gallery": _embed_gallery, "index": _index, "push": _push}
_EXTERNAL_CHECKS = {"push": _pushed_version_is_there}
