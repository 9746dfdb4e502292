"""The live inventory: one index per served model version, changed while the server serves, durably.

```
indexes/<name>/          the inventory's root (`fgkeras serve --index-dir indexes/<name>`)
    <version>/           the index of model version <version> (`Index.save`), beside
                         saved_models/<name>/<version>/; its metadata records the model that made
                         its vectors (`fgkeras.export.model_record`) and the last change it holds
    inventory.wal        the write-ahead log of the live changes (`fgkeras.serving.wal`)
```

**Vectors belong to the version that made them.** A loaded version is *attached* to the index of
its own directory when that index records the same model (name, version, fingerprint); a search
embedded by a version runs only against that version's index. A version without one serves
`embed`, and the server answers its searches with the newest version that has one (the response
names that version). The server never creates an index for a version beside one made from a gallery
(`fgkeras index` does, offline); an inventory whose every index was made from the log alone (a new
inventory, filled by live upserts only) gets one for a new version at once, rebuilt from the log.

**Changes.** An image upsert is embedded by every attached version and checked against each of
their indexes, appended to the log with its images and every version's vectors, fsynced, applied
to every attached index — and only then acknowledged. A refused change is never logged. The log
keeps the images so that an index built later for a new version (`fgkeras index`, which replays
the log) holds the live arrivals too. An embeddings upsert names the version that made the vectors
and reaches only that version's index (a new version needs them sent again). A delete reaches every
attached index.

**Recovery.** Attaching a version loads its index and replays the log records after the last one
it holds (`metadata["log_seq"]`), embedding the images of records that carry no vectors of its own:
a change that was logged but not yet applied when the process died is rolled forward in every
index, never half-applied. Every `snapshot_every` changes, when a version is detached, and at a
graceful shutdown, the indexes are saved (atomically) and the log compacted: it keeps the latest
image of every item upserted live and a tombstone for every id deleted live (what a rebuild from a
gallery needs), and drops what every index already holds otherwise. The log's records are held in
memory (they are the live arrivals since the gallery was indexed).

A `ScannIndex` is retrained (`rebalance_fraction`) off the request path: the change that makes it
due copies the contents and starts a background thread, which trains a new index on the copy
(`ScannIndex.retrained`) while searches and changes go on against the current one; the changes
made meanwhile are replayed onto the new index, and it is swapped in between two changes.
"""

import json
import logging
import os
import threading

import grpc
import numpy as np

from fgkeras._files import preview
from fgkeras.index import ExactIndex, Index, ScannIndex
from fgkeras.index.base import MANIFEST
from fgkeras.serving.protos import inventory_pb2, inventory_pb2_grpc
from fgkeras.serving.status import ServingError, abort_on_error, failed_precondition, invalid_argument, not_found
from fgkeras.serving.wal import LogEntry, WriteAheadLog

logger = logging.getLogger(__name__)

LOG_FILE = "inventory.wal"


class _Version:
    """One attached version: its index, the model record, how to embed images, its retraining."""

    def __init__(self, version, index, record, embed):
        self.version = version
        self.index = index
        self.record = record
        self.embed = embed
        self.lock = threading.Lock()  # the index between a change and a search
        self.ids = set(index.ids.tolist())
        self.log_seq = int(index.metadata.get("log_seq", 0))  # the last log record the index holds
        self.unsaved = 0              # changes applied since the index was last saved
        self.retraining = None        # the background retraining's thread, while it runs
        self.pending = None           # the changes it must replay, while it runs
        self.retrain_failed = False
        self.detached = False


class Inventory:
    """The live galleries of one model's versions, with durable upserts and deletes.

    Args:
        root: `indexes/<name>`: a directory of version indexes and the log; created when missing.
        snapshot_every: changes between two snapshots of the indexes (and compactions of the log).
        wal_recovery: what to do with a log corrupted before its last record: "strict" (refuse to
            open, naming the file and the offset) or "skip-corrupt" (skip those records, logged).
            A torn last record (the process died while writing it) is always dropped.
        new_index: the index class of an index that the inventory creates itself.
    """

    def __init__(self, root, snapshot_every=1000, wal_recovery="strict", new_index=ExactIndex):
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ValueError(f"`snapshot_every` must be a positive int. Received: snapshot_every={snapshot_every!r}")
        self.root = os.path.abspath(os.fspath(root))
        if os.path.isfile(os.path.join(self.root, MANIFEST)):
            raise ValueError(
                f"{self.root} is one index without a model version (the layout before indexes were tied to the "
                f"model that made their vectors). Build an index per version with `fgkeras index --model "
                f"saved_models/<name>/<version> --images <gallery> --out {self.root}/<version>`. Received: root={root!r}")
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ValueError(f"`root` must be a directory of version indexes. Received: root={root!r}")
        os.makedirs(self.root, exist_ok=True)
        self.snapshot_every = snapshot_every
        self.new_index = new_index
        self.log_path = os.path.join(self.root, LOG_FILE)
        self._wal = WriteAheadLog(self.log_path, recovery=wal_recovery)
        self._entries = [(entry.seq, inventory_pb2.LogRecord.FromString(entry.payload)) for entry in self._wal.entries]
        self._wal.entries = []  # parsed above: the payloads (images) are not held twice
        self._versions = {}
        self._write_lock = threading.Lock()  # orders changes: log order = apply order
        self._changes = 0
        self._closing = False
        logger.info("inventory at %s: %d logged changes", self.root, len(self._entries))

    # ------------------------------------------------------------------ versions

    def index_dir(self, version):
        """Where the index of `version` lives."""
        return os.path.join(self.root, str(int(version)))

    def stored_versions(self):
        """The versions that have an index directory."""
        from fgkeras.export import list_versions

        return [v for v in list_versions(self.root) if os.path.isfile(os.path.join(self.index_dir(v), MANIFEST))]

    @property
    def versions(self):
        """The attached versions, ascending."""
        return sorted(self._versions)

    def attach(self, version, record, embed):
        """Pairs a loaded model version with its own index; True when it has one now.

        Args:
            version: the model version.
            record: `fgkeras.export.model_record(...)` of the version's SavedModel.
            embed: `embed(images) -> (N, D) float32`: the version's embeddings of encoded images
                (object array of bytes), for the logged images it has no vectors of.
        Returns:
            False when the version has no index (none in its directory, or one made by another
            model: an error is logged); it then serves `embed` only.
        """
        with self._write_lock:
            if version in self._versions:
                return True
            path = self.index_dir(version)
            if os.path.isfile(os.path.join(path, MANIFEST)):
                index = Index.load(path)
                held = index.metadata.get("model") or {}
                if held.get("fingerprint") != record["fingerprint"] or held.get("version") != version:
                    logger.error("the index at %s was made by model %s, not by the served version %d (%s): "
                                 "version %d serves `embed` only until `fgkeras index` rebuilds its index",
                                 path, held or "(not recorded)", version, record["fingerprint"], version)
                    return False
            elif all(self._from_log_only(v) for v in self.stored_versions()):
                index = self.new_index()
                index.metadata = {"log_seq": 0, "gallery": None}
                logger.info("version %d: a new index, rebuilt from the inventory's log", version)
            else:
                logger.warning("version %d has no index in %s: it serves `embed`; searches are answered by the "
                               "newest version that has one (build it with `fgkeras index`)", version, self.root)
                return False
            if isinstance(index, ScannIndex):
                index.auto_rebalance = False  # retrained in the background instead
            index.metadata = {**index.metadata, "model": dict(record)}
            state = _Version(version, index, record, embed)
            replayed = self._replay(state)
            self._versions = {**self._versions, version: state}  # replaced whole: searches read it unlocked
            if replayed:  # (a restart after a crash) so that the next one does not replay it all again
                self._snapshot()
            self._maybe_retrain(state)
            logger.info("version %d attached to its index of %d items (%d logged changes replayed)", version,
                        len(index), replayed)
            return True

    def detach(self, version):
        """Saves a version's index (when it changed) and stops updating it: the version was unloaded."""
        with self._write_lock:
            state = self._versions.get(version)
            if state is None:
                return
            self._versions = {v: other for v, other in self._versions.items() if v != version}
            state.detached = True
            self._save(state)
        logger.info("version %d detached from its index", version)

    def answering(self, version=0):
        """The version whose index answers for `version` (0: the newest): itself when it has one,
        else the newest version that has one.

        Raises:
            ServingError: FAILED_PRECONDITION when no served version has an index.
        """
        versions = self._versions
        if version in versions:
            return version
        if not versions:
            raise failed_precondition(f"no served version has an index in {self.root}: build one with "
                                      "`fgkeras index`")
        return max(versions)

    def _stored_metadata(self, version):
        """The metadata of the index stored for `version` (its manifest only), or None without a readable one."""
        try:
            with open(os.path.join(self.index_dir(version), MANIFEST)) as f:
                return json.load(f).get("metadata", {})
        except (OSError, ValueError):
            return None

    def _from_log_only(self, version):
        metadata = self._stored_metadata(version)
        return metadata is not None and metadata.get("gallery", "") is None

    # ------------------------------------------------------------------ reads

    def __len__(self):
        state = self._newest()
        return len(state.index) if state is not None else 0

    def count(self, version=0):
        """`(count, dim or 0, version)` of the index answering for `version` (0: the newest)."""
        state = self._versions[self.answering(version)]
        with state.lock:
            return len(state.index), state.index.dim or 0, state.version

    def search(self, version, queries, k):
        """`(ids, scores)` of `version`'s own index: (Q, min(k, N)) str object and float32 arrays, best first.

        Raises:
            ServingError: FAILED_PRECONDITION when `version` has no index here, or its index holds
                vectors of another dimension than `queries`.
        """
        state = self._versions.get(version)
        if state is None:
            raise failed_precondition(f"version {version} has no index in {self.root}")
        with state.lock:
            dim = state.index.dim
            if dim is None or len(state.index) == 0:
                return np.empty((len(queries), 0), object), np.empty((len(queries), 0), np.float32)
            if queries.shape[1] != dim:
                raise failed_precondition(f"the index of version {version} holds {dim}-d vectors but the model makes "
                                          f"{queries.shape[1]}-d embeddings: rebuild it with `fgkeras index`")
            return state.index.search(queries, k)

    # ------------------------------------------------------------------ changes

    def upsert_images(self, ids, images, version=0):
        """Adds or replaces items from encoded images, in every attached version's index, durably.

        Args:
            ids: unique non-empty strings.
            images: object array of encoded images (checked by the caller), one per id.
            version: 0, or an attached version that must hold the change (NOT_FOUND otherwise).
        Returns:
            `(inserted, updated, count, versions)`: counts of the newest version's index, and every
            version that holds the change.
        """
        ids = _check_ids(ids)
        if len(images) != len(ids):
            raise invalid_argument(f"{len(ids)} ids need {len(ids)} images; received {len(images)}")
        with self._write_lock:
            if version and version not in self._versions:
                raise not_found(f"version {version} has no index in {self.root}; versions with one: "
                                f"{self.versions}")
            if not self._versions:
                raise failed_precondition(f"no served version has an index in {self.root}: build one with "
                                          "`fgkeras index`")
            record = inventory_pb2.LogRecord(upsert_ids=ids, upsert_images=list(images))
            for state in self._sorted_states():
                vectors = _checked(state, ids, state.embed(images))
                entry = record.upsert_vectors.add(version=state.version)
                _fill(entry.embeddings, vectors)
            return self._commit(record, ids)

    def upsert_embeddings(self, version, ids, embeddings):
        """Adds or replaces items of `version`'s index from vectors that version made, durably.

        Returns:
            `(inserted, updated, count, [version])`.
        Raises:
            ServingError: INVALID_ARGUMENT for bad ids or vectors; FAILED_PRECONDITION when `version`
                has no index here (the vectors of one version never go into another's index).
        """
        ids = _check_ids(ids)
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
            raise invalid_argument("an embeddings upsert must name the model version that made the vectors "
                                   f"(model_version); received {version!r}")
        embeddings = np.asarray(embeddings, np.float32)
        with self._write_lock:
            state = self._versions.get(int(version))
            if state is None:
                raise failed_precondition(f"version {version} has no index in {self.root} (versions with one: "
                                          f"{self.versions}); embeddings go only to the index of the version that "
                                          "made them")
            vectors = _checked(state, ids, embeddings)
            record = inventory_pb2.LogRecord(upsert_ids=ids)
            _fill(record.upsert_vectors.add(version=state.version).embeddings, vectors)
            return self._commit(record, ids, counted=state)

    def delete(self, ids, missing_ok=False):
        """Removes items from every attached version's index, durably. Returns `(deleted, count)`.

        Raises:
            ServingError: NOT_FOUND naming the ids that no index holds (nothing is deleted) unless
                `missing_ok`.
        """
        ids = _check_ids(list(dict.fromkeys(ids)), unique=False)
        with self._write_lock:
            held = set().union(*(state.ids for state in self._versions.values()))
            unknown = [i for i in ids if i not in held]
            if unknown and not missing_ok:
                raise not_found(f"{len(unknown)} id(s) are not in the inventory: {preview(unknown)}; "
                                "nothing was deleted (set missing_ok to skip them)")
            known = [i for i in ids if i in held]
            if known:
                self._commit(inventory_pb2.LogRecord(delete_ids=known), [])
            newest = self._newest()
            return len(known), len(newest.index) if newest is not None else 0

    def snapshot(self):
        """Saves every attached index atomically and compacts the log."""
        with self._write_lock:
            self._snapshot()

    def wait_for_retraining(self, timeout=None):
        """Blocks until no background retraining runs; False when `timeout` seconds passed first."""
        for state in list(self._versions.values()):
            thread = state.retraining
            if thread is not None:
                thread.join(timeout)
                if thread.is_alive():
                    return False
        return True

    def close(self):
        """Snapshots (when anything changed since the last one) and closes the log.

        A retraining in progress is dropped: ScaNN's training cannot be interrupted, so this waits
        for it to end, and the snapshot is of the index that served (it holds every change).
        """
        with self._write_lock:
            if self._closing:
                return
            self._closing = True
        self.wait_for_retraining()
        with self._write_lock:
            if self._changes or any(state.unsaved for state in self._versions.values()):
                self._snapshot()
            self._wal.close()

    # ------------------------------------------------------------------ internals

    def _sorted_states(self):
        return [self._versions[v] for v in sorted(self._versions)]

    def _newest(self):
        versions = self._versions
        return versions[max(versions)] if versions else None

    def _commit(self, record, ids, counted=None):
        """(holds the write lock) Logs a checked change, applies it to every attached index it
        concerns, counts it; returns the counts of an upsert in `counted`'s index (default: the newest)."""
        if self._closing:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, "the inventory is closing")
        counted = counted or self._newest()
        inserted = sum(1 for i in ids if i not in counted.ids)
        try:
            seq = self._wal.append(record.SerializeToString())
        except OSError as error:
            raise ServingError(grpc.StatusCode.UNAVAILABLE,
                               f"the change could not be written to the inventory's log, nothing was changed: "
                               f"{error}") from None
        self._entries.append((seq, record))
        holders = []
        for state in self._sorted_states():
            if _apply(state, seq, record):
                holders.append(state.version)
                if state.pending is not None:
                    state.pending.append((seq, record))
        self._changes += 1
        if self._changes >= self.snapshot_every:
            self._snapshot()
        for state in self._sorted_states():
            self._maybe_retrain(state)
        return inserted, len(ids) - inserted, len(counted.index), holders

    def _replay(self, state):
        """(holds the write lock) Applies the logged changes after the last one `state`'s index holds."""
        after = state.log_seq
        count = 0
        for seq, record in self._entries:
            if seq <= after:
                continue
            if record.upsert_ids and _vectors_of(record, state.version) is None and record.upsert_images:
                images = np.empty(len(record.upsert_images), object)
                images[:] = list(record.upsert_images)
                vectors = _checked(state, list(record.upsert_ids), state.embed(images))
                replayed = inventory_pb2.LogRecord()
                replayed.CopyFrom(record)
                _fill(replayed.upsert_vectors.add(version=state.version).embeddings, vectors)
                record = replayed
            _apply(state, seq, record)
            count += 1
        return count

    def _save(self, state):
        """(holds the write lock) Saves an index that changed since it was last saved."""
        if not state.unsaved or state.index.dim is None:
            return
        state.index.metadata = {**state.index.metadata, "log_seq": state.log_seq}
        state.index.save(self.index_dir(state.version))
        state.unsaved = 0

    def _snapshot(self):
        for state in self._sorted_states():
            self._save(state)
        kept = _compacted(self._entries, self._behind())
        self._wal.rewrite([_entry(seq, record) for seq, record in kept])
        dropped = len(self._entries) - len(kept)
        self._entries = kept
        self._changes = 0
        logger.info("inventory snapshot: versions %s saved; the log keeps %d records (%d dropped)",
                    self.versions, len(kept), dropped)

    def _behind(self):
        """`{version: log_seq}` of the versions that the log holds vectors of but that are not attached
        (after a crash, or pinned out): the last record their stored index holds, 0 without one."""
        mentioned = {v.version for _, record in self._entries for v in record.upsert_vectors}
        behind = {}
        for version in sorted(mentioned - set(self._versions)):
            metadata = self._stored_metadata(version) or {}  # no index saved yet: every record of it stays
            behind[version] = int(metadata.get("log_seq", 0))
        return behind

    def _maybe_retrain(self, state):
        """(holds the write lock) Starts retraining a ScaNN index that is due, in the background."""
        index = state.index
        if (state.retraining is not None or self._closing or state.retrain_failed or state.detached or len(index) == 0
                or not isinstance(index, ScannIndex) or not index.rebalance_due):
            return
        embeddings, ids = index.embeddings.copy(), index.ids  # the index changes in place: a copy
        state.pending = []
        state.retraining = threading.Thread(target=self._retrain, args=(state, embeddings, ids),
                                            name=f"fgkeras-inventory-retrain-{state.version}", daemon=True)
        state.retraining.start()
        logger.info("retraining the ScaNN index of version %d on %d items in the background", state.version, len(ids))

    def _retrain(self, state, embeddings, ids):
        """(its own thread) Trains a new index on the copy, replays the changes made meanwhile
        (outside the lock while there are some, the last ones under it) and swaps it in."""
        try:
            fresh = state.index.retrained(embeddings, ids)
            while True:
                with self._write_lock:
                    changes, state.pending = state.pending, []
                    if self._closing or state.detached:
                        logger.info("version %d: the retrained index is dropped (closing)", state.version)
                        break
                    if not changes:
                        fresh.metadata = dict(state.index.metadata)
                        with state.lock:
                            state.index = fresh
                        logger.info("version %d: retrained ScaNN index swapped in (%d items)", state.version,
                                    len(fresh))
                        break
                for _, record in changes:
                    _apply_to_index(fresh, record, state.version)
        except Exception:  # the current index keeps serving; it holds every change
            logger.exception("retraining the ScaNN index of version %d failed; not retried in this process",
                             state.version)
            with self._write_lock:
                state.retrain_failed = True
        finally:
            with self._write_lock:
                state.pending = None
                state.retraining = None


# ---------------------------------------------------------------------- records


def _fill(embeddings_proto, vectors):
    embeddings_proto.dim = vectors.shape[1]
    embeddings_proto.values.extend(vectors.ravel().tolist())


def _vectors_of(record, version):
    """The (N, D) vectors `record` holds for `version`, or None."""
    for entry in record.upsert_vectors:
        if entry.version == version:
            dim = entry.embeddings.dim
            return np.asarray(entry.embeddings.values, np.float32).reshape(len(record.upsert_ids), dim)
    return None


def _apply_to_index(index, record, version):
    """Applies a logged change to an index of `version`; False when it does not concern it."""
    if record.upsert_ids:
        vectors = _vectors_of(record, version)
        if vectors is None:
            return False
        index.upsert(list(record.upsert_ids), vectors)
    if record.delete_ids:
        index.delete(list(record.delete_ids), missing_ok=True)
    return True


def _apply(state, seq, record):
    """Applies a logged change to an attached version; False when it does not concern it."""
    with state.lock:
        applied = _apply_to_index(state.index, record, state.version)
    state.log_seq = seq
    if applied:
        state.ids.update(record.upsert_ids)
        state.ids.difference_update(record.delete_ids)
        state.unsaved += 1
    return applied


def _checked(state, ids, vectors):
    """`vectors` as `state`'s index would take them for `ids`, or INVALID_ARGUMENT saying why not."""
    try:
        _, vectors = state.index.validate_upsert(ids, vectors)
    except ValueError as error:
        raise invalid_argument(f"version {state.version}'s index refuses these vectors: {error}") from None
    return vectors


def _compacted(entries, behind=None):
    """What the log must keep once every attached index holds `entries`: the latest image of every
    item upserted from images and not deleted since, and a tombstone of every id deleted (what an
    index rebuilt from a gallery needs); each under the sequence number of the change it comes from.
    Records with vectors of a version in `behind` ({version: log_seq}, stored indexes not attached
    now, e.g. after a crash that left them behind) that it does not hold yet are kept whole."""
    behind = behind or {}
    kept = {seq: record for seq, record in entries
            if any(v.version in behind and seq > behind[v.version] for v in record.upsert_vectors)}
    images, tombstones = {}, {}
    for seq, record in entries:
        for position, item in enumerate(record.upsert_ids):
            if record.upsert_images:
                images[item] = (seq, record.upsert_images[position])
                tombstones.pop(item, None)
        for item in record.delete_ids:
            images.pop(item, None)
            tombstones[item] = seq
    by_seq = dict(kept)
    for item, (seq, image) in images.items():
        if seq in kept:
            continue
        record = by_seq.setdefault(seq, inventory_pb2.LogRecord())
        record.upsert_ids.append(item)
        record.upsert_images.append(image)
    for item, seq in tombstones.items():
        if seq not in kept:
            by_seq.setdefault(seq, inventory_pb2.LogRecord()).delete_ids.append(item)
    return sorted(by_seq.items(), key=lambda pair: pair[0])


def _entry(seq, record):
    return LogEntry(seq=seq, payload=record.SerializeToString())


def _check_ids(ids, unique=True):
    """The ids of a change as a list, or INVALID_ARGUMENT: some, non-empty strings, unique."""
    ids = list(ids)
    if not ids:
        raise invalid_argument("no ids were given")
    if any(not isinstance(i, str) or not i for i in ids):
        raise invalid_argument("ids must be non-empty strings")
    if unique and len(set(ids)) != len(ids):
        seen, repeated = set(), []
        for i in ids:
            if i in seen:
                repeated.append(i)
            seen.add(i)
        raise invalid_argument(f"ids must be unique; repeated: {preview(repeated)}")
    return ids


class InventoryServicer(inventory_pb2_grpc.InventoryServiceServicer):
    """`fgkeras.serving.InventoryService` on an `Inventory`.

    Args:
        inventory: the `Inventory`.
        check_images: `check_images(images)`: raises INVALID_ARGUMENT / RESOURCE_EXHAUSTED for images
            the server's limits refuse (object array of bytes).
        limits: the server's `Limits`.
    """

    def __init__(self, inventory, check_images, limits):
        self._inventory = inventory
        self._check_images = check_images
        self._limits = limits

    def Upsert(self, request, context):
        with abort_on_error(context):
            ids = list(request.ids)
            has_images, has_embeddings = len(request.images) > 0, request.HasField("embeddings")
            if has_images == has_embeddings:
                raise invalid_argument("an UpsertRequest needs either `images` or `embeddings`, not "
                                       + ("both" if has_images else "neither"))
            if has_images:
                if len(request.images) != len(ids):
                    raise invalid_argument(f"{len(ids)} ids need {len(ids)} images; received {len(request.images)}")
                if len(ids) > self._limits.max_request_batch_size:
                    raise invalid_argument(f"{len(ids)} images exceed the server's max_request_batch_size of "
                                           f"{self._limits.max_request_batch_size}")
                _check_ids(ids)
                images = np.empty(len(ids), object)
                images[:] = list(request.images)
                self._check_images(images)
                inserted, updated, count, versions = self._inventory.upsert_images(ids, images,
                                                                                   request.model_version)
            else:
                dim = request.embeddings.dim
                values = request.embeddings.values
                if dim < 1 or len(values) != len(ids) * dim:
                    raise invalid_argument(f"{len(ids)} ids of dim {dim} need {len(ids) * max(dim, 0)} embedding "
                                           f"values; received {len(values)}")
                embeddings = np.asarray(values, np.float32).reshape(len(ids), dim)
                inserted, updated, count, versions = self._inventory.upsert_embeddings(
                    request.model_version or None, ids, embeddings)
            return inventory_pb2.UpsertResponse(inserted=inserted, updated=updated, count=count,
                                                model_version=max(versions) if versions else 0, versions=versions)

    def Delete(self, request, context):
        with abort_on_error(context):
            deleted, count = self._inventory.delete(list(request.ids), missing_ok=request.missing_ok)
            return inventory_pb2.DeleteResponse(deleted=deleted, count=count)

    def Count(self, request, context):
        with abort_on_error(context):
            count, dim, version = self._inventory.count(request.model_version)
            return inventory_pb2.CountResponse(count=count, dim=dim, model_version=version)
