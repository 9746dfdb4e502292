"""Building a model version's index from a gallery of images and the inventory's log (`fgkeras index`).

The index of `saved_models/<name>/<version>` lives at `indexes/<name>/<version>/` and is made by
that SavedModel's own `embed` signature (the preprocessing the server applies to queries), from
the user's images and from every image upserted live since (kept in `indexes/<name>/inventory.wal`),
less every id deleted live. Its metadata records the model (`fgkeras.export.model_record`), the
last log record it holds (the server replays the rest when it loads the version), and the gallery.

Example:
```python
report = index_gallery("saved_models/cars/3", images="photos/")   # -> indexes/cars/3/
report.corrupt          # [(path, reason)] of the images that could not be decoded (not indexed)
```
"""

import dataclasses
import logging
import os

import numpy as np

from fgkeras.data.sources import gallery_files
from fgkeras.export.saved_model import SavedModelEmbedder
from fgkeras.export.serving_layout import resolve_model_dir
from fgkeras.serving.inventory import LOG_FILE

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class IndexReport:
    """What `index_gallery` did.

    Attributes:
        path: the index directory written.
        model: the model record stored in the index (name, version, fingerprint).
        gallery_items: images of the gallery indexed.
        corrupt: `[(path, reason)]` of the gallery images that could not be decoded; not indexed.
        log_upserts: items upserted live (images in the log) that the index holds.
        log_deletes: ids deleted live that were removed from it.
        skipped_embeddings: ids of embeddings upserts in the log: vectors of another version, which
            this version needs sent again.
        log_seq: the last log record the index holds.
    """

    path: str
    model: dict
    gallery_items: int = 0
    corrupt: list = dataclasses.field(default_factory=list)
    log_upserts: int = 0
    log_deletes: int = 0
    skipped_embeddings: int = 0
    log_seq: int = 0

    @property
    def count(self):
        return self.gallery_items + self.log_upserts


def default_index_dir(model_dir, version):
    """`indexes/<name>/<version>` beside `saved_models/<name>/<version>` (`<root>/saved_models/...`)."""
    name_dir = os.path.dirname(os.path.abspath(model_dir))
    root = os.path.dirname(os.path.dirname(name_dir))
    return os.path.join(root, "indexes", os.path.basename(name_dir), str(version))


def index_gallery(model_dir, images=None, out=None, kind="exact", batch_size=64, progress=True):
    """Builds the index of one model version from a gallery of image files and the inventory's log.

    Args:
        model_dir: `saved_models/<name>/<version>`, or `saved_models/<name>` for its latest version.
        images: an image folder or a CSV of paths (see `gallery_files`), or None for the items of
            the log alone.
        out: the index directory (default: `indexes/<name>/<version>` beside `saved_models/`). The
            log read is `<parent of out>/inventory.wal`, the server's.
        kind: "exact" (`ExactIndex`) or "scann" (`ScannIndex`, configured from the size).
        batch_size: images per call of the SavedModel.
        progress: show a progress bar.
    Returns:
        an `IndexReport`. Corrupt images are listed there (and logged), never silently dropped.
    """
    _, _, path = resolve_model_dir(model_dir)
    embedder = SavedModelEmbedder(path, batch_size)
    ids, embeddings, corrupt = [], None, []
    if images is not None:
        ids, embeddings, corrupt = embedder.embed_files(gallery_files(images), progress=progress)
        for corrupt_path, reason in corrupt:
            logger.warning("not indexed, cannot be decoded: %s (%s)", corrupt_path, reason)
    gallery = os.path.abspath(os.fspath(images)) if images is not None else None
    report = build_version_index(path, ids, embeddings, out=out, gallery=gallery, kind=kind, embedder=embedder)
    report.corrupt = corrupt
    return report


def build_version_index(model_dir, ids, embeddings, out=None, gallery=None, kind="exact", embedder=None):
    """Builds and saves a model version's index from gallery vectors that version made, plus the
    inventory log's live changes (its images embedded by the same version).

    Args:
        model_dir: `saved_models/<name>/<version>` (or `saved_models/<name>`: its latest version).
        ids, embeddings: the gallery's ids and (N, D) vectors (may be empty).
        out: the index directory (default: `indexes/<name>/<version>` beside `saved_models/`).
        gallery: what the gallery is (a path, a description), kept in the index's metadata; None
            when the index holds the log's items alone (a new version's index can then be
            rebuilt from the log by the server itself).
        kind: "exact" or "scann".
        embedder: a `SavedModelEmbedder` of the version, when one is loaded already.
    Returns:
        an `IndexReport`.
    """
    from fgkeras.export import model_record
    from fgkeras.index import Index
    from fgkeras.serving.protos import inventory_pb2
    from fgkeras.serving.wal import read_entries

    if kind not in ("exact", "scann"):
        raise ValueError(f"`kind` must be 'exact' or 'scann'. Received: kind={kind!r}")
    name, version, path = resolve_model_dir(model_dir)
    out = os.path.abspath(os.fspath(out)) if out is not None else default_index_dir(path, version)
    record = model_record(path, name, version)
    report = IndexReport(path=out, model=record)
    items = dict(zip(ids, np.asarray(embeddings, np.float32))) if len(ids) else {}
    log_path = os.path.join(os.path.dirname(out), LOG_FILE)
    live = set()
    for entry in read_entries(log_path) if os.path.exists(log_path) else []:
        change = inventory_pb2.LogRecord.FromString(entry.payload)
        if change.upsert_ids and change.upsert_images:
            embedder = embedder or SavedModelEmbedder(path, batch_size=64)
            items.update(zip(change.upsert_ids, embedder(list(change.upsert_images))))
            live.update(change.upsert_ids)
        elif change.upsert_ids:
            report.skipped_embeddings += len(change.upsert_ids)
        for item in change.delete_ids:
            if items.pop(item, None) is not None:
                report.log_deletes += 1
            live.discard(item)
        report.log_seq = entry.seq
    report.log_upserts = len(live)
    report.gallery_items = len(items) - report.log_upserts
    if not items:
        raise ValueError("nothing to index: the gallery holds no readable image and the inventory's log no live item")
    index = Index.of_kind(kind)
    index.build(np.stack(list(items.values())), list(items))
    index.metadata = {"model": record, "log_seq": report.log_seq, "gallery": gallery}
    index.save(out)
    logger.info("index of %s version %d: %d items (%d from the gallery, %d upserted live) at %s", name, version,
                len(index), report.gallery_items, report.log_upserts, out)
    return report
