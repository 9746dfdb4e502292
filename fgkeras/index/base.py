"""The `Index` interface and what every index shares: input checks, id storage, atomic save and checked load.

An index directory holds:

    manifest.json     {"format": "fgkeras.index", "format_version": 1, "kind": "exact" | "scann",
                       "dim", "count", "dtype": "float32", "config": {...}, "metadata": {...},
                       "files": {relative path: {"bytes": int, "sha256": hex}}, "fgkeras_version", "saved_at"}
    embeddings.npy    (count, dim) float32, read with `allow_pickle=False`
    ids.json          the ids as a UTF-8 JSON list of strings, in the order of the rows of embeddings.npy
    ...               files of the kind (ScaNN's own assets for "scann"; never a pickle)

`save` writes everything into a hidden temporary directory beside the target (of the umask's modes,
so a server running as another user can read it), fsyncs every file and the directory, then swaps it
in with one atomic rename (Linux `renameat2(RENAME_EXCHANGE)` when the target exists). A crash at any
moment leaves either the old index or the new one at the path, never a mix; an interrupted temporary
directory (`.<name>.tmp-*`) is left behind and is never read. `load` holds the directory open and
reads every file from the handle it checked (see `_IndexFiles`), so a save landing meanwhile cannot
mix two versions either. It checks the manifest, the size and SHA-256 of every file it lists, then the
shapes, dtypes and ids, and refuses anything else with an `IndexFormatError` that names the problem.
"""

import abc
import datetime
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile

import numpy as np

from fgkeras._files import fsync_tree, make_temp_dir, preview, swap_in

logger = logging.getLogger(__name__)

FORMAT_NAME = "fgkeras.index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.json"
# Loads tried in a row when the directory is replaced by another save while it is read.
LOAD_ATTEMPTS = 3


class IndexFormatError(ValueError):
    """A directory that is not a complete, intact index of a version this code reads."""


class Index(abc.ABC):
    """A searchable set of (string id, vector) pairs under the inner product (higher = closer).

    Our embeddings are L2-normalised, so the inner product is the cosine similarity. Ids are
    strings (product SKUs, file names), unique within an index. Rows are kept in a *storage order*:
    the order of `build`, with new ids appended by `upsert` and the last row moved into the place of
    a deleted one; `ids` and `embeddings` are always in the same order.

    Subclasses implement the search (`_search`) and keep their own structures in step through the
    `_on_*` hooks; this class holds the ids and vectors (the source of truth), checks every input
    and saves / loads.
    """

    kind = None
    _kinds = {}

    def __init_subclass__(cls, kind=None, **kwargs):
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind
            Index._kinds[kind] = cls

    @staticmethod
    def of_kind(kind):
        """A new, empty index of `kind`: "exact", "scann", or any other registered subclass's."""
        if kind not in Index._kinds:
            raise ValueError(f"`kind` must be one of {sorted(Index._kinds)}. Received: kind={kind!r}")
        return Index._kinds[kind]()

    def __init__(self):
        self._storage = _Storage()
        self._threads = None
        self._metadata = {}

    # ------------------------------------------------------------------ public API

    def build(self, embeddings, ids):
        """Replaces the contents with `embeddings` (N, D) and their `ids` (N unique strings).

        Returns:
            the index itself.
        """
        ids = _as_id_list(ids, "ids")
        embeddings = _check_matrix(embeddings, "embeddings", dim=None, rows=len(ids))
        _check_unique(ids, "ids")
        previous, self._storage = self._storage, _Storage()
        self._storage.reset(embeddings, ids)
        try:
            self._on_build()
        except BaseException:
            self._storage = previous  # a failed build leaves the index as it was
            raise
        return self

    def search(self, queries, k=10):
        """The `k` gallery items of largest inner product with each query, best first.

        Args:
            queries: (Q, D) or (D,) (one query) float array.
            k: positive int. An index of N < k items returns N columns.
        Returns:
            `(ids, scores)`: (Q, min(k, N)) object array of str ids and (Q, min(k, N)) float32
            inner products. An empty index returns (Q, 0) arrays.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"`k` must be a positive int. Received: k={k!r}")
        queries = _check_matrix(queries, "queries", dim=self._storage.dim, allow_vector=True)
        num = min(int(k), len(self))
        if num == 0:
            return np.empty((len(queries), 0), object), np.empty((len(queries), 0), np.float32)
        rows, scores = self._search(queries, num)
        return self._storage.ids[rows], np.asarray(scores, np.float32)

    def upsert(self, ids, embeddings):
        """Inserts new ids and replaces the vectors of known ones; visible to the next search.

        Args:
            ids: a string or a sequence of unique strings.
            embeddings: (len(ids), D), or (D,) for one id.
        Raises:
            ValueError: what `validate_upsert` raises; nothing is changed then.
        """
        ids, embeddings = self.validate_upsert(ids, embeddings)
        if not ids:
            return
        slots = self._storage.upsert(ids, embeddings)
        self._on_upsert(slots, embeddings)

    def validate_upsert(self, ids, embeddings):
        """Raises the ValueError that `upsert(ids, embeddings)` would raise, without changing anything.

        `upsert` calls it first, so a caller that records a change before applying it (a write-ahead
        log) can refuse the change before recording it.

        Returns:
            the checked `(ids, embeddings)`: a list of str and a (len(ids), D) float32 array.
        Raises:
            ValueError: `ids` are not unique strings; `embeddings` are not a finite real (len(ids), D)
                array of the index's D; or the kind refuses these vectors (a spherical ScaNN tree
                only takes L2-normalised ones).
        """
        ids = _as_id_list(ids, "ids", allow_single=True)
        embeddings = _check_matrix(embeddings, "embeddings", dim=self._storage.dim, rows=len(ids),
                                   allow_vector=True)
        _check_unique(ids, "ids")
        self._check_upsert_vectors(embeddings)
        return ids, embeddings

    def delete(self, ids, missing_ok=False):
        """Removes `ids` (a string or a sequence of strings).

        Raises:
            KeyError: naming the ids that are not in the index, unless `missing_ok` (then they are
                skipped). Nothing is deleted when it is raised.
        """
        ids = _as_id_list(ids, "ids", allow_single=True)
        unknown = [i for i in ids if i not in self._storage.rows]
        if unknown and not missing_ok:
            raise KeyError(f"{len(unknown)} id(s) not in the index: {preview(unknown)}")
        known = list(dict.fromkeys(i for i in ids if i in self._storage.rows))
        if not known:
            return
        rows = self._storage.delete(known)
        self._on_delete(rows)

    def save(self, directory):
        """Writes the index to `directory` atomically (see the module docstring for the layout).

        An existing index at `directory` is replaced; an existing directory that is not an index
        (non-empty, without a manifest.json) is refused rather than overwritten.
        """
        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory) and not (
            os.path.isdir(directory)
            and (not os.listdir(directory) or os.path.isfile(os.path.join(directory, MANIFEST)))
        ):
            raise ValueError(
                f"`directory` exists and is not an index directory (no {MANIFEST}); refusing to "
                f"overwrite it. Received: directory={directory!r}"
            )
        parent, name = os.path.split(directory)
        os.makedirs(parent, exist_ok=True)
        staging = make_temp_dir(parent, f".{name}.tmp-")  # the umask's mode: readable by a server
        try:
            files = {EMBEDDINGS_FILE: self._write_embeddings, IDS_FILE: self._write_ids}
            for relative, write in files.items():
                write(os.path.join(staging, relative))
            self._save_extra(staging)
            listed = {}
            for relative in _walk_files(staging):
                path = os.path.join(staging, relative)
                listed[relative] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "dim": self._storage.dim,
                "count": len(self),
                "dtype": "float32",
                "config": self._manifest_config(),
                "metadata": self._metadata,
                "files": listed,
                "fgkeras_version": _fgkeras_version(),
                "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            _write_json(os.path.join(staging, MANIFEST), manifest)
            fsync_tree(staging)  # every file, the manifest too, then the folders: durable before the rename
            swap_in(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("saved %s index of %d items to %s", self.kind, len(self), directory)

    @classmethod
    def load(cls, directory, verify=True):
        """Loads an index saved by `save`.

        `Index.load` returns the kind stored in the directory; `ExactIndex.load` / `ScannIndex.load`
        insist on their own kind.

        Args:
            verify: check the SHA-256 of every file (sizes are always checked).
        Raises:
            IndexFormatError: the directory is missing, incomplete, of another format version or
                kind, or any file is truncated, changed or malformed. The message names the problem.
        """
        directory = os.path.abspath(os.fspath(directory))
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            with _IndexFiles(directory) as files:
                try:
                    index = cls._load_from(files, verify)
                    if not files.replaced() or files.pinned:
                        return index
                    error = "ScaNN read its assets by path"
                except IndexFormatError as failure:
                    if attempt == LOAD_ATTEMPTS or not files.replaced():
                        raise
                    error = failure
            logger.warning("%s was replaced by another save while it was loaded (%s); loading it again",
                           directory, error)
        raise IndexFormatError(f"{directory} was replaced by other saves during {LOAD_ATTEMPTS} loads in a row.")

    @classmethod
    def _load_from(cls, files, verify):
        """Loads the index of the directory `files` holds open (one version of it, see `_IndexFiles`)."""
        manifest = _read_files(files, verify)
        kind = manifest["kind"]
        if cls is not Index and kind != cls.kind:
            raise IndexFormatError(
                f"{files.directory} holds a {kind!r} index, not {cls.kind!r}: load it with Index.load."
            )
        index = Index._kinds[kind]._from_manifest_config(manifest["config"])
        index._metadata = manifest["metadata"]
        embeddings = _read_embeddings(files, manifest)
        ids = _read_ids(files, manifest)
        index._storage.reset(embeddings, ids, copy=False)
        index._load_extra(files, manifest)
        logger.info("loaded %s index of %d items from %s", kind, len(index), files.directory)
        return index

    def __len__(self):
        return self._storage.size

    @property
    def threads(self):
        """Search threads (None: every core); settable at any time."""
        return self._threads

    @threads.setter
    def threads(self, value):
        if value is not None and not _is_positive_int(value):
            raise ValueError(f"`threads` must be a positive int or None. Received: threads={value!r}")
        self._threads = value
        self._on_threads()

    @property
    def metadata(self):
        """What the owner records about the contents (e.g. the model that made the vectors): a
        JSON-serialisable dict, `{}` by default, saved in the manifest and restored by `load`.

        Reading gives a copy: assign a new dict to change it (`index.metadata = {**index.metadata,
        "log_seq": 7}`). It is stored as JSON gives it back, so tuples read back as lists.
        """
        return json.loads(json.dumps(self._metadata))

    @metadata.setter
    def metadata(self, value):
        self._metadata = _as_metadata(value)

    @property
    def ids(self):
        """The ids in storage order: a (N,) object array of str (a copy)."""
        return self._storage.ids.copy()

    @property
    def embeddings(self):
        """The vectors in storage order (same order as `ids`): a read-only (N, D) float32 view,
        valid until the next `build` / `upsert` / `delete`."""
        view = self._storage.vectors.view()
        view.flags.writeable = False
        return view

    @property
    def dim(self):
        """The vector dimension, or None before the first `build` / `upsert`."""
        return self._storage.dim

    def __repr__(self):
        return f"{type(self).__name__}(count={len(self)}, dim={self.dim})"

    # ------------------------------------------------------------------ subclass hooks

    @abc.abstractmethod
    def _search(self, queries, k):
        """Rows (Q, k) into the storage and their scores (Q, k) for (Q, D) float32 queries, 1 <= k <= N."""

    def _on_build(self):
        """Called after the storage was replaced by `build` (or `load`)."""

    def _on_upsert(self, slots, embeddings):
        """Called after `upsert`: `slots[i]` is the row replaced by the i-th vector, or None when it
        was appended (appended rows follow the previous last row, in order)."""

    def _on_delete(self, rows):
        """Called after `delete`: each row in turn was removed by moving the last row into it."""

    def _on_threads(self):
        """Called after `threads` was set."""

    def _check_upsert_vectors(self, embeddings):
        """Raises a ValueError when the kind refuses these checked (n, D) float32 vectors for `upsert`."""

    def _manifest_config(self):
        return {}

    @classmethod
    def _from_manifest_config(cls, config):
        return cls()

    def _save_extra(self, directory):
        """Writes the kind's own files into the staging `directory`."""

    def _load_extra(self, files, manifest):
        """Restores the kind's own structures after the storage was loaded, from `files` (an
        `_IndexFiles`: `files.read(relative)` gives the checked bytes of a listed file,
        `files.directory_of(folder, names)` a directory of them for a library that opens files by name)."""
        self._on_build()

    def _write_embeddings(self, path):
        with open(path, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(self._storage.vectors), allow_pickle=False)

    def _write_ids(self, path):
        _write_json(path, self._storage.ids.tolist())


# ---------------------------------------------------------------------- storage


class _Storage:
    """Ids and float32 vectors in storage order.

    O(1) lookup of a row by id, amortised O(1) appends (capacity doubles) and deletion by moving the
    last row into the hole — the order ScaNN's pybind searcher keeps, so a row here is a datapoint
    index there.
    """

    # Spare rows allocated by `reset`, so that the first upserts after a build copy nothing.
    HEADROOM = 0.125

    def __init__(self):
        self.dim = None
        self.size = 0
        self.rows = {}
        self._vectors = np.empty((0, 0), np.float32)
        self._ids = np.empty(0, object)

    @property
    def vectors(self):
        return self._vectors[: self.size]

    @property
    def ids(self):
        return self._ids[: self.size]

    def reset(self, vectors, ids, copy=True):
        """Replaces the contents; a copy leaves room for `HEADROOM` × N appends."""
        self.dim = vectors.shape[1]
        self.size = len(ids)
        if copy:
            self._vectors = np.empty((self.size + int(self.HEADROOM * self.size), self.dim), np.float32)
            self._vectors[: self.size] = vectors
        else:
            self._vectors = np.ascontiguousarray(vectors, np.float32)
        self._ids = np.empty(len(self._vectors), object)
        self._ids[: self.size] = ids
        self.rows = {id_: row for row, id_ in enumerate(ids)}

    def permute(self, order):
        """Reorders the rows: row i becomes the old row `order[i]`."""
        vectors = np.empty_like(self._vectors)
        np.take(self.vectors, order, axis=0, out=vectors[: self.size])
        ids = np.empty_like(self._ids)
        ids[: self.size] = self.ids[order]
        self._vectors, self._ids = vectors, ids
        self.rows = {id_: row for row, id_ in enumerate(ids[: self.size].tolist())}

    def upsert(self, ids, vectors):
        if self.dim is None:
            self.reset(np.empty((0, vectors.shape[1]), np.float32), [])
        slots = [self.rows.get(i) for i in ids]
        new = [n for n, slot in enumerate(slots) if slot is None]
        self._reserve(self.size + len(new))
        old = [(n, slot) for n, slot in enumerate(slots) if slot is not None]
        if old:
            positions, rows = map(list, zip(*old))
            self._vectors[rows] = vectors[positions]
        if new:
            end = self.size + len(new)
            self._vectors[self.size:end] = vectors[new]
            self._ids[self.size:end] = [ids[n] for n in new]
            for row, n in enumerate(new, start=self.size):
                self.rows[ids[n]] = row
            self.size = end
        return slots

    def delete(self, ids):
        rows = []
        for id_ in ids:
            row = self.rows.pop(id_)
            last = self.size - 1
            if row != last:
                moved = self._ids[last]
                self._ids[row] = moved
                self._vectors[row] = self._vectors[last]
                self.rows[moved] = row
            self._ids[last] = None
            self.size = last
            rows.append(row)
        return rows

    def _reserve(self, size):
        capacity = len(self._vectors)
        if size <= capacity:
            return
        capacity = max(size, 2 * capacity, 1024)
        vectors = np.empty((capacity, self.dim), np.float32)
        vectors[: self.size] = self.vectors
        ids = np.empty(capacity, object)
        ids[: self.size] = self.ids
        self._vectors, self._ids = vectors, ids


# ---------------------------------------------------------------------- input checks


def _is_positive_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _as_metadata(value):
    """`value` as JSON gives it back, when it is a JSON-serialisable dict with str keys."""
    if not isinstance(value, dict):
        raise ValueError(f"`metadata` must be a dict. Received: {type(value).__name__} {value!r:.80}")
    pending = [value]
    while pending:  # JSON would turn other keys into strings, so the loaded index would differ
        item = pending.pop()
        if isinstance(item, dict):
            bad = [key for key in item if not isinstance(key, str)]
            if bad:
                raise ValueError(f"`metadata` keys must be strings. Received key {bad[0]!r} in {value!r:.200}")
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"`metadata` must be JSON-serialisable ({error}). Received: {value!r:.200}") from None


def _as_id_list(ids, name, allow_single=False):
    """`ids` as a list of str: a sequence of strings (or one string with `allow_single`); unchecked
    for uniqueness (see `_check_unique`)."""
    if isinstance(ids, str) and allow_single:
        return [str(ids)]
    if isinstance(ids, (str, bytes)) or ids is None or not hasattr(ids, "__len__"):
        raise ValueError(f"`{name}` must be a sequence of strings. Received: {type(ids).__name__} {ids!r:.80}")
    ids = list(np.asarray(ids, object).ravel()) if isinstance(ids, np.ndarray) else list(ids)
    bad = [(n, i) for n, i in enumerate(ids) if not isinstance(i, str)]
    if bad:
        n, value = bad[0]
        raise ValueError(
            f"`{name}` must all be strings; {len(bad)} are not, the first at position {n}: "
            f"{type(value).__name__} {value!r:.80}"
        )
    return [str(i) for i in ids]


def _check_unique(ids, name):
    if len(set(ids)) != len(ids):
        seen, duplicates = set(), []
        for i in ids:
            if i in seen and i not in duplicates:
                duplicates.append(i)
            seen.add(i)
        raise ValueError(f"`{name}` must be unique; duplicated: {preview(duplicates)}")


def _check_matrix(x, name, dim, rows=None, allow_vector=False):
    try:
        array = np.asarray(x)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{name}` must be a numeric array. Received: {type(x).__name__} ({error})") from None
    if array.dtype.kind not in "iuf":
        raise ValueError(f"`{name}` must be a real numeric array. Received dtype {array.dtype}")
    if allow_vector and array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        expected = "(n, dim) or (dim,)" if allow_vector else "(n, dim)"
        raise ValueError(f"`{name}` must have shape {expected}. Received shape {np.shape(x)}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"`{name}` must have dim {dim} (the index's). Received shape {np.shape(x)}")
    if array.shape[1] == 0:
        raise ValueError(f"`{name}` must have dim >= 1. Received shape {np.shape(x)}")
    if rows is not None and len(array) != rows:
        raise ValueError(f"`{name}` must have one row per id: {rows}. Received shape {np.shape(x)}")
    array = np.ascontiguousarray(array, np.float32)
    if not np.isfinite(array).all():
        bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise ValueError(
            f"`{name}` must be finite; {len(bad)} row(s) hold NaN or inf (or overflow float32), "
            f"rows {preview(bad.tolist())}"
        )
    return array


# ---------------------------------------------------------------------- files


class _IndexFiles:
    """One version of an index directory, each file opened once, then checked and read from that handle.

    `save` swaps a new version in by renaming directories and never changes a file in place, so a
    save that lands while an index is loaded cannot mix its files in: every file is opened relative
    to the directory handle opened first, and an open file stays readable when that version is
    removed. (A version removed before its files were opened shows them missing; `replaced()` then
    tells `load` to read the new one.) ScaNN opens its assets by name: `directory_of` gives it a
    private directory of links to the handles (`/proc/self/fd`); where those do not exist (`pinned`
    is False), the plain path, and `load` checks afterwards that the directory was not replaced.
    """

    def __init__(self, directory):
        self.directory = directory
        try:
            self._fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise IndexFormatError(f"no index at {directory}: not a directory.") from None
        status = os.fstat(self._fd)
        self._identity = (status.st_dev, status.st_ino)
        self._files = {}
        self._links = []
        self._relative_open = os.open in os.supports_dir_fd
        self.pinned = self._relative_open and os.path.isdir(f"/proc/self/fd/{self._fd}")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        for folder in self._links:
            shutil.rmtree(folder, ignore_errors=True)
        for f in self._files.values():
            f.close()
        self._files, self._links = {}, []
        os.close(self._fd)

    def open(self, relative):
        """The open binary file `relative` (a "/"-separated path inside the directory), at offset 0;
        opened once. Raises IndexFormatError when it is missing or not a regular file."""
        f = self._files.get(relative)
        if f is None:
            try:
                if self._relative_open:
                    fd = os.open(relative, os.O_RDONLY, dir_fd=self._fd)
                else:
                    fd = os.open(os.path.join(self.directory, *relative.split("/")), os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                fd = None
            if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                fd = None
            if fd is None:
                if relative == MANIFEST:
                    raise IndexFormatError(
                        f"{self.directory} has no {MANIFEST}: not an fgkeras index, or a save that never "
                        "completed."
                    )
                raise IndexFormatError(f"{relative} is missing from {self.directory}: the index is incomplete.")
            f = self._files[relative] = os.fdopen(fd, "rb")
        f.seek(0)
        return f

    def read(self, relative):
        """The bytes of `relative`, from its one handle."""
        return self.open(relative).read()

    def size(self, relative):
        return os.fstat(self.open(relative).fileno()).st_size

    def directory_of(self, folder, names):
        """A directory holding `names` (files of `folder`, inside the index) as they were checked:
        a private directory of links to their handles when `pinned`, else the folder's plain path."""
        if not self.pinned:
            return os.path.join(self.directory, *folder.split("/"))
        links = tempfile.mkdtemp(prefix="fgkeras-index-")
        self._links.append(links)
        for name in names:
            os.symlink(f"/proc/self/fd/{self.open(f'{folder}/{name}').fileno()}", os.path.join(links, name))
        return links

    def replaced(self):
        """True when `directory` no longer names the directory held open (another save swapped it)."""
        try:
            status = os.stat(self.directory)
        except OSError:
            return True
        return (status.st_dev, status.st_ino) != self._identity


def read_manifest(directory, verify=True):
    """The checked manifest of an index directory: every listed file present, of the listed size
    and (with `verify`) SHA-256. Raises `IndexFormatError` naming the problem."""
    with _IndexFiles(os.path.abspath(os.fspath(directory))) as files:
        return _read_files(files, verify)


def _read_files(files, verify):
    """The manifest of the directory `files` holds open, every listed file checked from its handle."""
    directory = files.directory
    path = os.path.join(directory, MANIFEST)
    try:
        manifest = json.loads(files.read(MANIFEST).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexFormatError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{path} is not an fgkeras index manifest (no \"format\": \"{FORMAT_NAME}\").")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise IndexFormatError(f"{path}: `format_version` must be an int. Received {version!r}")
    if version != FORMAT_VERSION:
        newer = "a newer" if version > FORMAT_VERSION else "an older, unsupported"
        raise IndexFormatError(
            f"{directory} was written in {newer} index format (version {version}); this fgkeras "
            f"reads version {FORMAT_VERSION}."
        )
    if manifest.get("kind") not in Index._kinds:
        raise IndexFormatError(f"{path}: unknown index kind {manifest.get('kind')!r}; known: {sorted(Index._kinds)}")
    for key in ("dim", "count"):
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "dim" else 0):
            raise IndexFormatError(f"{path}: `{key}` must be a non-negative int. Received {value!r}")
    if manifest.get("dtype") != "float32":
        raise IndexFormatError(f"{path}: `dtype` must be 'float32'. Received {manifest.get('dtype')!r}")
    if not isinstance(manifest.get("config"), dict):
        raise IndexFormatError(f"{path}: `config` must be an object.")
    manifest.setdefault("metadata", {})  # manifests written before metadata existed
    if not isinstance(manifest["metadata"], dict):
        raise IndexFormatError(f"{path}: `metadata` must be an object. Received {manifest['metadata']!r:.80}")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or EMBEDDINGS_FILE not in listed or IDS_FILE not in listed:
        raise IndexFormatError(f"{path}: `files` must list {EMBEDDINGS_FILE} and {IDS_FILE}.")
    for relative, entry in listed.items():
        _check_listed_file(files, relative, entry, verify)
    return manifest


def _check_listed_file(files, relative, entry, verify):
    directory = files.directory
    parts = relative.split("/")
    if os.path.isabs(relative) or any(p in ("", ".", "..") for p in parts):
        raise IndexFormatError(f"manifest lists a file outside the index directory: {relative!r}")
    if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
        raise IndexFormatError(f"manifest entry of {relative!r} must have int `bytes` and str `sha256`.")
    size = files.size(relative)
    if size != entry["bytes"]:
        raise IndexFormatError(
            f"{relative} in {directory} is {size} bytes, the manifest says {entry['bytes']}: "
            "truncated, or changed after saving."
        )
    if verify and _sha256_of(files.open(relative)) != entry["sha256"]:
        raise IndexFormatError(
            f"{relative} in {directory} does not match its SHA-256 in the manifest: corrupted, or changed "
            "after saving."
        )


def _read_embeddings(files, manifest):
    directory = files.directory
    try:
        embeddings = np.lib.format.read_array(files.open(EMBEDDINGS_FILE), allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise IndexFormatError(f"{EMBEDDINGS_FILE} in {directory} is not a readable .npy array: {error}") from None
    expected = (manifest["count"], manifest["dim"])
    if embeddings.dtype != np.float32 or embeddings.shape != expected:
        raise IndexFormatError(
            f"{EMBEDDINGS_FILE} in {directory} holds {embeddings.dtype} {embeddings.shape}; the manifest "
            f"says float32 {expected}."
        )
    if not np.isfinite(embeddings).all():
        raise IndexFormatError(f"{EMBEDDINGS_FILE} in {directory} holds NaN or inf.")
    return embeddings


def _read_ids(files, manifest):
    directory = files.directory
    try:
        ids = json.loads(files.read(IDS_FILE).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexFormatError(f"{IDS_FILE} in {directory} is not a UTF-8 JSON list: {error}") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise IndexFormatError(f"{IDS_FILE} in {directory} must be a JSON list of strings.")
    if len(ids) != manifest["count"]:
        raise IndexFormatError(
            f"{IDS_FILE} in {directory} has {len(ids)} ids; the manifest says {manifest['count']}."
        )
    if len(set(ids)) != len(ids):
        raise IndexFormatError(f"{IDS_FILE} in {directory} holds duplicated ids.")
    return ids


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, separators=(",", ":") if isinstance(value, list) else None,
                  indent=None if isinstance(value, list) else 1, allow_nan=False)


def _sha256(path):
    with open(path, "rb") as f:
        return _sha256_of(f)


def _sha256_of(f, block=1 << 22):
    """The hex SHA-256 of what is left to read in the binary file `f`."""
    digest = hashlib.sha256()
    while chunk := f.read(block):
        digest.update(chunk)
    return digest.hexdigest()


def _walk_files(root):
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def _fgkeras_version():
    from fgkeras import __version__

    return __version__


def recall_at_k(approx_rows, exact_rows):
    """Mean over queries of |approx top-k ∩ exact top-k| / k (rows or ids, (Q, k) arrays)."""
    recalls = recall_per_query(approx_rows, exact_rows)
    return float(recalls.mean()) if recalls.size else 1.0


def recall_per_query(approx_rows, exact_rows):
    """(Q,) float64: |approx top-k ∩ exact top-k| / k of each query (rows or ids, (Q, k) arrays)."""
    approx_rows, exact_rows = np.asarray(approx_rows), np.asarray(exact_rows)
    if exact_rows.size == 0:
        return np.ones(len(exact_rows))
    k = exact_rows.shape[1]
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx_rows, exact_rows)]
    return np.asarray(hits, np.float64) / k
