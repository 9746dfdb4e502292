import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from fgkeras.serving import BatchingParameters, BatchScheduler, ServingError, default_batch_threads
from fgkeras.serving.status import invalid_argument


class Recorder:
    """A runner that doubles its payloads and records the batch sizes; may block until released."""

    def __init__(self, block=False):
        self.batches = []
        self.release = threading.Event()
        self.started = threading.Event()
        if not block:
            self.release.set()

    def __call__(self, payloads):
        self.started.set()
        self.release.wait(30)
        if any(isinstance(p, str) and p == "bad" for p in payloads):
            raise invalid_argument("a bad payload")
        self.batches.append(len(payloads))
        return [p * 2 for p in payloads]


def _submit_all(scheduler, runner, payloads, sizes=None, key="k", deadline=None):
    sizes = sizes or [1] * len(payloads)
    with futures.ThreadPoolExecutor(len(payloads)) as pool:
        jobs = [pool.submit(scheduler.run, key, runner, p, s, deadline) for p, s in zip(payloads, sizes)]
        return [job.exception() or job.result() for job in jobs]


def test_concurrent_tasks_are_merged_and_results_split_back():
    scheduler = BatchScheduler(BatchingParameters(max_batch_size=8, batch_timeout_micros=300_000, num_batch_threads=1))
    runner = Recorder()
    results = _submit_all(scheduler, runner, list(range(8)))
    assert results == [2 * i for i in range(8)]
    assert len(runner.batches) < 8 and sum(runner.batches) == 8
    assert scheduler.stats()["largest_batch"] > 1


def test_batches_never_exceed_max_batch_size_and_large_tasks_run_alone():
    scheduler = BatchScheduler(BatchingParameters(max_batch_size=4, batch_timeout_micros=100_000, num_batch_threads=1))
    sizes = []

    def runner(payloads):
        sizes.append(sum(len(p) for p in payloads))
        return payloads

    payloads = [[0] * n for n in (1, 2, 3, 1, 6, 2, 1)]
    assert _submit_all(scheduler, runner, payloads, sizes=[len(p) for p in payloads]) == payloads
    assert 6 in sizes and all(s <= 4 for s in sizes if s != 6)


def test_a_bad_task_fails_alone():
    scheduler = BatchScheduler(BatchingParameters(max_batch_size=8, batch_timeout_micros=300_000, num_batch_threads=1))
    results = _submit_all(scheduler, Recorder(), [1, "bad", 3, 4])
    assert results[0] == 2 and results[2:] == [6, 8]
    assert isinstance(results[1], ServingError) and results[1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert scheduler.stats()["retried_batches"] >= 1


def test_a_full_queue_answers_resource_exhausted_and_deadlines_leave_the_queue():
    scheduler = BatchScheduler(BatchingParameters(max_batch_size=2, max_enqueued_batches=1, num_batch_threads=1))
    runner = Recorder(block=True)
    with futures.ThreadPoolExecutor(4) as pool:
        running = pool.submit(scheduler.run, "k", runner, 1, 1)
        assert runner.started.wait(10)  # the only batch turn is busy from now on
        queued = [pool.submit(scheduler.run, "k", runner, p, 1) for p in (2, 3)]
        time.sleep(0.2)
        with pytest.raises(ServingError) as full:
            scheduler.run("k", runner, 4, 1)
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        runner.release.set()
        assert running.result(10) == 2 and [q.result(10) for q in queued] == [4, 6]

    runner = Recorder(block=True)
    with futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(scheduler.run, "k", runner, 1, 1)
        assert runner.started.wait(10)
        start = time.monotonic()
        with pytest.raises(ServingError) as late:
            scheduler.run("k", runner, 2, 2, deadline=time.monotonic() + 0.2)
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 5
        queued = pool.submit(scheduler.run, "k", runner, 3, 2)  # the expired task freed its place
        runner.release.set()
        assert running.result(10) == 2 and queued.result(10) == 6


def test_a_leader_whose_task_is_done_hands_its_turn_to_a_waiting_task():
    scheduler = BatchScheduler(BatchingParameters(max_batch_size=1, num_batch_threads=1))
    runner = Recorder(block=True)
    with futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(scheduler.run, "k", runner, 1, 1)
        assert runner.started.wait(10)
        deadline = time.monotonic() + 10  # without a hand-over these two would wait for it
        waiting = [pool.submit(scheduler.run, "k", runner, p, 1, deadline) for p in (2, 3)]
        time.sleep(0.2)
        runner.release.set()
        assert first.result(20) == 2 and [w.result(20) for w in waiting] == [4, 6]
    assert runner.batches == [1, 1, 1]


def test_with_one_batch_thread_tasks_queued_while_a_batch_runs_make_the_next_batch():
    scheduler = BatchScheduler(BatchingParameters(num_batch_threads=1))  # and no timeout
    runner = Recorder(block=True)
    with futures.ThreadPoolExecutor(6) as pool:
        first = pool.submit(scheduler.run, "k", runner, 1, 1)
        assert runner.started.wait(10)
        queued = [pool.submit(scheduler.run, "k", runner, p, 1) for p in (2, 3, 4, 5)]
        deadline = time.monotonic() + 10  # a second batch thread would have taken some of them already
        while scheduler._queued < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        runner.release.set()
        assert first.result(20) == 2 and [q.result(20) for q in queued] == [4, 6, 8, 10]
    assert runner.batches == [1, 4]


def test_close_fails_queued_tasks_with_unavailable():
    scheduler = BatchScheduler(BatchingParameters(num_batch_threads=1))
    runner = Recorder(block=True)
    with futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(scheduler.run, "k", runner, 1, 1)
        assert runner.started.wait(10)
        queued = pool.submit(scheduler.run, "k", runner, 2, 1)
        time.sleep(0.2)
        scheduler.close()
        assert queued.exception(10).code == grpc.StatusCode.UNAVAILABLE
        runner.release.set()
        assert running.result(10) == 2
    with pytest.raises(ServingError, match="shutting down"):
        scheduler.run("k", runner, 3, 1)


@pytest.mark.parametrize("threads, timeout", [(1, 0), (2, 0), (2, 2000)])
def test_many_threads_many_keys_every_task_gets_its_own_result(threads, timeout):
    scheduler = BatchScheduler(BatchingParameters(max_batch_size=5, batch_timeout_micros=timeout,
                                                  num_batch_threads=threads))
    rng = np.random.default_rng(0)
    jobs = [(f"key{rng.integers(3)}", int(rng.integers(1, 4)), n) for n in range(600)]

    def runner(payloads):
        time.sleep(0.0005)
        return [(key, value * 10) for key, value in payloads]

    deadline = time.monotonic() + 30  # a lost wake-up fails the test instead of hanging it
    with futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda job: scheduler.run(job[0], runner, (job[0], job[2]), job[1], deadline), jobs))
    assert results == [(key, n * 10) for key, _, n in jobs]
    stats = scheduler.stats()
    assert stats["tasks"] == 600 and stats["batches"] < 600
    assert scheduler._running == 0 and scheduler._queued == 0  # every batch turn was given back


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchingParameters(max_batch_size=0)
    with pytest.raises(ValueError, match="batch_timeout_micros"):
        BatchingParameters(batch_timeout_micros=-1)


def test_default_batch_threads_fill_the_cpus_with_intra_op_threads(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert [default_batch_threads(t) for t in (None, 1, 2, 3, 8)] == [1, 4, 2, 1, 1]
    assert BatchScheduler().parameters.num_batch_threads == 1  # TensorFlow's default: every CPU per op
    assert BatchScheduler(BatchingParameters(num_batch_threads=3)).parameters.num_batch_threads == 3
