import logging
import os
import struct
import zlib

import pytest

from fgkeras.serving import wal as wal_module
from fgkeras.serving.wal import LogEntry, WalCorruptionError, WalHeaderError, WriteAheadLog, read_entries

HEADER_BYTES = 24
RECORD_OVERHEAD = 20


def _payloads(n):
    return [f"change {i} ".encode() * (i % 4 + 1) for i in range(n)]


def _filled(path, payloads):
    with WriteAheadLog(path) as log:
        for payload in payloads:
            log.append(payload)
    return path


def _record_offsets(payloads):
    """Byte offset of each record in a fresh log of `payloads`, and the file size."""
    offsets, position = [], HEADER_BYTES
    for payload in payloads:
        offsets.append(position)
        position += RECORD_OVERHEAD + len(payload)
    return offsets, position


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def _v1_log(path, payloads):
    """Today's framing, by hand: (u32 length, u32 CRC-32 of the payload, payload), no file header."""
    with open(path, "wb") as f:
        for payload in payloads:
            f.write(struct.pack("<II", len(payload), zlib.crc32(payload)) + payload)


def test_round_trip(tmp_path):
    path = tmp_path / "log.wal"
    payloads = _payloads(5) + [b"", bytes(range(256))]
    with WriteAheadLog(path) as log:
        assert log.entries == [] and log.next_seq == 1
        assert [log.append(p) for p in payloads] == list(range(1, 8))
    reopened = WriteAheadLog(path)
    assert reopened.entries == [LogEntry(seq, p) for seq, p in enumerate(payloads, start=1)]
    assert reopened.next_seq == 8
    reopened.close()


def test_seqs_continue_across_reopen_and_rewrite(tmp_path):
    path = tmp_path / "log.wal"
    _filled(path, _payloads(3))
    log = WriteAheadLog(path)
    assert log.append(b"four") == 4
    log.rewrite([])
    assert log.next_seq == 5 and os.path.getsize(path) == HEADER_BYTES
    log.close()
    log = WriteAheadLog(path)
    assert log.entries == [] and log.next_seq == 5  # the header keeps the floor of an emptied log
    assert log.append(b"five") == 5
    log.rewrite([LogEntry(5, b"five")], next_seq=100)
    assert log.append(b"hundred") == 100
    log.close()
    log = WriteAheadLog(path)
    assert [e.seq for e in log.entries] == [5, 100] and log.next_seq == 101
    with pytest.raises(ValueError, match="next_seq=50"):
        log.rewrite([], next_seq=50)
    with pytest.raises(ValueError, match=r"entries\[1\]\.seq=3"):
        log.rewrite([LogEntry(3, b"a"), LogEntry(3, b"b")])
    log.close()


def test_old_format_log_is_read_and_converted(tmp_path, caplog):
    path = tmp_path / "log.wal"
    payloads = _payloads(4)
    _v1_log(path, payloads)
    with caplog.at_level(logging.INFO, logger="fgkeras.serving.wal"):
        log = WriteAheadLog(path)
    assert log.entries == [LogEntry(seq, p) for seq, p in enumerate(payloads, start=1)]
    assert "version 1" in caplog.text
    assert log.append(b"new") == 5
    log.close()
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89FGKWAL\n"  # rewritten in the current format
    reopened = WriteAheadLog(path)
    assert [e.payload for e in reopened.entries] == payloads + [b"new"]
    reopened.close()


def test_old_format_torn_tail_is_dropped_and_corruption_is_refused(tmp_path):
    payloads = _payloads(4)
    torn = tmp_path / "torn.wal"
    _v1_log(torn, payloads)
    with open(torn, "r+b") as f:
        f.truncate(os.path.getsize(torn) - 3)
    log = WriteAheadLog(torn)
    assert [e.payload for e in log.entries] == payloads[:3]
    log.close()
    corrupt = tmp_path / "corrupt.wal"
    _v1_log(corrupt, payloads)
    second = 8 + len(payloads[0])
    _flip(corrupt, second + 8 + 1)  # a payload byte of the second frame
    with pytest.raises(WalCorruptionError) as error:
        WriteAheadLog(corrupt)
    assert (error.value.offset, error.value.records_after) == (second, 2)
    log = WriteAheadLog(corrupt, recovery="skip-corrupt")
    assert [e.payload for e in log.entries] == [payloads[0]] + payloads[2:]
    log.close()


def test_torn_tail_at_every_offset_of_the_last_record_is_dropped(tmp_path, caplog):
    payloads = _payloads(4)
    offsets, size = _record_offsets(payloads)
    pristine = _filled(tmp_path / "pristine.wal", payloads)
    with open(pristine, "rb") as f:
        data = f.read()
    assert len(data) == size
    for cut in range(offsets[-1] + 1, size):
        path = tmp_path / f"cut{cut}.wal"
        path.write_bytes(data[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fgkeras.serving.wal"):
            log = WriteAheadLog(path)
        assert [e.payload for e in log.entries] == payloads[:-1], cut
        assert f"byte offset {offsets[-1]}" in caplog.text, cut
        assert os.path.getsize(path) == offsets[-1]
        assert log.append(b"after") == 4
        log.close()
        reopened = WriteAheadLog(path)
        assert [e.payload for e in reopened.entries] == payloads[:-1] + [b"after"], cut
        reopened.close()


@pytest.mark.parametrize("where", [0, 5, 13, 17, 25])  # magic, seq, length, crc, payload
def test_a_flipped_byte_in_a_middle_record_refuses_to_open(tmp_path, where):
    payloads = _payloads(6)
    offsets, _ = _record_offsets(payloads)
    path = _filled(tmp_path / "log.wal", payloads)
    before = path.read_bytes()
    _flip(path, offsets[2] + where)
    with pytest.raises(WalCorruptionError, match="skip-corrupt") as error:
        WriteAheadLog(path)
    assert error.value.offset == offsets[2] and error.value.records_after == 3
    assert error.value.path == str(path)
    assert str(path) in str(error.value) and str(offsets[2]) in str(error.value) and "3 valid" in str(error.value)
    assert len(path.read_bytes()) == len(before)  # strict changes nothing


def test_skip_corrupt_keeps_the_other_records_and_logs_the_skip(tmp_path, caplog):
    payloads = _payloads(6)
    offsets, _ = _record_offsets(payloads)
    path = _filled(tmp_path / "log.wal", payloads)
    _flip(path, offsets[2] + RECORD_OVERHEAD + 2)
    with caplog.at_level(logging.WARNING, logger="fgkeras.serving.wal"):
        log = WriteAheadLog(path, recovery="skip-corrupt")
    assert [e.seq for e in log.entries] == [1, 2, 4, 5, 6]
    assert [e.payload for e in log.entries] == payloads[:2] + payloads[3:]
    assert f"byte offset {offsets[2]}" in caplog.text and "seq 2 and 4" in caplog.text
    assert log.append(b"seven") == 7
    log.close()
    assert os.path.exists(f"{path}.corrupt-1")  # the damaged file is kept
    reopened = WriteAheadLog(path)  # the log itself no longer holds the damage: strict opens it
    assert [e.seq for e in reopened.entries] == [1, 2, 4, 5, 6, 7]
    reopened.close()


def test_a_flipped_byte_in_the_last_record_is_a_torn_tail(tmp_path, caplog):
    payloads = _payloads(5)
    offsets, _ = _record_offsets(payloads)
    for where in (0, 9, 13, 17, RECORD_OVERHEAD + 1):
        path = _filled(tmp_path / f"log{where}.wal", payloads)
        _flip(path, offsets[-1] + where)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fgkeras.serving.wal"):
            log = WriteAheadLog(path)
        assert [e.payload for e in log.entries] == payloads[:-1], where
        assert "torn" in caplog.text
        assert log.append(b"next") == 5
        log.close()


def test_failed_short_write_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "log.wal"
    _filled(path, _payloads(2))
    before = path.read_bytes()
    log = WriteAheadLog(path)
    real_write = os.write
    monkeypatch.setattr(wal_module.os, "write", lambda fd, data: real_write(fd, data[:len(data) // 2]))
    with pytest.raises(OSError, match="short write"):
        log.append(b"x" * 100)
    assert path.read_bytes() == before and log.next_seq == 3
    monkeypatch.setattr(wal_module.os, "write", real_write)
    assert log.append(b"works") == 3
    log.close()
    assert [e.payload for e in WriteAheadLog(path).entries][-1] == b"works"


def test_failed_fsync_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "log.wal"
    _filled(path, _payloads(2))
    before = path.read_bytes()
    log = WriteAheadLog(path)
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 1:  # the append's fsync fails; the rollback's succeeds
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(wal_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        log.append(b"y" * 50)
    assert path.read_bytes() == before
    assert log.append(b"works") == 3
    log.close()
    assert [e.seq for e in WriteAheadLog(path).entries] == [1, 2, 3]


def test_a_log_that_cannot_roll_back_refuses_appends(tmp_path, monkeypatch):
    path = tmp_path / "log.wal"
    log = WriteAheadLog(path)

    def failing(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wal_module.os, "fsync", failing)
    monkeypatch.setattr(wal_module.os, "ftruncate", failing)
    with pytest.raises(OSError, match="No space"):
        log.append(b"a")
    monkeypatch.undo()
    with pytest.raises(OSError, match="unknown state"):
        log.append(b"b")
    log.rewrite([])  # a new file repairs it; the failed append's seq was never given out
    assert log.append(b"c") == 1
    log.close()
    assert WriteAheadLog(path).entries == [LogEntry(1, b"c")]
    path = tmp_path / "other.wal"
    log = WriteAheadLog(path)
    monkeypatch.setattr(wal_module.os, "fsync", failing)
    monkeypatch.setattr(wal_module.os, "ftruncate", failing)
    with pytest.raises(OSError, match="No space"):
        log.append(b"a")
    monkeypatch.undo()
    log.close()
    reopened = WriteAheadLog(path)  # the record was written whole (only its fsync failed): kept, never half
    assert reopened.entries == [LogEntry(1, b"a")] and reopened.append(b"b") == 2
    reopened.close()


@pytest.mark.parametrize("where", [0, 3, 8, 12, 20])  # magic, magic, version, floor, crc
def test_header_corruption_is_a_clear_error(tmp_path, where):
    path = _filled(tmp_path / "log.wal", _payloads(3))
    _flip(path, where)
    for recovery in ("strict", "skip-corrupt"):
        with pytest.raises(WalHeaderError, match="file header") as error:
            WriteAheadLog(path, recovery=recovery)
        assert error.value.offset == 0 and error.value.records_after == 3 and str(path) in str(error.value)


def test_header_corruption_of_an_emptied_log_is_detected(tmp_path):
    path = tmp_path / "log.wal"
    with WriteAheadLog(path) as log:
        log.append(b"a")
        log.rewrite([])
    _flip(path, 1)  # only the header remains: its magic is damaged
    with pytest.raises(WalHeaderError):
        WriteAheadLog(path)


def test_oversized_length_is_corruption_not_an_allocation(tmp_path, monkeypatch):
    monkeypatch.setattr(wal_module, "MAX_RECORD_BYTES", 1000)
    payloads = _payloads(3)
    offsets, _ = _record_offsets(payloads)
    path = _filled(tmp_path / "log.wal", payloads)
    with open(path, "r+b") as f:
        f.seek(offsets[1] + 12)
        f.write(struct.pack("<I", 999_999))
    with pytest.raises(WalCorruptionError) as error:
        WriteAheadLog(path)
    assert error.value.offset == offsets[1] and error.value.records_after == 1
    with pytest.raises(ValueError, match="at most 1000 bytes"):
        WriteAheadLog(tmp_path / "other.wal").append(b"z" * 1001)


def test_read_entries_reads_beside_a_writer_without_changing_the_file(tmp_path):
    payloads = _payloads(5)
    offsets, _ = _record_offsets(payloads)
    path = _filled(tmp_path / "log.wal", payloads)
    with open(path, "ab") as f:
        f.write(b"\xf3WR\x1e" + b"\x00" * 7)  # an append in progress
    before = path.read_bytes()
    assert [e.payload for e in read_entries(path)] == payloads
    _flip(path, offsets[1] + RECORD_OVERHEAD)
    damaged = path.read_bytes()
    with pytest.raises(WalCorruptionError) as error:
        read_entries(path)
    assert (error.value.offset, error.value.records_after) == (offsets[1], 3)
    assert [e.seq for e in read_entries(path, recovery="skip-corrupt")] == [1, 3, 4, 5]
    assert path.read_bytes() == damaged and len(damaged) == len(before)  # never truncated nor rewritten
    assert read_entries(tmp_path / "missing.wal") == []


def test_bad_arguments_name_what_was_received(tmp_path):
    with pytest.raises(ValueError, match="recovery='lenient'"):
        WriteAheadLog(tmp_path / "log.wal", recovery="lenient")
    with WriteAheadLog(tmp_path / "log.wal") as log:
        with pytest.raises(ValueError, match="Received: str"):
            log.append("text")
    with pytest.raises(OSError, match="closed"):
        log.append(b"after close")
