"""Embeds a gallery with an exported SavedModel and builds its index, as an Apache Beam pipeline (issue 15).

```
python -m pipelines.embed_gallery --model saved_models/cars/3 --images photos/ --out runs/cars-3 \
    [--index exact|scann] [--num_shards 4] [--batch_size 64] [Beam options: --runner, --direct_num_workers ...]
```

images (an image folder or a CSV of paths, with the ids `fgkeras index` gives them; or TFRecords of
`tf.train.Example`s holding `image/id` and `image/encoded`) → encoded bytes → batches
(`beam.BatchElements`) → the SavedModel's `embed` signature, loaded once per worker in `DoFn.setup`
(the preprocessing the server applies to queries) → under `--out`:

    embeddings/embeddings-SSSSS-of-NNNNN.tfrecord   tf.train.Example {"id": bytes, "embedding": floats}
    index_shards/shard-SSSSS-of-NNNNN/              an fgkeras index (`ExactIndex` / `ScannIndex`) of its ids
    dead_letter/dead_letter-00000-of-00001.jsonl    {"path", "reason"} of each image not read or decoded
    index/                                          the shards merged (`merge_index_shards`), by the launcher

Design decisions:
- Embeddings as TFRecords of `tf.train.Example` (`pipelines.embedding_records`, which the retrieval
  pipeline's in-process embedding writes too), not Parquet: `tf.data` reads them with no other
  library (the project is TensorFlow end to end), and they add no pyarrow pin to a platform whose
  pins are already tight (protobuf, see docs/scale_out.md).
- An id goes to shard `blake2b(id) % num_shards`, not to the bundle that held it: the same gallery
  gives the same shards on every runner and any number of workers, and a retried shard is
  rewritten whole. Each shard is one `GroupByKey` group, so it must fit one worker's memory.
- Index files are written through Beam's `FileSystems` (local paths, gs://, s3://, hdfs://): the
  index is saved to a local temporary directory (`Index.save`), then copied, its manifest last;
  `Index.load` checks the size and SHA-256 of every file it lists, so a partial copy is refused.
- Every index (shards and merged) records the model that made the vectors
  (`fgkeras.export.model_record`) and `log_seq` 0, as `fgkeras index` does: the server pairs it with
  that version only and replays the inventory's whole log onto it.
- Nothing is dropped silently: an unreadable file, a record without an image and an image that
  does not decode go to the dead-letter output, counted by the Beam counter `dead_letters`.
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from fgkeras.data.sources import gallery_files
from fgkeras.export.fingerprint import model_record
from fgkeras.export.serving_layout import resolve_model_dir
from pipelines import embedding_records

logger = logging.getLogger(__name__)

NAMESPACE = "fgkeras.embed_gallery"
ID_FEATURE = "image/id"
IMAGE_FEATURE = "image/encoded"
EMBEDDING_FEATURE = embedding_records.EMBEDDING_FEATURE
EMBEDDINGS_DIR, DEAD_LETTER_DIR = embedding_records.EMBEDDINGS_DIR, embedding_records.DEAD_LETTER_DIR
SHARDS_DIR, INDEX_DIR = "index_shards", "index"
KINDS = ("exact", "scann")
_DEAD = "dead_letter"


@dataclasses.dataclass
class EmbedReport:
    """What `run` did.

    Attributes:
        embedded: images embedded (the Beam counter `images_embedded`).
        dead_letters: images sent to the dead-letter output (the Beam counter `dead_letters`).
        dead_letter_records: `[{"path", "reason"}]` read back from the dead-letter files.
        embeddings_files, dead_letter_files, index_shards: the paths written.
        index: the merged index directory, or None when nothing was embedded.
        model: the model record of the SavedModel (name, version, fingerprint).
    """

    embedded: int
    dead_letters: int
    dead_letter_records: list
    embeddings_files: list
    dead_letter_files: list
    index_shards: list
    index: str
    model: dict


def is_tfrecords(images):
    """True when `images` names TFRecord files (a path or glob whose name holds ".tfrecord")."""
    return ".tfrecord" in os.path.basename(os.fspath(images))


def shard_of(item, num_shards):
    """The index shard of an id: stable across processes, runs and runners (unlike `hash`), and
    balanced for ids that differ in a character or two (CRC-32's low bits are not: it is linear)."""
    digest = hashlib.blake2b(item.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


class _ReadFiles(beam.DoFn):
    """`(id, path)` → `(id, path, encoded bytes)`; an unreadable file to the dead letters."""

    def __init__(self):
        self._dead = Metrics.counter(NAMESPACE, "dead_letters")

    def process(self, element):
        item, path = element
        try:
            with FileSystems.open(path) as f:
                yield item, path, f.read()
        except OSError as error:  # Beam's BeamIOError is one
            self._dead.inc()
            yield beam.pvalue.TaggedOutput(_DEAD, {"path": path, "reason": f"unreadable: {error}"})


class _ParseExamples(beam.DoFn):
    """`(file, serialized tf.train.Example)` → `(id, "file:id", encoded bytes)`; a record without
    `image/id` and `image/encoded` to the dead letters."""

    def __init__(self):
        self._dead = Metrics.counter(NAMESPACE, "dead_letters")

    def process(self, element):
        import tensorflow as tf
        from google.protobuf.message import DecodeError

        filename, record = element
        try:
            features = tf.train.Example.FromString(record).features.feature
        except DecodeError as error:
            self._dead.inc()
            yield beam.pvalue.TaggedOutput(_DEAD, {"path": filename, "reason": f"not a tf.train.Example: {error}"})
            return
        missing = [key for key in (ID_FEATURE, IMAGE_FEATURE) if len(features[key].bytes_list.value) != 1]
        if missing:
            self._dead.inc()
            yield beam.pvalue.TaggedOutput(
                _DEAD, {"path": filename, "reason": f"record without one bytes value of {missing}"})
            return
        item = features[ID_FEATURE].bytes_list.value[0].decode("utf-8")
        yield item, f"{filename}:{item}", features[IMAGE_FEATURE].bytes_list.value[0]


class _EmbedBatches(beam.DoFn):
    """A batch of `(id, path, bytes)` → `(id, vector)` each; the images that do not decode to the
    dead letters. The SavedModel is loaded once per DoFn instance (per worker), in `setup`."""

    def __init__(self, model_dir):
        self._model_dir = model_dir
        self._embedded = Metrics.counter(NAMESPACE, "images_embedded")
        self._dead = Metrics.counter(NAMESPACE, "dead_letters")
        self._embedder = None

    def setup(self):
        from fgkeras.export.saved_model import SavedModelEmbedder

        self._embedder = SavedModelEmbedder(self._model_dir, batch_size=None)

    def process(self, batch):
        good, vectors, corrupt = self._embedder.embed_contents(batch)
        for path, reason in corrupt:
            self._dead.inc()
            yield beam.pvalue.TaggedOutput(_DEAD, {"path": path, "reason": reason})
        self._embedded.inc(len(good))
        for (item, _, _), vector in zip(good, vectors if vectors is not None else []):
            yield item, vector


class _WriteIndexShard(beam.DoFn):
    """`(shard, [(id, vector)])` → the shard's index directory, written under `shards_dir`."""

    def __init__(self, shards_dir, kind, num_shards, metadata):
        self._shards_dir, self._kind, self._num_shards, self._metadata = shards_dir, kind, num_shards, metadata

    def process(self, element):
        shard, items = element
        items = dict(items)  # an id listed twice (the same image): one row, as `fgkeras index` keeps it
        ids = sorted(items)
        index = _new_index(self._kind).build(np.stack([items[i] for i in ids]), ids)
        index.metadata = {**self._metadata, "shard": shard, "num_shards": self._num_shards}
        path = FileSystems.join(self._shards_dir, f"shard-{shard:05d}-of-{self._num_shards:05d}")
        save_index(index, path)
        yield path


def _new_index(kind):
    from fgkeras.index import Index

    return Index.of_kind(kind)


def save_index(index, path):
    """Saves an fgkeras index to `path` on any Beam filesystem: `Index.save` to a local temporary
    directory, then every file copied, the manifest last."""
    from fgkeras.index.base import MANIFEST

    with tempfile.TemporaryDirectory(prefix="fgkeras-index-") as staging:
        local = os.path.join(staging, "index")
        index.save(local)
        files = sorted(os.path.relpath(os.path.join(folder, name), local)
                       for folder, _, names in os.walk(local) for name in names)
        for relative in sorted(files, key=lambda name: name == MANIFEST):
            target = FileSystems.join(path, *relative.split(os.sep))
            with open(os.path.join(local, relative), "rb") as source, FileSystems.create(target) as sink:
                shutil.copyfileobj(source, sink)


def load_index(path):
    """`fgkeras.index.Index.load` of an index directory on any Beam filesystem (copied locally first)."""
    from fgkeras.index import Index
    from fgkeras.index.base import MANIFEST

    manifest_path = FileSystems.join(path, MANIFEST)
    if not FileSystems.exists(manifest_path):
        raise ValueError(f"`path` is not an fgkeras index (no {MANIFEST}). Received: path={path!r}")
    with FileSystems.open(manifest_path) as f:
        listed = json.loads(f.read().decode("utf-8")).get("files", {})
    with tempfile.TemporaryDirectory(prefix="fgkeras-index-") as staging:
        for relative in [MANIFEST, *listed]:
            local = os.path.join(staging, *relative.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with FileSystems.open(FileSystems.join(path, *relative.split("/"))) as source, open(local, "wb") as sink:
                shutil.copyfileobj(source, sink)
        return Index.load(staging)


def merge_index_shards(shards, out, kind=None):
    """Merges index shards (directories of `fgkeras.index` indexes) into one index saved at `out`.

    Args:
        shards: the shard directories (on any Beam filesystem).
        out: the merged index directory.
        kind: "exact" or "scann"; None keeps the shards' kind.
    Returns:
        the merged index, its ids sorted. Its metadata is the shards' less their shard numbers.
    Raises:
        ValueError: no shard, shards made by different models (their vectors cannot be searched
            together), or an id in two shards.
    """
    if not shards:
        raise ValueError("`shards` is empty: there is no index shard to merge.")
    indexes = [load_index(path) for path in shards]
    metadata = [{k: v for k, v in index.metadata.items() if k not in ("shard", "num_shards")} for index in indexes]
    for path, other in zip(shards[1:], metadata[1:]):
        if other.get("model") != metadata[0].get("model"):
            raise ValueError(f"Index shards of different models cannot be merged: {shards[0]} holds vectors of "
                             f"{metadata[0].get('model')}, {path} of {other.get('model')}")
    ids = np.concatenate([index.ids for index in indexes])
    embeddings = np.concatenate([index.embeddings for index in indexes])
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"Ids in more than one index shard: {unique[counts > 1][:5].tolist()}")
    order = np.argsort(ids, kind="stable")
    index = _new_index(kind or indexes[0].kind).build(embeddings[order], ids[order].tolist())
    index.metadata = metadata[0]
    save_index(index, out)
    return index


def read_embeddings(out):
    """`(ids, embeddings)` of the embedding files a run wrote under `out`, sorted by id."""
    return embedding_records.read_embedding_files(_matching(FileSystems.join(out, EMBEDDINGS_DIR,
                                                                              "embeddings-*.tfrecord")))


def write_image_tfrecords(images, path):
    """Writes the images of a folder or CSV (`fgkeras.data.sources.gallery_files`: their ids too) to
    one TFRecord of `tf.train.Example`s {`image/id`, `image/encoded`}: the TFRecord input of `run`."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(os.fspath(path)) as writer:
        for item, file in gallery_files(images):
            with open(file, "rb") as f:
                data = f.read()
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                ID_FEATURE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[item.encode("utf-8")])),
                IMAGE_FEATURE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
            })).SerializeToString())
    return os.fspath(path)


def build_pipeline(pipeline, model_dir, images, out, kind="exact", num_shards=4, batch_size=64, metadata=None):
    """Adds the stages to a `beam.Pipeline` (see the module docstring); the launcher is `run`.

    Args:
        model_dir: a SavedModel directory with an `embed` (or `serving_default`) signature on bytes.
        images: an image folder or CSV of paths (read here, to list the files), or a path / glob of
            TFRecord files (read by the workers).
        out: the output directory (any Beam filesystem); `run` refuses one that holds an earlier run's.
        kind: the kind of the index shards, "exact" or "scann".
        num_shards: index shards.
        batch_size: images per call of the SavedModel.
        metadata: the index metadata (default `{}`).
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}. Received: kind={kind!r}")
    for name, value in (("num_shards", num_shards), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    if is_tfrecords(images):
        files = _matching(images)
        read = (pipeline | "TFRecord files" >> beam.Create(files)
                | "Read records" >> beam.io.ReadAllFromTFRecord(with_filename=True)
                | "Parse examples" >> beam.ParDo(_ParseExamples()).with_outputs(_DEAD, main="images"))
    else:
        read = (pipeline | "List images" >> beam.Create(gallery_files(images))
                | "Read files" >> beam.ParDo(_ReadFiles()).with_outputs(_DEAD, main="images"))
    embedded = (read.images
                | "Batch" >> beam.BatchElements(min_batch_size=batch_size, max_batch_size=batch_size)
                | "Embed" >> beam.ParDo(_EmbedBatches(model_dir)).with_outputs(_DEAD, main="vectors"))

    (embedded.vectors | "To examples" >> beam.MapTuple(embedding_records.to_example)
     | "Write embeddings" >> beam.io.WriteToTFRecord(FileSystems.join(out, EMBEDDINGS_DIR, "embeddings"),
                                                     file_name_suffix=".tfrecord"))
    (embedded.vectors | "Shard" >> beam.Map(lambda element: (shard_of(element[0], num_shards), element))
     | "Group shards" >> beam.GroupByKey()
     | "Write index shards" >> beam.ParDo(_WriteIndexShard(FileSystems.join(out, SHARDS_DIR), kind, num_shards,
                                                           metadata or {})))
    ((read[_DEAD], embedded[_DEAD]) | "Dead letters" >> beam.Flatten()
     | "To JSON" >> beam.Map(json.dumps)
     | "Write dead letters" >> beam.io.WriteToText(FileSystems.join(out, DEAD_LETTER_DIR, "dead_letter"),
                                                   file_name_suffix=".jsonl", num_shards=1))
    return pipeline


def run(model, images, out, kind="exact", num_shards=4, batch_size=64, beam_args=()):
    """Runs the pipeline to the end, then merges the index shards into `out/index`.

    Args:
        model: `saved_models/<name>/<version>`, or `saved_models/<name>` for its latest version.
        images, out, kind, num_shards, batch_size: see `build_pipeline`.
        beam_args: Beam's own options (`--runner=...`, `--direct_num_workers=2`, ...).
    Returns:
        an `EmbedReport`.
    """
    earlier = [p for d in (EMBEDDINGS_DIR, SHARDS_DIR, DEAD_LETTER_DIR, INDEX_DIR)
               for p in _matching(FileSystems.join(out, d, "*"), allow_none=True)]
    if earlier:  # stale shards of another gallery or shard count would be merged with the new ones
        raise ValueError(f"`out` holds the outputs of an earlier run ({earlier[0]}, ...): give a new directory. "
                         f"Received: out={out!r}")
    name, version, path = resolve_model_dir(model)
    record = model_record(path, name, version)
    gallery = images if "://" in os.fspath(images) else os.path.abspath(os.fspath(images))
    pipeline = beam.Pipeline(options=PipelineOptions(list(beam_args)))
    build_pipeline(pipeline, path, images, out, kind=kind, num_shards=num_shards, batch_size=batch_size,
                   metadata={"model": record, "log_seq": 0, "gallery": gallery})
    result = pipeline.run()
    result.wait_until_finish()
    counters = {}  # one result per step that counts (the readers and the embedder all count dead letters)
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        counters[counter.key.metric.name] = counters.get(counter.key.metric.name, 0) + value

    manifests = _matching(FileSystems.join(out, SHARDS_DIR, "*", "manifest.json"), allow_none=True)
    shards = sorted(os.path.dirname(path) for path in manifests)
    dead_files = _matching(FileSystems.join(out, DEAD_LETTER_DIR, "dead_letter-*.jsonl"), allow_none=True)
    dead = []
    for file in dead_files:
        with FileSystems.open(file) as f:
            dead += [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]
    index = None
    if shards:
        index = FileSystems.join(out, INDEX_DIR)
        merge_index_shards(shards, index, kind=kind)
    for item in dead:
        logger.warning("not embedded: %s (%s)", item["path"], item["reason"])
    return EmbedReport(embedded=counters.get("images_embedded", 0), dead_letters=counters.get("dead_letters", 0),
                       dead_letter_records=dead, dead_letter_files=dead_files, index_shards=shards, index=index,
                       embeddings_files=_matching(FileSystems.join(out, EMBEDDINGS_DIR, "*.tfrecord"),
                                                  allow_none=True),
                       model=record)


def _matching(pattern, allow_none=False):
    """The sorted paths matching a glob on any Beam filesystem."""
    found = sorted(m.path for m in FileSystems.match([os.fspath(pattern)])[0].metadata_list)
    if not found and not allow_none:
        raise ValueError(f"No file matches {pattern!r}")
    return found


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.embed_gallery",
        description="Embed a gallery with a SavedModel and build its index, as an Apache Beam pipeline. "
                    "Every other option is Beam's (--runner, --direct_num_workers, --project, ...).")
    parser.add_argument("--model", required=True,
                        help="saved_models/<name>/<version>, or saved_models/<name> for its latest version")
    parser.add_argument("--images", required=True,
                        help="an image folder (root/<class>/<image>), a CSV of paths, or TFRecord files "
                             "(a path or glob with '.tfrecord' in the name) of image/id + image/encoded")
    parser.add_argument("--out", required=True, help="output directory (local, gs://, s3://, hdfs://)")
    parser.add_argument("--index", choices=KINDS, default="exact", help="index kind (default: %(default)s)")
    parser.add_argument("--num_shards", "--num-shards", type=int, default=4, help="index shards (default: %(default)s)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=64,
                        help="images per model call (default: %(default)s)")
    return parser


def main(argv=None):
    args, beam_args = build_parser().parse_known_args(argv)
    report = run(args.model, args.images, args.out, kind=args.index, num_shards=args.num_shards,
                 batch_size=args.batch_size, beam_args=beam_args)
    model = report.model
    print(f"Embedded {report.embedded} images with {model['name']} version {model['version']}")
    print(f"  embeddings: {len(report.embeddings_files)} files under {FileSystems.join(args.out, EMBEDDINGS_DIR)}")
    if report.index is not None:
        print(f"  index ({args.index}): {report.index}, merged from {len(report.index_shards)} shards under "
              f"{FileSystems.join(args.out, SHARDS_DIR)}")
    print(f"  dead letters: {report.dead_letters} ({', '.join(report.dead_letter_files) or 'none written'})")
    for item in report.dead_letter_records[:20]:
        print(f"    {item['path']}: {item['reason']}", file=sys.stderr)
    if len(report.dead_letter_records) > 20:
        print(f"    ... {len(report.dead_letter_records) - 20} more in the dead-letter files", file=sys.stderr)
    return 0 if report.index is not None else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
