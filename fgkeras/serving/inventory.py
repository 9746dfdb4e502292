"""The live inventory: an `fgkeras.index` index that changes while the server serves, durably.

```
<index_dir>/        the index, as `Index.save` writes it (atomic; `Index.load` reads it)
<index_dir>.wal     the write-ahead log: the changes made since that snapshot
```

A change (upsert or delete) is checked, appended to the log and flushed to disk (`fsync`), then
applied to the index in memory — and only then acknowledged. A restart loads the snapshot and
replays the log, so nothing acknowledged is lost, whatever the moment the process died. Every
`snapshot_every` changes, and at a graceful shutdown, the index is saved (atomically) and the log
emptied. A crash between the two replays the log onto a snapshot that already holds it, which
changes nothing: an upsert sets the vectors of its ids and a delete removes its ids, so replaying a
suffix of the history onto its own result gives that result again.

Log records are `LogRecord` messages of `protos/inventory.proto`, each framed by its length and
CRC-32; a torn record at the end (the process died while writing it, before it was acknowledged)
is dropped at replay.

A `ScannIndex` is retrained (`rebalance_fraction`) off the request path: the change that makes it
due copies the contents and starts a background thread, which trains a new index on the copy
(`ScannIndex.retrained`) while searches and changes go on against the current one; the changes
made meanwhile are recorded, replayed onto the new index, and it is swapped in between two
changes. The current index always holds every acknowledged change, so the log and the snapshots
do not depend on the retraining; one that fails is logged and dropped.
"""

import logging
import os
import struct
import threading
import zlib

import grpc
import numpy as np

from fgkeras.index import ExactIndex, Index, ScannIndex
from fgkeras.index.base import MANIFEST
from fgkeras.serving.protos import inventory_pb2, inventory_pb2_grpc
from fgkeras.serving.status import ServingError, abort_on_error, deadline_of, invalid_argument, not_found

logger = logging.getLogger(__name__)

_FRAME = struct.Struct("<II")  # payload length, CRC-32 of the payload


class Inventory:
    """A searchable gallery with durable upserts and deletes.

    Args:
        index_dir: where the index lives; created (empty, exact) when missing. The log is
            `index_dir + ".wal"`.
        snapshot_every: changes between two snapshots of the index.
        new_index: the index class to create when `index_dir` holds none.
    """

    def __init__(self, index_dir, snapshot_every=1000, new_index=ExactIndex):
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ValueError(f"`snapshot_every` must be a positive int. Received: snapshot_every={snapshot_every!r}")
        self.index_dir = os.path.abspath(os.fspath(index_dir))
        self.log_path = self.index_dir + ".wal"
        self.snapshot_every = snapshot_every
        self._write_lock = threading.Lock()   # orders changes: log order = apply order
        self._index_lock = threading.Lock()   # the index between a change and a search
        self._retraining = None               # the background retraining's thread, while it runs
        self._pending = None                  # the changes it must replay (LogRecords), while it runs
        self._closing = False
        self._retrain_failed = False
        if os.path.isfile(os.path.join(self.index_dir, MANIFEST)):
            self._index = Index.load(self.index_dir)
        elif os.path.exists(self.index_dir) and (not os.path.isdir(self.index_dir) or os.listdir(self.index_dir)):
            raise ValueError(f"`index_dir` exists and is not an index directory (no {MANIFEST}). "
                             f"Received: index_dir={index_dir!r}")
        else:
            self._index = new_index()
        if isinstance(self._index, ScannIndex):
            self._index.auto_rebalance = False  # retrained in the background instead
        self._ids = set(self._index.ids.tolist())
        replayed = self._replay()
        self._log = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._changes = replayed
        if replayed:
            self.snapshot()
        with self._write_lock:
            self._maybe_retrain()
        logger.info("inventory of %d items from %s (%d logged changes replayed)", len(self._index),
                    self.index_dir, replayed)

    # ------------------------------------------------------------------ reads

    def __len__(self):
        return len(self._index)

    @property
    def dim(self):
        """The vector dimension, or None while the inventory has never held an item."""
        return self._index.dim

    def search(self, queries, k):
        """`(ids, scores)`: (Q, min(k, N)) str object array and float32 array, best first."""
        with self._index_lock:
            dim = self._index.dim
            if dim is None or len(self._index) == 0:
                return np.empty((len(queries), 0), object), np.empty((len(queries), 0), np.float32)
            if queries.shape[1] != dim:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"the inventory holds {dim}-d vectors but the model makes {queries.shape[1]}-d "
                                   "embeddings: rebuild the index with this model")
            return self._index.search(queries, k)

    # ------------------------------------------------------------------ changes

    def upsert(self, ids, embeddings):
        """Adds or replaces items, durably. Returns `(inserted, updated, count)`.

        Raises:
            ServingError (INVALID_ARGUMENT): ids empty or repeated, or vectors of the wrong shape.
        """
        ids = list(ids)
        embeddings = np.asarray(embeddings, np.float32)
        _check_ids(ids)
        if embeddings.ndim != 2 or len(embeddings) != len(ids):
            raise invalid_argument(f"{len(ids)} ids need a ({len(ids)}, dim) matrix of embeddings; "
                                   f"received shape {list(embeddings.shape)}")
        if not np.isfinite(embeddings).all():
            raise invalid_argument("the embeddings hold NaN or infinite values")
        record = inventory_pb2.LogRecord(upsert_ids=ids)
        record.upsert_embeddings.dim = embeddings.shape[1]
        record.upsert_embeddings.values.extend(embeddings.ravel().tolist())
        with self._write_lock:
            if self._index.dim is not None and embeddings.shape[1] != self._index.dim:
                raise invalid_argument(f"the inventory holds {self._index.dim}-d vectors; received "
                                       f"{embeddings.shape[1]}-d ones")
            inserted = sum(1 for i in ids if i not in self._ids)
            self._append(record)
            with self._index_lock:
                self._index.upsert(ids, embeddings)
                self._ids.update(ids)
                count = len(self._index)
            self._after_change(record)
        return inserted, len(ids) - inserted, count

    def delete(self, ids, missing_ok=False):
        """Removes items, durably. Returns `(deleted, count)`.

        Raises:
            ServingError: NOT_FOUND naming unknown ids (nothing is deleted) unless `missing_ok`.
        """
        ids = list(dict.fromkeys(ids))
        _check_ids(ids)
        with self._write_lock:
            unknown = [i for i in ids if i not in self._ids]
            if unknown and not missing_ok:
                raise not_found(f"{len(unknown)} id(s) are not in the inventory: {_preview(unknown)}; "
                                "nothing was deleted (set missing_ok to skip them)")
            known = [i for i in ids if i in self._ids]
            if known:
                record = inventory_pb2.LogRecord(delete_ids=known)
                self._append(record)
                with self._index_lock:
                    self._index.delete(known)
                    self._ids.difference_update(known)
                self._after_change(record)
            return len(known), len(self._index)

    def snapshot(self):
        """Saves the index atomically and empties the log."""
        with self._write_lock:
            self._snapshot()

    def wait_for_retraining(self, timeout=None):
        """Blocks until no background retraining runs; False when `timeout` seconds passed first."""
        thread = self._retraining
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def close(self):
        """Snapshots (when anything changed since the last one) and closes the log.

        A retraining in progress is dropped: ScaNN's training cannot be interrupted, so this waits
        for it to end, and the snapshot is of the index that served (it holds every change).
        """
        with self._write_lock:
            self._closing = True
        self.wait_for_retraining()
        with self._write_lock:
            if self._log is None:
                return
            if self._changes:
                self._snapshot()
            os.close(self._log)
            self._log = None

    # ------------------------------------------------------------------ internals

    def _append(self, record):
        if self._log is None:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, "the inventory is closed")
        payload = record.SerializeToString()
        frame = _FRAME.pack(len(payload), zlib.crc32(payload)) + payload
        written = os.write(self._log, frame)
        if written != len(frame):
            raise OSError(f"short write to {self.log_path}: {written} of {len(frame)} bytes")
        os.fsync(self._log)

    def _after_change(self, record):
        """(holds the write lock) Counts an applied change, snapshots and retrains when due."""
        if self._pending is not None:
            self._pending.append(record)
        self._changes += 1
        if self._changes >= self.snapshot_every:
            self._snapshot()
        self._maybe_retrain()

    def _maybe_retrain(self):
        """(holds the write lock) Starts retraining a ScaNN index that is due, in the background."""
        index = self._index
        if (self._retraining is not None or self._closing or self._retrain_failed or len(index) == 0
                or not isinstance(index, ScannIndex) or not index.rebalance_due):
            return
        embeddings, ids = index.embeddings.copy(), index.ids  # the index changes in place: a copy
        self._pending = []
        self._retraining = threading.Thread(target=self._retrain, args=(index, embeddings, ids),
                                            name="fgkeras-inventory-retrain", daemon=True)
        self._retraining.start()
        logger.info("retraining the inventory's ScaNN index on %d items in the background", len(ids))

    def _retrain(self, index, embeddings, ids):
        """(its own thread) Trains a new index on the copy, replays the changes made meanwhile
        (outside the lock while there are some, the last ones under it) and swaps it in."""
        try:
            fresh = index.retrained(embeddings, ids)
            while True:
                with self._write_lock:
                    changes, self._pending = self._pending, []
                    if self._closing:
                        logger.info("the inventory is closing: the retrained index is dropped")
                        break
                    if not changes:
                        with self._index_lock:
                            self._index = fresh
                        logger.info("retrained ScaNN index swapped in (%d items)", len(fresh))
                        break
                for record in changes:
                    _apply(fresh, record)
        except Exception:  # the current index keeps serving; it holds every change
            logger.exception("retraining the inventory's ScaNN index failed; it is not retried in this process")
            with self._write_lock:
                self._retrain_failed = True
        finally:
            with self._write_lock:
                self._pending = None
                self._retraining = None

    def _snapshot(self):
        if self._index.dim is None:  # never held an item: nothing to save, the log says it all
            return
        self._index.save(self.index_dir)
        os.ftruncate(self._log, 0)
        os.fsync(self._log)
        self._changes = 0
        logger.info("inventory snapshot: %d items saved to %s", len(self._index), self.index_dir)

    def _replay(self):
        """Applies the logged changes to the loaded snapshot; drops a torn record at the end."""
        if not os.path.exists(self.log_path):
            return 0
        with open(self.log_path, "rb") as f:
            data = f.read()
        position, count = 0, 0
        while position + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, position)
            payload = data[position + _FRAME.size:position + _FRAME.size + length]
            if len(payload) != length or zlib.crc32(payload) != crc:
                break
            record = inventory_pb2.LogRecord.FromString(payload)
            _apply(self._index, record)
            self._ids.update(record.upsert_ids)
            self._ids.difference_update(record.delete_ids)
            position += _FRAME.size + length
            count += 1
        if position < len(data):
            logger.warning("dropping %d bytes at the end of %s: a change that was being written when the "
                           "server stopped (it was never acknowledged)", len(data) - position, self.log_path)
            with open(self.log_path, "r+b") as f:
                f.truncate(position)
                os.fsync(f.fileno())
        return count


def _apply(index, record):
    """Applies a logged change to an index."""
    if record.upsert_ids:
        dim = record.upsert_embeddings.dim
        vectors = np.asarray(record.upsert_embeddings.values, np.float32).reshape(len(record.upsert_ids), dim)
        index.upsert(list(record.upsert_ids), vectors)
    if record.delete_ids:
        index.delete(list(record.delete_ids), missing_ok=True)


def _check_ids(ids):
    if not ids:
        raise invalid_argument("no ids were given")
    if any(not i for i in ids):
        raise invalid_argument("ids must be non-empty strings")
    if len(set(ids)) != len(ids):
        seen, repeated = set(), []
        for i in ids:
            if i in seen:
                repeated.append(i)
            seen.add(i)
        raise invalid_argument(f"ids must be unique; repeated: {_preview(repeated)}")


def _preview(values, limit=5):
    shown = ", ".join(repr(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


class InventoryServicer(inventory_pb2_grpc.InventoryServiceServicer):
    """`fgkeras.serving.InventoryService` on an `Inventory`.

    Args:
        inventory: the `Inventory`.
        embed: `embed(images, version, deadline) -> (embeddings, version)` for upserts of images
            (images: object array of bytes, checked; version 0 = latest).
        model_dim: `model_dim() -> int or None`: the dimension of the served model's embeddings,
            which upserted embeddings must have.
        limits: the server's `Limits`.
    """

    def __init__(self, inventory, embed, model_dim, limits):
        self._inventory = inventory
        self._embed = embed
        self._model_dim = model_dim
        self._limits = limits

    def Upsert(self, request, context):
        with abort_on_error(context):
            ids = list(request.ids)
            has_images, has_embeddings = len(request.images) > 0, request.HasField("embeddings")
            if has_images == has_embeddings:
                raise invalid_argument("an UpsertRequest needs either `images` or `embeddings`, not "
                                       + ("both" if has_images else "neither"))
            version = 0
            if has_images:
                if len(request.images) != len(ids):
                    raise invalid_argument(f"{len(ids)} ids need {len(ids)} images; received {len(request.images)}")
                if len(ids) > self._limits.max_request_batch_size:
                    raise invalid_argument(f"{len(ids)} images exceed the server's max_request_batch_size of "
                                           f"{self._limits.max_request_batch_size}")
                _check_ids(ids)
                images = np.empty(len(ids), object)
                images[:] = list(request.images)
                embeddings, version = self._embed(images, request.model_version, deadline_of(context))
            else:
                dim = request.embeddings.dim
                values = request.embeddings.values
                if dim < 1 or len(values) != len(ids) * dim:
                    raise invalid_argument(f"{len(ids)} ids of dim {dim} need {len(ids) * max(dim, 0)} embedding "
                                           f"values; received {len(values)}")
                expected = self._model_dim()
                if expected is not None and dim != expected:
                    raise invalid_argument(f"the served model makes {expected}-d embeddings; received {dim}-d ones")
                embeddings = np.asarray(values, np.float32).reshape(len(ids), dim)
            inserted, updated, count = self._inventory.upsert(ids, embeddings)
            return inventory_pb2.UpsertResponse(inserted=inserted, updated=updated, count=count,
                                                model_version=version)

    def Delete(self, request, context):
        with abort_on_error(context):
            deleted, count = self._inventory.delete(list(request.ids), missing_ok=request.missing_ok)
            return inventory_pb2.DeleteResponse(deleted=deleted, count=count)

    def Count(self, request, context):
        return inventory_pb2.CountResponse(count=len(self._inventory), dim=self._inventory.dim or 0)
