"""Server-side dynamic batching, with TF Serving's parameters.

Concurrent requests for the same signature of the same model version are merged into one call
of the model and the results are split back. As in TF Serving:

- `max_batch_size`: the most images (rows of the batched inputs) in one call. A request larger
  than this runs alone.
- `batch_timeout_micros`: how long the oldest request waits for a batch to fill. 0 (TF Serving's
  advice for online serving) never waits: a batch is whatever has queued up while the model was
  busy, so a lone request pays nothing and a loaded server batches by itself.
- `num_batch_threads`: how many batches run at the same time. With a timeout of 0, requests
  queue while the batches run and the next batch takes them (up to `max_batch_size`); each
  further thread starts a batch as soon as anything is queued, which splits the same load into
  smaller batches, but keeps more CPUs busy when one batch cannot (TensorFlow splits each op over
  its intra-op threads only). The default, `default_batch_threads`, is the number of CPUs
  divided by TensorFlow's intra-op threads: one batch thread with TensorFlow's default (a thread
  per CPU), one per CPU with `intra_op_parallelism=1`.
- `max_enqueued_batches`: the queue holds at most this many full batches of images; a request
  beyond that is refused with RESOURCE_EXHAUSTED instead of waiting without end.

The batches run on the threads of the requests themselves (leader/follower): a request that
arrives while fewer than `num_batch_threads` batches run leads — it takes a batch from the queues
and runs it — and a leader whose own request is done hands its turn to the oldest waiting request.
There is no hand-off to a separate batch thread and back, which at concurrency 1 is most of the
cost of batching.

A batch that fails with INVALID_ARGUMENT is run again one request at a time, so a bad image fails
its own request, not the requests batched with it.
"""

import collections
import dataclasses
import logging
import os
import threading
import time

import grpc

from fgkeras.serving.status import ServingError, deadline_exceeded, resource_exhausted, unavailable

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's `--batching_parameters_file`, with defaults for a small CPU server.

    Attributes:
        max_batch_size: most images merged into one call of the model.
        batch_timeout_micros: how long the oldest queued request waits for more (0: never).
        num_batch_threads: batches running at the same time; None: `default_batch_threads()` (the
            server passes its `intra_op_parallelism`).
        max_enqueued_batches: queue capacity, in batches of `max_batch_size` images.
    """

    max_batch_size: int = 32
    batch_timeout_micros: int = 0
    num_batch_threads: int | None = None
    max_enqueued_batches: int = 16

    def __post_init__(self):
        for name in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
            value = getattr(self, name)
            if value is None and name == "num_batch_threads":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
        value = self.batch_timeout_micros
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`batch_timeout_micros` must be an int >= 0. Received: batch_timeout_micros={value!r}")


def default_batch_threads(intra_op_threads=None):
    """Batches to run at once so as to keep every CPU busy without oversubscribing them: the CPUs
    divided by TensorFlow's intra-op threads per op (None: TensorFlow's default, one per CPU)."""
    cpus = os.cpu_count() or 1
    return max(1, cpus // (intra_op_threads or cpus))


_QUEUED, _TAKEN, _DONE = "queued", "taken", "done"


class _Task:
    __slots__ = ("key", "payload", "size", "deadline", "enqueued", "state", "result", "error",
                 "event", "leading", "promoted")

    def __init__(self, key, payload, size, deadline):
        self.key = key
        self.payload = payload
        self.size = size
        self.deadline = deadline
        self.enqueued = time.monotonic()
        self.state = _QUEUED
        self.result = None
        self.error = None
        self.event = threading.Event()
        self.leading = False   # its thread holds a batch turn
        self.promoted = False  # a turn was handed to it and its thread has not taken it yet


class _Queue:
    __slots__ = ("runner", "tasks", "size")

    def __init__(self, runner):
        self.runner = runner
        self.tasks = collections.deque()
        self.size = 0


class BatchScheduler:
    """Merges concurrent tasks of the same key into batches (see the module docstring).

    Args:
        parameters: a `BatchingParameters`.
    """

    def __init__(self, parameters=None):
        parameters = parameters or BatchingParameters()
        if parameters.num_batch_threads is None:
            parameters = dataclasses.replace(parameters, num_batch_threads=default_batch_threads())
        self.parameters = parameters
        self._timeout = self.parameters.batch_timeout_micros / 1e6
        self._capacity = self.parameters.max_enqueued_batches * self.parameters.max_batch_size
        self._cond = threading.Condition(threading.Lock())
        self._queues = {}
        self._queued = 0   # images waiting
        self._running = 0  # batch turns held
        self._closed = False
        self._stats = {"batches": 0, "tasks": 0, "images": 0, "largest_batch": 0, "retried_batches": 0}

    def run(self, key, runner, payload, size, deadline=None):
        """Runs `payload` in a batch with the other tasks of `key`; returns its result.

        Args:
            key: tasks with equal keys may share a batch (e.g. `(servable, signature name)`).
            runner: `runner(payloads) -> results`, one result per payload, raising a
                `ServingError` when the batch cannot run. The same for every task of a key.
            payload: this task's inputs.
            size: its number of images (batch rows).
            deadline: `time.monotonic()` value after which the result is no longer wanted.
        Raises:
            ServingError: the runner's, RESOURCE_EXHAUSTED when the queue is full,
                DEADLINE_EXCEEDED, or UNAVAILABLE when the scheduler is closed.
        """
        task = _Task(key, payload, size, deadline)
        with self._cond:
            if self._closed:
                raise unavailable("the server is shutting down")
            if self._queued + size > self._capacity:
                raise resource_exhausted(
                    f"the batching queue is full ({self._queued} images waiting, capacity {self._capacity}); "
                    "retry later")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(runner)
            queue.tasks.append(task)
            queue.size += size
            self._queued += size
            if self._timeout:
                self._cond.notify_all()  # leaders waiting for their batch to fill
            if self._running < self.parameters.num_batch_threads:
                self._running += 1
                task.leading = True
        if task.leading:
            self._lead(task)
        return self._await(task)

    def stats(self):
        """Counters: batches run, tasks and images in them, the largest batch, batches retried."""
        with self._cond:
            return dict(self._stats)

    def close(self):
        """Fails every queued task with UNAVAILABLE and refuses new ones; running batches finish."""
        with self._cond:
            self._closed = True
            for queue in self._queues.values():
                for task in queue.tasks:
                    self._finish(task, error=unavailable("the server is shutting down"))
            self._queues.clear()
            self._queued = 0
            self._cond.notify_all()

    # ------------------------------------------------------------------ internals (hold self._cond
    # where noted)

    def _await(self, task):
        while True:
            timeout = None if task.deadline is None else max(task.deadline - time.monotonic(), 0.0)
            task.event.wait(timeout)
            lead = False
            with self._cond:
                if task.promoted:  # a leader handed this thread its turn
                    task.promoted = False
                    if task.state == _QUEUED:
                        task.leading = lead = True
                    else:
                        self._pass_turn()
                if not lead:
                    if task.state == _DONE:
                        result, error = task.result, task.error
                        break
                    if task.deadline is not None and time.monotonic() >= task.deadline:
                        if task.state == _QUEUED:
                            self._remove(task)
                        task.state = _DONE  # a batch that took it already discards its result
                        result, error = None, deadline_exceeded(
                            "the deadline passed while the request waited for its batch")
                        break
                    task.event.clear()
            if lead:
                self._lead(task)
        if error is not None:
            raise error
        return result

    def _lead(self, own):
        while True:
            with self._cond:
                batch, runner = self._next_batch(own)
                if batch is None:
                    own.leading = False
                    self._pass_turn()
                    return
            self._execute(runner, batch)

    def _next_batch(self, own):
        """(holds the lock) The next batch to run, or (None, None) when `own` no longer needs a leader."""
        while True:
            if own.state != _QUEUED or self._closed:
                return None, None
            key, queue = min(self._queues.items(), key=lambda item: item[1].tasks[0].enqueued)
            head = queue.tasks[0]
            wait = head.enqueued + self._timeout - time.monotonic()
            if wait > 0 and queue.size < self.parameters.max_batch_size:
                self._cond.wait(wait)
                continue
            return self._pop_batch(key, queue), queue.runner

    def _pop_batch(self, key, queue):
        """(holds the lock) Takes tasks from the head of `queue` up to `max_batch_size` images."""
        batch, size, now = [], 0, time.monotonic()
        limit = self.parameters.max_batch_size
        while queue.tasks and (not batch or size + queue.tasks[0].size <= limit):
            task = queue.tasks.popleft()
            queue.size -= task.size
            self._queued -= task.size
            if task.deadline is not None and now >= task.deadline:
                self._finish(task, error=deadline_exceeded("the deadline passed while the request waited for a batch"))
                continue
            task.state = _TAKEN
            batch.append(task)
            size += task.size
        if not queue.tasks:
            del self._queues[key]
        return batch

    def _remove(self, task):
        """(holds the lock) Takes a queued task out of its queue."""
        queue = self._queues[task.key]
        queue.tasks.remove(task)
        queue.size -= task.size
        self._queued -= task.size
        if not queue.tasks:
            del self._queues[task.key]

    def _pass_turn(self):
        """(holds the lock) Gives the caller's batch turn to the oldest waiting task, or returns it."""
        waiting = [t for queue in self._queues.values() for t in queue.tasks if not (t.leading or t.promoted)]
        if waiting and not self._closed:
            successor = min(waiting, key=lambda t: t.enqueued)
            successor.promoted = True
            successor.event.set()
        else:
            self._running -= 1

    def _finish(self, task, result=None, error=None):
        """(holds the lock) Completes a task and wakes its thread."""
        task.result, task.error, task.state = result, error, _DONE
        task.event.set()

    def _execute(self, runner, batch):
        if not batch:
            return
        outcomes = self._run(runner, batch)
        with self._cond:
            for task, (result, error) in zip(batch, outcomes):
                self._finish(task, result, error)
            stats = self._stats
            stats["batches"] += 1
            stats["tasks"] += len(batch)
            images = sum(t.size for t in batch)
            stats["images"] += images
            stats["largest_batch"] = max(stats["largest_batch"], images)

    def _run(self, runner, batch):
        """[(result, error)] for the tasks of a batch; a batch failing on its inputs is split."""
        try:
            results = runner([t.payload for t in batch])
            return [(r, None) for r in results]
        except ServingError as error:
            if len(batch) == 1 or error.code != grpc.StatusCode.INVALID_ARGUMENT:
                return [(None, error)] * len(batch)
        except Exception as error:  # a bug or a runtime failure: every task fails, the server stays up
            logger.exception("a batch of %d tasks failed", len(batch))
            return [(None, ServingError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"))] * len(batch)
        with self._cond:
            self._stats["retried_batches"] += 1
        return [outcome for task in batch for outcome in self._run(runner, [task])]
