"""The inventory under SIGKILL, and its write-ahead log under byte flips (issue #11).

Measured in one run:

1. kills: `fgkeras serve` (a tiny exported model, an empty inventory) takes a stream of upserts and
   deletes from 2 client threads and is SIGKILLed at random moments (default 20 times); after each
   restart every acknowledged change must hold and the change in flight must be wholly applied or
   wholly absent (`tests/serving/test_kill.py`'s `KillRun`, loaded by path). Reported: the changes
   acknowledged, lost (goal: 0), half-applied, and the restart time to health SERVING;
2. a flipped byte in a middle record of the server's own log (after a kill), then a restart: does
   the server refuse to start naming the damage (the goal), or start without the acknowledged
   changes that follow it (the defect of the version 1 log)?
3. `fgkeras.serving.wal` alone, a log of 20 records: a byte flipped at every offset of a middle
   record and of the last record, and a cut at every offset of the last record, under `strict` and
   `skip-corrupt`; beside it the version 1 framing as the old inventory read it (stop at the first
   bad frame), on the same flips; and the time to open (verify) logs of 1k and 10k records.

    python benchmarks/inventory_kill.py [--kills 20] [--seed 0] [--quick] [--note "what tree"]

`--quick` does 3 kills. The kill part uses whichever inventory the tree has: it reports the log
format the server wrote.
"""

import argparse
import importlib.util
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
import zlib

import _common

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "serving")


def load_by_path(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- the server's log


def find_log(index_dir):
    """The inventory's log file: `<index_dir>.wal` (version 1 inventory) or a `*.wal` inside `index_dir`."""
    candidates = [index_dir + ".wal"]
    for parent, _, files in os.walk(index_dir):
        candidates += [os.path.join(parent, f) for f in sorted(files) if f.endswith(".wal")]
    existing = [c for c in candidates if os.path.isfile(c) and os.path.getsize(c) > 0]
    return existing[0] if existing else None


def record_spans(path):
    """`(format, [(offset, size), ...])` of the records of a log in either format."""
    with open(path, "rb") as f:
        data = f.read()
    spans = []
    if data.startswith(b"\x89FGKWAL\n"):
        position = 24
        while position + 20 <= len(data):
            length = struct.unpack_from("<I", data, position + 12)[0]
            spans.append((position, 20 + length))
            position += 20 + length
        return "current (fgkeras.serving.wal, format 2)", spans
    position = 0
    while position + 8 <= len(data):
        length = struct.unpack_from("<I", data, position)[0]
        spans.append((position, 8 + length))
        position += 8 + length
    return "version 1 (length, CRC-32, payload; no header)", spans


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


def server_flip(kill_module, model_root, workdir, changes=20):
    """Acknowledged single-id upserts, SIGKILL, one byte flipped in the middle record, restart."""
    from fgkeras.serving import Client

    index_dir = os.path.join(workdir, "gallery")
    log_path = os.path.join(workdir, "server.log")
    server = kill_module.ServerProcess(model_root, index_dir, log_path)
    ids = [f"flip-{i}" for i in range(changes)]
    with Client(server.address, timeout=30) as client:
        for number, item in enumerate(ids):
            client.upsert([item], images=[kill_module.image_of(10_000 + number)])
    server.kill()
    wal = find_log(index_dir)
    if wal is None:
        return {"outcome": "no log file found after the kill", "format": "?"}
    layout, spans = record_spans(wal)
    middle = len(spans) // 2
    offset, size = spans[middle]
    flip_byte(wal, offset + size - 1)  # the last payload byte of the middle record
    result = {"format": layout, "records": len(spans), "flipped": f"record {middle + 1} of {len(spans)}, "
                                                                  f"byte {offset + size - 1}"}
    try:
        restarted = kill_module.ServerProcess(model_root, index_dir, log_path)
    except RuntimeError as error:
        lines = [line for line in str(error).splitlines() if "corrupt" in line.lower()]
        result["outcome"] = "refused to start: " + (lines[-1].strip() if lines else str(error).splitlines()[0])
        result["lost"] = "n/a (not started)"
        return result
    with Client(restarted.address, timeout=30) as client:
        count = client.count()
        present = set()
        if count:
            found, _ = client.search([kill_module.image_of(0)], k=count)
            present = set(found[0].tolist())
    restarted.stop()
    lost = [i for i in ids if i not in present]
    warned = [line.strip() for line in restarted.output().splitlines() if "WARNING" in line and ".wal" in line]
    result["outcome"] = f"started with {count} of {changes} acknowledged items"
    result["lost"] = f"{len(lost)} acknowledged upsert(s) lost"
    result["warning"] = warned[0] if warned else "(none)"
    return result


# ---------------------------------------------------------------------------- the log module alone


def v1_replay(data):
    """How many records the version 1 inventory replayed from `data`: it stops at the first bad frame."""
    position, count = 0, 0
    while position + 8 <= len(data):
        length, crc = struct.unpack_from("<II", data, position)
        payload = data[position + 8:position + 8 + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            break
        position += 8 + length
        count += 1
    return count


def module_flips(workdir, records=20):
    """Outcome tallies of byte flips and cuts, for the current format and the version 1 framing."""
    import logging

    from fgkeras.serving.wal import WalCorruptionError, WriteAheadLog

    logging.getLogger("fgkeras.serving.wal").setLevel(logging.ERROR)
    payloads = [f"record {i} ".encode() * 12 for i in range(records)]
    pristine = os.path.join(workdir, "pristine.wal")
    with WriteAheadLog(pristine) as log:
        for payload in payloads:
            log.append(payload)
    with open(pristine, "rb") as f:
        data = f.read()
    offsets = [24]
    for payload in payloads[:-1]:
        offsets.append(offsets[-1] + 20 + len(payload))
    v1 = b"".join(struct.pack("<II", len(p), zlib.crc32(p)) + p for p in payloads)
    v1_offsets = [0]
    for payload in payloads[:-1]:
        v1_offsets.append(v1_offsets[-1] + 8 + len(payload))
    middle = records // 2
    path = os.path.join(workdir, "case.wal")

    def outcome(mutated, recovery):
        with open(path, "wb") as f:
            f.write(mutated)
        for leftover in os.listdir(workdir):
            if leftover.startswith("case.wal.corrupt-"):
                os.unlink(os.path.join(workdir, leftover))
        try:
            with WriteAheadLog(path, recovery=recovery) as log:
                return ("opened", len(log.entries), [e.payload for e in log.entries])
        except WalCorruptionError as error:
            return ("refused", error.offset, error.records_after)

    rows = []
    start, size = offsets[middle], 20 + len(payloads[middle])
    strict_ok = skip_ok = v1_lost = 0
    others = payloads[:middle] + payloads[middle + 1:]
    for where in range(size):
        mutated = bytearray(data)
        mutated[start + where] ^= 0x40
        strict_ok += outcome(bytes(mutated), "strict") == ("refused", start, records - middle - 1)
        skip_ok += outcome(bytes(mutated), "skip-corrupt") == ("opened", records - 1, others)
        old = bytearray(v1)
        old_where = v1_offsets[middle] + min(where, 8 + len(payloads[middle]) - 1)
        old[old_where] ^= 0x40
        v1_lost += records - v1_replay(bytes(old))
    rows.append({"case": f"flip each of the {size} bytes of record {middle + 1} of {records} (middle)",
                 "strict": f"WalCorruptionError with the right offset and records_after: {strict_ok}/{size}",
                 "skip": f"opens with the {records - 1} others: {skip_ok}/{size}",
                 "v1": f"mean {v1_lost / size:.1f} acknowledged records dropped, silently"})
    start, size = offsets[-1], 20 + len(payloads[-1])
    torn_ok = 0
    for where in range(size):
        mutated = bytearray(data)
        mutated[start + where] ^= 0x40
        torn_ok += outcome(bytes(mutated), "strict") == ("opened", records - 1, payloads[:-1])
    rows.append({"case": f"flip each of the {size} bytes of the last record", "strict":
                 f"dropped as a torn tail, {records - 1} kept: {torn_ok}/{size}", "skip": "(same)",
                 "v1": f"last record dropped ({records - 1} kept)"})
    cut_ok = 0
    for cut in range(1, size):
        cut_ok += outcome(data[:start + cut], "strict") == ("opened", records - 1, payloads[:-1])
    rows.append({"case": f"cut the file at each of the {size - 1} offsets inside the last record", "strict":
                 f"dropped as a torn tail, {records - 1} kept: {cut_ok}/{size - 1}", "skip": "(same)",
                 "v1": f"last record dropped ({records - 1} kept)"})
    return rows


def open_times(workdir, sizes=(1_000, 10_000), payload_bytes=1024):
    from fgkeras.serving.wal import LogEntry, WriteAheadLog

    rows = []
    for count in sizes:
        path = os.path.join(workdir, f"open{count}.wal")
        with WriteAheadLog(path) as log:
            log.rewrite([LogEntry(seq, os.urandom(payload_bytes)) for seq in range(1, count + 1)])
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            WriteAheadLog(path).close()
            best = min(best, time.perf_counter() - started)
        rows.append({"records": count, "payload": f"{payload_bytes} B", "mb": f"{os.path.getsize(path) / 1e6:.1f}",
                     "ms": f"{best * 1000:.1f}"})
    path = os.path.join(workdir, "append.wal")
    with WriteAheadLog(path) as log:
        started = time.perf_counter()
        for _ in range(200):
            log.append(b"x" * payload_bytes)
        seconds = time.perf_counter() - started
    return rows, 200 / seconds


# ---------------------------------------------------------------------------- main


def main():
    from fgkeras.evaluation import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-seconds", type=float, default=0.3, help="shortest stream before a kill")
    parser.add_argument("--max-seconds", type=float, default=2.0, help="longest stream before a kill")
    parser.add_argument("--quick", action="store_true", help="3 kills")
    parser.add_argument("--note", help="what tree was measured (written under Tree)")
    args = parser.parse_args()
    kills = 3 if args.quick else args.kills

    kill_module = load_by_path("fgkeras_test_kill", os.path.join(TESTS, "test_kill.py"))
    conftest = load_by_path("fgkeras_serving_conftest", os.path.join(TESTS, "conftest.py"))
    workdir = tempfile.mkdtemp(prefix="inventory_kill-")
    try:
        model_root = os.path.join(workdir, "tiny")
        conftest.install_version(model_root, conftest.save_tiny(os.path.join(workdir, "export"), seed=0), 1)

        run = kill_module.KillRun(model_root, os.path.join(workdir, "kills"), seed=args.seed)
        try:
            recoveries = run.run(kills, args.min_seconds, args.max_seconds)
        finally:
            run.stop()
        for number, recovery in enumerate(recoveries, start=1):
            print(f"kill {number}: {recovery.acknowledged} acknowledged, lost {recovery.lost}, "
                  f"restart {recovery.startup_seconds:.1f} s, problems {recovery.problems[:2]}", flush=True)
        rows = [{"kill": n, "acknowledged": r.acknowledged, "in_flight": r.in_flight,
                 "applied": r.in_flight_applied, "replayed": "?" if r.replayed is None else r.replayed,
                 "items": r.items, "lost": r.lost, "problems": len(r.problems),
                 "restart": f"{r.startup_seconds:.1f}"} for n, r in enumerate(recoveries, start=1)]
        kills_table = format_table(rows, headers={
            "kill": "kill", "acknowledged": "changes acknowledged before it", "in_flight": "in flight",
            "applied": "in flight, found applied", "replayed": "log records replayed", "items": "items after",
            "lost": "acknowledged lost", "problems": "problems (half-applied, ...)", "restart": "restart to SERVING, s"})
        upserts = sum(w.acknowledged["upsert"] for w in run.writers)
        deletes = sum(w.acknowledged["delete"] for w in run.writers)
        lost = sum(r.lost for r in recoveries)
        problems = [p for r in recoveries for p in r.problems]
        restarts = [r.startup_seconds for r in recoveries]
        summary = (f"{kills} SIGKILLs at random moments ({args.min_seconds}-{args.max_seconds} s into a stream from "
                   f"2 client threads); {upserts} upserts and {deletes} deletes acknowledged; **lost: {lost}**; "
                   f"half-applied or other problems: {len(problems)}"
                   + (f" (first: {problems[0]})" if problems else "")
                   + f". Restart to health SERVING (process start, TensorFlow import, model load and warm-up, log "
                     f"replay): median {statistics.median(restarts):.1f} s, max {max(restarts):.1f} s.")

        flip = server_flip(kill_module, model_root, os.path.join(workdir, "flip"))
        summary += f" Log format the server writes: {flip['format']}."
        flip_text = "\n".join(f"- {key}: {value}" for key, value in flip.items())

        flip_rows = module_flips(tempfile.mkdtemp(dir=workdir))
        flips_table = format_table(flip_rows, headers={
            "case": "damage", "strict": "fgkeras.serving.wal, strict", "skip": "skip-corrupt",
            "v1": "version 1 framing, as the old inventory replayed it"})
        open_rows, appends = open_times(tempfile.mkdtemp(dir=workdir))
        open_table = format_table(open_rows, headers={"records": "records", "payload": "payload",
                                                      "mb": "file MB", "ms": "open (read + verify), ms, best of 3"})
        open_text = open_table + f"\n\nAppend (write + fsync, 1 KiB): {appends:.0f} appends/s."
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    path = _common.write_results("inventory_kill", ([("Tree", args.note)] if args.note else []) + [
        ("Kills", summary + "\n\n" + kills_table),
        ("A flipped byte in the server's log", flip_text),
        ("Byte flips and cuts in the log module", flips_table),
        ("Log open and append", open_text)])
    print(open(path).read())
    return 0 if lost == 0 and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
