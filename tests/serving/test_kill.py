"""SIGKILL at random moments while a server takes a stream of upserts and deletes (issue #11).

After every restart each acknowledged change holds (an upserted id is there with the vector of its
last acknowledged image, a deleted one is gone) and the change that was in flight at the kill is
either wholly applied or wholly absent. Only the public surface is used, the `fgkeras serve`
command in a subprocess and `fgkeras.serving.Client`, so the test holds whatever the inventory's
log looks like inside.

`KillRun` is also driven by `benchmarks/inventory_kill.py` (which loads this file by path).
"""

import dataclasses
import itertools
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from fgkeras.serving import Client

logger = logging.getLogger(__name__)

SIDE = 8                     # the images: SIDE × SIDE random pixels, one per key
STARTUP_TIMEOUT = 180.0      # seconds for a (re)started server to answer health SERVING
# what the inventory says at start: "... (N logged changes replayed)" or "inventory at <dir>: N logged changes"
_REPLAYED = re.compile(r"\((\d+) logged changes replayed\)|inventory at .*: (\d+) logged changes")


def image_of(key):
    """The image that key `key` stands for: deterministic, different for every key."""
    return np.random.default_rng(key).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`fgkeras serve` in a subprocess on a free loopback port, started and waited for (health SERVING).

    Args:
        model_root: the model directory (integer versions).
        index_dir: the inventory's index directory.
        log_path: the server's stdout and stderr are appended there.
    """

    def __init__(self, model_root, index_dir, log_path):
        self.address = f"127.0.0.1:{free_port()}"
        self.log_path = log_path
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "ab") as log:
            self._log_start = log.tell()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fgkeras.cli", "serve", "--model-dir", model_root, "--index-dir", index_dir,
                 "--port", self.address.rsplit(":", 1)[1], "--intra-op-parallelism", "1"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        started = time.monotonic()
        with Client(self.address, timeout=2) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.process.returncode} before serving:\n"
                                       + self.output())
                try:
                    if client.health() == "SERVING":
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() - started > STARTUP_TIMEOUT:
                    self.kill()
                    raise RuntimeError(f"the server did not serve within {STARTUP_TIMEOUT} s:\n" + self.output())
                time.sleep(0.1)
        self.startup_seconds = time.monotonic() - started

    def output(self):
        """What the server printed since this start."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def replayed(self):
        """The logged changes the inventory replayed at this start (None when it did not say)."""
        match = _REPLAYED.search(self.output())
        return int(match.group(1) or match.group(2)) if match else None

    def kill(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclasses.dataclass
class Change:
    """An upsert (`keys`: the image key of each id) or a delete, and each id's key before it (None: absent)."""

    kind: str
    ids: list
    keys: list
    before: dict


class Writer:
    """Sends changes to its own ids (`<name>-<n>`), one at a time (`stream`, a thread's target).

    `state` maps each id to the key of its image, as acknowledged; `pending` is the change whose
    call did not return OK (in flight at the kill), None when there is none; `failure` is when
    (`time.monotonic()`) and how that call failed.
    """

    def __init__(self, name, keys, seed, max_items):
        self.prefix = name
        self._keys = keys
        self._rng = random.Random(seed)
        self._numbers = itertools.count()
        self.max_items = max_items
        self.state = {}
        self.pending = None
        self.failure = None
        self.acknowledged = {"upsert": 0, "delete": 0}

    def next_change(self):
        known = sorted(self.state)
        delete_chance = 0.15 if len(known) < self.max_items else 0.6
        if known and self._rng.random() < delete_chance:
            ids = self._rng.sample(known, min(len(known), self._rng.randint(1, 2)))
            return Change("delete", ids, [], {i: self.state[i] for i in ids})
        ids = [f"{self.prefix}-{next(self._numbers)}" for _ in range(self._rng.randint(1, 3))]
        if known and self._rng.random() < 0.3:
            ids[0] = self._rng.choice(known)  # replaces a known id's image
        return Change("upsert", ids, [next(self._keys) for _ in ids], {i: self.state.get(i) for i in ids})

    def stream(self, address, stop):
        """Sends changes until `stop` is set or a call fails (the server was killed)."""
        with Client(address, timeout=10) as client:
            while not stop.is_set():
                change = self.next_change()
                self.pending = change
                try:
                    if change.kind == "upsert":
                        client.upsert(change.ids, images=[image_of(k) for k in change.keys])
                    else:
                        client.delete(change.ids)
                except grpc.RpcError as error:
                    self.failure = (time.monotonic(), f"{error.code().name}: {error.details()}")
                    return  # unacknowledged: `pending` is resolved after the restart
                self.pending = None
                self.apply(change)
                self.acknowledged[change.kind] += 1

    def apply(self, change):
        for position, item in enumerate(change.ids):
            if change.kind == "upsert":
                self.state[item] = change.keys[position]
            else:
                del self.state[item]


@dataclasses.dataclass
class Recovery:
    """What one restart after a kill found."""

    startup_seconds: float
    replayed: object            # logged changes replayed (None when the server did not say)
    items: int                  # items in the inventory after the restart
    acknowledged: int           # changes acknowledged before the kill
    in_flight: int              # changes in flight at the kill
    in_flight_applied: int      # of those, found wholly applied
    lost: int                   # acknowledged changes of ids that do not hold
    problems: list              # what did not hold, readable


class KillRun:
    """A server under a stream of changes, killed and restarted over and over.

    Args:
        model_root: the model directory to serve.
        workdir: where the index and the server's output live.
        seed: seeds the writers' choices and the kill moments.
        writers: concurrent writer threads (each with its own ids).
        max_items: items per writer above which it mostly deletes (a search sees the whole inventory).
    """

    def __init__(self, model_root, workdir, seed=0, writers=2, max_items=200):
        self.model_root = model_root
        self.index_dir = os.path.join(workdir, "gallery")
        self.log_path = os.path.join(workdir, "server.log")
        self.rng = random.Random(seed)
        keys = itertools.count(seed * 10_000_000 + 1)
        self.writers = [Writer(f"w{n}", keys, seed * 100 + n, max_items) for n in range(writers)]
        self.server = None
        self.recoveries = []
        self._stream_problems = []   # calls that failed while the server was alive, for the next Recovery

    def start(self):
        self.server = ServerProcess(self.model_root, self.index_dir, self.log_path)
        return self.server

    def stream_and_kill(self, seconds):
        """Streams changes for `seconds`, then SIGKILLs the server mid-stream. Returns the changes acknowledged."""
        before = sum(sum(w.acknowledged.values()) for w in self.writers)
        stop = threading.Event()
        threads = [threading.Thread(target=w.stream, args=(self.server.address, stop), name=f"kill-test-{w.prefix}",
                                    daemon=True) for w in self.writers]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        killed = time.monotonic()
        self.server.kill()
        stop.set()
        for thread in threads:
            thread.join(60)
        for writer in self.writers:
            if writer.failure is not None and writer.failure[0] < killed:
                self._stream_problems.append(f"{writer.prefix}'s {writer.pending.kind} of {writer.pending.ids} "
                                             f"failed before the kill: {writer.failure[1]}")
            writer.failure = None
        return sum(sum(w.acknowledged.values()) for w in self.writers) - before

    def restart_and_verify(self, acknowledged=0):
        """Restarts the server and checks the inventory against the writers' acknowledged states."""
        server = self.start()
        problems, lost, in_flight, applied = self._stream_problems, 0, 0, 0
        self._stream_problems = []
        with Client(server.address, timeout=60) as client:
            count = client.count()
            observed = _Observed(client, count, self.writers)
            for writer in self.writers:
                change, writer.pending = writer.pending, None
                touched = set(change.ids) if change else set()
                for item, key in writer.state.items():
                    if item not in touched and not observed.holds(item, key):
                        lost += 1
                        problems.append(f"acknowledged {item} (image {key}) does not hold: {observed.describe(item)}")
                if change is None:
                    continue
                in_flight += 1
                after = {i: (change.keys[n] if change.kind == "upsert" else None) for n, i in enumerate(change.ids)}
                was = [observed.holds(i, change.before[i]) for i in change.ids]
                now = [observed.holds(i, after[i]) for i in change.ids]
                if all(now):
                    applied += 1
                    writer.apply(change)
                elif not all(was):
                    problems.append(f"the {change.kind} of {change.ids} in flight at the kill is half-applied: "
                                    + "; ".join(f"{i}: {observed.describe(i)}" for i in change.ids))
            expected = {i for w in self.writers for i in w.state}
            unexpected = observed.present - expected
            if unexpected:
                problems.append(f"ids that no acknowledged state holds: {sorted(unexpected)[:5]}")
            if count != len(expected):
                problems.append(f"count() is {count}, the acknowledged changes make {len(expected)}")
        recovery = Recovery(startup_seconds=server.startup_seconds, replayed=server.replayed(), items=count,
                            acknowledged=acknowledged, in_flight=in_flight, in_flight_applied=applied,
                            lost=lost, problems=problems)
        self.recoveries.append(recovery)
        return recovery

    def run(self, kills, min_seconds=0.3, max_seconds=1.5):
        """Start, then `kills` times: stream for a random time, SIGKILL, restart and verify."""
        if self.server is None:
            self.start()
        for _ in range(kills):
            acknowledged = self.stream_and_kill(self.rng.uniform(min_seconds, max_seconds))
            recovery = self.restart_and_verify(acknowledged)
            logger.info("kill %d: %s", len(self.recoveries), recovery)
        return self.recoveries

    def stop(self):
        if self.server is not None:
            self.server.stop()


class _Observed:
    """The inventory as a client sees it: which ids are present, and which image each one holds."""

    def __init__(self, client, count, writers):
        self._client = client
        self.present = set()
        if count:
            ids, _ = client.search([image_of(0)], k=count)  # k = count: every item comes back
            self.present = set(ids[0].tolist())
        candidates = set()
        for writer in writers:
            candidates.update(writer.state.items())
            if writer.pending is not None:
                candidates.update((i, k) for i, k in writer.pending.before.items() if k is not None)
                candidates.update(zip(writer.pending.ids, writer.pending.keys))
        self._holds = {}
        pairs = sorted((i, k) for i, k in candidates if i in self.present)
        if pairs:
            ids, scores = client.search([image_of(k) for _, k in pairs], k=1)
            for (item, key), top, score in zip(pairs, ids[:, 0], scores[:, 0]):
                self._holds[item, key] = top == item and score > 0.999

    def holds(self, item, key):
        """Whether `item` holds image `key` (key None: whether it is absent)."""
        if key is None:
            return item not in self.present
        return self._holds.get((item, key), False)

    def describe(self, item):
        if item not in self.present:
            return "absent"
        return "present with " + (", ".join(f"image {k}" for (i, k), h in self._holds.items() if i == item and h)
                                  or "none of the expected images")


def _kill_run(kit, tiny_exports, tmp_path, kills, seed):
    root = str(tmp_path / "tiny")
    kit.install_version(root, tiny_exports[0], 1)
    run = KillRun(root, str(tmp_path), seed=seed)
    try:
        recoveries = run.run(kills)
    finally:
        run.stop()
    for number, recovery in enumerate(recoveries, start=1):
        assert recovery.problems == [], f"after kill {number}:\n" + "\n".join(recovery.problems)
        assert recovery.lost == 0
    assert sum(r.acknowledged for r in recoveries) > 0  # the kills did interrupt a stream of changes
    assert recoveries[-1].items == len({i for w in run.writers for i in w.state})
    return recoveries


def test_acknowledged_changes_survive_random_sigkills(kit, tiny_exports, tmp_path):
    _kill_run(kit, tiny_exports, tmp_path, kills=3, seed=1)


@pytest.mark.slow
def test_acknowledged_changes_survive_twenty_random_sigkills(kit, tiny_exports, tmp_path):
    recoveries = _kill_run(kit, tiny_exports, tmp_path, kills=20, seed=2)
    assert len(recoveries) == 20
