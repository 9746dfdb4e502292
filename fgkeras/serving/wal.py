"""A write-ahead log that tells a torn tail from corruption, and never loses an acknowledged record.

```
file header (24 bytes)   magic b"\\x89FGKWAL\\n" | u32 format version (2) | u64 seq floor | u32 CRC-32
record (20 + n bytes)    magic b"\\xf3WR\\x1e"     | u64 seq | u32 length n | u32 CRC-32 | payload (n bytes)
```

All integers are little-endian. The header's CRC covers its version and seq floor; a record's CRC
covers its seq, its length and its payload. The seq floor is the smallest seq the next append may
take: `rewrite` stores it, so the numbering goes on after the log was emptied or compacted. The
next seq at open is the larger of the floor and the last record's seq + 1; seqs strictly increase
through the file (rewritten ones may have gaps, appended ones follow each other).

Reading (at open) verifies every record. A record that does not verify (bad magic, length above
`MAX_RECORD_BYTES`, shorter than its length, wrong CRC, or a seq that does not increase) starts a
damaged region, and the reader scans forward for the record magic until a record verifies there:

- none does: the damaged region is a torn tail, the last append of a process that died while
  writing it, before it could be acknowledged. It is dropped (the file is truncated there) and
  logged, in every recovery mode.
- one does: acknowledged records follow the damage, so it is corruption (a bad disk, a stray
  write), not a crash. `recovery="strict"` (the default) refuses to open: `WalCorruptionError`
  names the file, the offset and how many valid records follow. `recovery="skip-corrupt"` opens
  with the valid records, logs each damaged region (offset, size, the seqs around it), keeps the
  damaged file beside the log (`<path>.corrupt-<n>`) and rewrites the log without the damage.

A damaged file header is always an error (`WalHeaderError`): without it the seq floor is unknown.

Format version 1 is the framing that `fgkeras.serving.inventory` wrote before this module: no file
header, records of (u32 length, u32 CRC-32 of the payload, payload). Such a log is read (seqs
1, 2, ... in file order) and rewritten in the current format atomically before `WriteAheadLog`
returns. Version 1 frames carry no magic, so the reader cannot scan past a damaged one: a frame
whose length runs past the end of the file is a torn tail; a frame that ends inside the file with a
wrong CRC is corruption, and the frames that follow it are counted (and kept, with
`skip-corrupt`) by following the lengths from there.

Appending writes the whole record with one `os.write` and `fsync`s it before returning. When
either fails (a short write, `ENOSPC`, an `fsync` error), the file is truncated back to its length
before the append and the error is raised: the log is exactly what it was. If even that truncation
fails, the log refuses every later append until it is reopened (the reader keeps that record if it
reached the file whole, and drops it as a torn tail otherwise) or rewritten.

`read_entries` reads a log without changing it, for a process beside the one that appends.
"""

import dataclasses
import logging
import mmap
import os
import struct
import threading
import zlib

from fgkeras._files import write_atomic

logger = logging.getLogger(__name__)

RECOVERY_MODES = ("strict", "skip-corrupt")
FORMAT_VERSION = 2
MAX_RECORD_BYTES = 64 * 1024 * 1024

_FILE_MAGIC = b"\x89FGKWAL\n"
_HEADER = struct.Struct("<8sIQI")       # magic, format version, seq floor, CRC-32 of (version, floor)
_RECORD_MAGIC = b"\xf3WR\x1e"
_RECORD = struct.Struct("<4sQII")       # magic, seq, payload length, CRC-32 of (seq, length, payload)
_SEQ_LENGTH = struct.Struct("<QI")
_V1_FRAME = struct.Struct("<II")        # version 1: payload length, CRC-32 of the payload


class WalCorruptionError(Exception):
    """A log damaged before its tail: valid records follow the damage.

    Attributes:
        path: the log file.
        offset: byte offset of the first record that does not verify.
        records_after: valid records found after it.
    """

    def __init__(self, path, offset, records_after, detail=""):
        self.path = path
        self.offset = offset
        self.records_after = records_after
        super().__init__(self._message(detail))

    def _message(self, detail):
        return (f"the write-ahead log {self.path} is corrupt at byte offset {self.offset}{detail}, and "
                f"{self.records_after} valid record(s) follow it: this is damage, not a torn write. Open it "
                "with recovery='skip-corrupt' to start anyway without the corrupt record(s) (the damaged file "
                "is kept beside the log).")


class WalHeaderError(WalCorruptionError):
    """The log's file header is damaged: its seq floor is lost, no recovery mode opens it."""

    def _message(self, detail):
        return (f"the write-ahead log {self.path} has a damaged file header (byte offset {self.offset}{detail}; "
                f"{self.records_after} valid record(s) follow it). Its seq floor is lost, so no recovery mode "
                "opens it: restore the file from a backup, or move it aside to start an empty log.")


@dataclasses.dataclass(frozen=True)
class LogEntry:
    """One record of the log.

    Attributes:
        seq: its sequence number, strictly increasing through the log, from 1 in a new log.
        payload: its bytes.
    """

    seq: int
    payload: bytes


@dataclasses.dataclass
class _Scan:
    """What the reader found in a file."""

    entries: list
    floor: int
    end: int                    # where the valid records end: the file is truncated there
    damaged: list               # (offset, size, valid records before it) of each damaged region before the tail
    version: int


class WriteAheadLog:
    """An append-only log of byte records, durable on return, with checked recovery.

    Args:
        path: the log file; created (empty, seqs from 1) when missing.
        recovery: what to do with a log damaged before its tail: "strict" raises
            `WalCorruptionError`, "skip-corrupt" opens without the damaged records.

    Attributes:
        path: the log file (absolute).
        entries: the `LogEntry` records read at open (after recovery), in order; not updated by
            later appends or rewrites.
        next_seq: the seq the next append gets.

    Raises:
        WalCorruptionError: damage before the tail, with `recovery="strict"`.
        WalHeaderError: a damaged file header, in every mode.
        ValueError: an unknown `recovery`, or `path` is a directory.
    """

    def __init__(self, path, recovery="strict"):
        if recovery not in RECOVERY_MODES:
            raise ValueError(f"`recovery` must be one of {RECOVERY_MODES}. Received: recovery={recovery!r}")
        self.path = os.path.abspath(os.fspath(path))
        if os.path.isdir(self.path):
            raise ValueError(f"`path` must be a file, not a directory. Received: path={path!r}")
        self.recovery = recovery
        self._lock = threading.Lock()
        self._fd = None
        self._broken = None  # the error that left the file in an unknown state
        scan = self._read()
        if scan.damaged and recovery == "strict":
            offset, size, before = scan.damaged[0]
            raise WalCorruptionError(self.path, offset, len(scan.entries) - before, f" ({size} bytes do not verify)")
        self.entries = scan.entries
        self.next_seq = max(scan.floor, scan.entries[-1].seq + 1 if scan.entries else 1)
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        if scan.end < size:
            logger.warning("dropping a torn record at the end of the write-ahead log %s: %d bytes from byte offset "
                           "%d (a write that did not finish, so it was never acknowledged)",
                           self.path, size - scan.end, scan.end)
        if scan.damaged:
            self._report_skipped(scan)
            self._keep_damaged_copy()
        elif scan.version == 1:
            logger.info("converting the version 1 write-ahead log %s (%d records) to format version %d",
                        self.path, len(scan.entries), FORMAT_VERSION)
        if scan.version != FORMAT_VERSION or scan.damaged:
            write_atomic(self.path, self._encode(scan.entries, self.next_seq))
        elif scan.end < size:
            with open(self.path, "r+b") as f:
                f.truncate(scan.end)
                os.fsync(f.fileno())
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size

    # ------------------------------------------------------------------ writing

    def append(self, payload):
        """Appends one record, durably (written and fsynced) before returning.

        Args:
            payload: bytes-like, at most `MAX_RECORD_BYTES`.

        Returns:
            The record's seq.

        Raises:
            OSError: the write or the fsync failed (the file is back to its length before the
                call), or the log is closed or in an unknown state after an earlier failure.
        """
        payload = _check_payload(payload, "payload")
        with self._lock:
            self._check_writable()
            seq = self.next_seq
            record = _encode_record(seq, payload)
            before = self._size
            try:
                written = os.write(self._fd, record)
                if written != len(record):
                    raise OSError(f"short write to {self.path}: {written} of {len(record)} bytes")
                os.fsync(self._fd)
            except BaseException as error:
                self._roll_back(before, error)
                raise
            self._size = before + len(record)
            self.next_seq = seq + 1
            return seq

    def rewrite(self, entries, next_seq=None):
        """Replaces the whole log by `entries`, atomically (compaction, or after a snapshot).

        A temporary file beside the log is written and fsynced, renamed over it and the directory
        fsynced: a crash leaves the old log or the new one. Seqs stay monotonic: the next append
        gets at least `next_seq`.

        Args:
            entries: `LogEntry` records with strictly increasing seqs (an empty list empties the log).
            next_seq: the seq of the next append; None takes the smallest allowed: the larger of
                the current `next_seq` and the last entry's seq + 1.

        Raises:
            ValueError: entries that are not `LogEntry`s with increasing positive seqs, or a
                `next_seq` below the allowed minimum.
            OSError: the new file could not be written (the old log is intact and still open).
                A log that refuses appends after a failed rollback is repaired by a rewrite.
        """
        entries = list(entries)
        previous = 0
        for position, entry in enumerate(entries):
            if not isinstance(entry, LogEntry):
                raise ValueError(f"`entries` must hold LogEntry records. Received: entries[{position}]="
                                 f"{type(entry).__name__}")
            if isinstance(entry.seq, bool) or not isinstance(entry.seq, int) or entry.seq <= previous:
                raise ValueError("`entries` must have strictly increasing positive int seqs. Received: "
                                 f"entries[{position}].seq={entry.seq!r} after {previous}")
            _check_payload(entry.payload, f"entries[{position}].payload")
            previous = entry.seq
        with self._lock:
            if self._fd is None:
                raise OSError(f"the write-ahead log {self.path} is closed")
            lowest = max(self.next_seq, previous + 1)
            if next_seq is None:
                next_seq = lowest
            elif isinstance(next_seq, bool) or not isinstance(next_seq, int) or next_seq < lowest:
                raise ValueError(f"`next_seq` must be an int >= {lowest} (the current next seq and the last "
                                 f"entry's seq + 1). Received: next_seq={next_seq!r}")
            write_atomic(self.path, self._encode(entries, next_seq))
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            except OSError as error:
                self._broken = error
                raise
            os.close(self._fd)
            self._fd = fd
            self._size = os.fstat(fd).st_size
            self.next_seq = next_seq
            self._broken = None  # a new file: whatever a failed append left is gone

    def close(self):
        """Closes the file; safe to call more than once."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # ------------------------------------------------------------------ internals: writing

    def _check_writable(self):
        if self._fd is None:
            raise OSError(f"the write-ahead log {self.path} is closed")
        if self._broken is not None:
            raise OSError(f"the write-ahead log {self.path} is in an unknown state after a failed append that "
                          f"could not be rolled back ({self._broken}); reopen it") from self._broken

    def _roll_back(self, size, error):
        """Truncates the file back to `size` after a failed append; marks the log broken if it cannot."""
        try:
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        except OSError as failure:
            self._broken = failure
            logger.error("could not roll %s back to %d bytes after a failed append (%s): %s; the log refuses "
                         "appends until it is reopened", self.path, size, error, failure)
        else:
            logger.warning("append to %s failed (%s): rolled back to %d bytes", self.path, error, size)

    @staticmethod
    def _encode(entries, floor):
        return _encode_header(floor) + b"".join(_encode_record(entry.seq, entry.payload) for entry in entries)

    # ------------------------------------------------------------------ internals: reading

    def _read(self):
        return _scan_file(self.path)

    def _report_skipped(self, scan):
        for offset, size, before in scan.damaged:
            after = scan.entries[before].seq if before < len(scan.entries) else None
            logger.warning("skip-corrupt: skipping %d corrupt bytes at byte offset %d of the write-ahead log %s, "
                           "between the records of seq %s and %s", size, offset, self.path,
                           scan.entries[before - 1].seq if before else "(none)", after)

    def _keep_damaged_copy(self):
        number = 1
        while os.path.exists(f"{self.path}.corrupt-{number}"):
            number += 1
        aside = f"{self.path}.corrupt-{number}"
        with open(self.path, "rb") as f:
            write_atomic(aside, f.read())
        logger.warning("skip-corrupt: the damaged log is kept as %s", aside)


def read_entries(path, recovery="strict"):
    """The records of the log at `path`, read without changing the file: for a reader beside the
    process that appends to it (`fgkeras index` beside a running server). A torn tail is ignored;
    damage before it raises `WalCorruptionError` unless `recovery="skip-corrupt"` (then skipped)."""
    if recovery not in RECOVERY_MODES:
        raise ValueError(f"`recovery` must be one of {RECOVERY_MODES}. Received: recovery={recovery!r}")
    path = os.path.abspath(os.fspath(path))
    scan = _scan_file(path)
    if scan.damaged and recovery == "strict":
        offset, size, before = scan.damaged[0]
        raise WalCorruptionError(path, offset, len(scan.entries) - before, f" ({size} bytes do not verify)")
    return scan.entries


def _scan_file(path):
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return _Scan(entries=[], floor=1, end=0, damaged=[], version=0)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:len(_FILE_MAGIC)] == _FILE_MAGIC:
            return _scan_current(path, data)
        if _is_header_but_magic(data):
            raise WalHeaderError(path, 0, _count_records(data, _HEADER.size), ": its magic does not match")
        scan = _read_v1(data)
        if scan.end < len(data) or scan.damaged:
            found = _count_records(data, 0)
            if found:  # current-format records behind a damaged magic, not a version 1 log
                raise WalHeaderError(path, 0, found, ": its magic does not match")
        return scan


def _scan_current(path, data):
    if len(data) < _HEADER.size:
        raise WalHeaderError(path, 0, 0, f": the file has {len(data)} bytes, the header alone {_HEADER.size}")
    _, version, floor, crc = _HEADER.unpack_from(data, 0)
    if zlib.crc32(data[len(_FILE_MAGIC):_HEADER.size - 4]) != crc:
        raise WalHeaderError(path, 0, _count_records(data, _HEADER.size), ": its checksum does not match")
    if version != FORMAT_VERSION:
        raise WalHeaderError(path, 0, _count_records(data, _HEADER.size),
                             f": format version {version}, this reader knows {FORMAT_VERSION} and 1")
    entries, end, damaged = _scan_records(data, _HEADER.size)
    return _Scan(entries=entries, floor=floor, end=end, damaged=damaged, version=version)


# ---------------------------------------------------------------------- encoding and scanning


def _check_payload(payload, name):
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ValueError(f"`{name}` must be bytes. Received: {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"`{name}` must hold at most {MAX_RECORD_BYTES} bytes. Received: {len(payload)} bytes")
    return payload


def _encode_header(floor):
    body = struct.pack("<IQ", FORMAT_VERSION, floor)
    return _FILE_MAGIC + body + struct.pack("<I", zlib.crc32(body))


def _is_header_but_magic(data):
    """True when `data` starts with a current file header whose magic alone is damaged."""
    if len(data) < _HEADER.size:
        return False
    _, version, _, crc = _HEADER.unpack_from(data, 0)
    return version == FORMAT_VERSION and zlib.crc32(data[len(_FILE_MAGIC):_HEADER.size - 4]) == crc


def _encode_record(seq, payload):
    crc = zlib.crc32(payload, zlib.crc32(_SEQ_LENGTH.pack(seq, len(payload))))
    return _RECORD.pack(_RECORD_MAGIC, seq, len(payload), crc) + payload


def _record_at(data, position, previous_seq):
    """The `LogEntry` of the record that verifies at `position` (its seq above `previous_seq`), or None."""
    if position + _RECORD.size > len(data):
        return None
    magic, seq, length, crc = _RECORD.unpack_from(data, position)
    if magic != _RECORD_MAGIC or length > MAX_RECORD_BYTES or seq <= previous_seq:
        return None
    start = position + _RECORD.size
    if start + length > len(data):
        return None
    payload = data[start:start + length]
    if zlib.crc32(payload, zlib.crc32(_SEQ_LENGTH.pack(seq, length))) != crc:
        return None
    return LogEntry(seq, payload)


def _scan_records(data, position):
    """Reads the records from `position`, resynchronising on the record magic after damage.

    Returns:
        `(entries, end, damaged)`: the valid records, where the last one ends (the rest is a torn
        tail) and `(offset, size, valid records before it)` of every damaged region before it.
    """
    entries, damaged, previous = [], [], 0
    while position < len(data):
        entry = _record_at(data, position, previous)
        if entry is not None:
            entries.append(entry)
            previous = entry.seq
            position += _RECORD.size + len(entry.payload)
            continue
        candidate = data.find(_RECORD_MAGIC, position + 1)
        while candidate != -1 and _record_at(data, candidate, previous) is None:
            candidate = data.find(_RECORD_MAGIC, candidate + 1)
        if candidate == -1:
            break  # nothing verifies after it: a torn tail
        damaged.append((position, candidate - position, len(entries)))
        position = candidate
    return entries, position, damaged


def _count_records(data, position):
    """How many records verify from `position` on (for error messages)."""
    return len(_scan_records(data, position)[0])


def _read_v1(data):
    """Version 1 frames: no magic to resynchronise on, so a damaged frame is skipped by its length field."""
    entries, damaged, position = [], [], 0
    while position + _V1_FRAME.size <= len(data):
        length, crc = _V1_FRAME.unpack_from(data, position)
        stop = position + _V1_FRAME.size + length
        if length > MAX_RECORD_BYTES or stop > len(data):
            break  # runs past the end: a torn tail
        payload = data[position + _V1_FRAME.size:stop]
        if zlib.crc32(payload) == crc:
            entries.append(LogEntry(len(entries) + 1, payload))
        else:
            damaged.append((position, stop - position, len(entries)))
        position = stop
    if damaged and damaged[-1][0] + damaged[-1][1] == position and damaged[-1][2] == len(entries):
        position = damaged.pop()[0]  # the last frame is the bad one: a torn tail
    return _Scan(entries=entries, floor=1, end=position, damaged=damaged, version=1)
