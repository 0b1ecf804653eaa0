"""Batching across requests, as text-embeddings-inference does it: requests enter one queue,
one worker thread takes up to `max_batch` inputs (or what came within `max_wait_s` of the
oldest), runs one call per key (a task to predict, or embeddings) and routes each request's
slice of the results back through its future.

The worker runs the model off the event loop, so the server keeps answering (`/health`,
`/metrics`, 503s for a full queue) while a batch computes. What a key runs is
`model_runner`: `Model.predict` and `Model.encode`, which sort each call's inputs by length
and pad per batch, so a gathered batch is one length-sorted forward pass per key.

No batch can end the worker: an error in the model call fails only the requests that caused
it (the batch is rerun one request at a time), any other error fails the batch's requests,
and the worker goes on to the next batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from mtbert.api import Model

log = logging.getLogger(__name__)

Runner = Callable[[Hashable, list], Sequence]  # (key, inputs) -> one result per input


class QueueFull(Exception):
    """The queue holds `max_queue` inputs already; the client should retry later."""


@dataclass
class Job:
    key: Hashable
    inputs: list
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


def model_runner(model: Model, batch_size: int) -> Runner:
    """What a batch of one key runs: ("predict", task) -> `Model.predict(task, inputs)`,
    ("embed", normalize) -> the rows of `Model.encode(inputs, normalize)`."""
    def run(key: Hashable, inputs: list) -> Sequence:
        kind, argument = key
        if kind == "predict":
            return model.predict(argument, inputs, batch_size=batch_size)
        return model.encode(inputs, normalize=argument, batch_size=batch_size)
    return run


class Batcher:
    """A queue of jobs and one worker thread that runs them in batches.

    `submit(key, inputs)` returns a future of the inputs' results, in order; it raises
    `QueueFull` when more than `max_queue` inputs would be waiting. `stop()` lets the worker
    finish every job already submitted, then joins it; `alive` says whether the worker runs.
    `on_batch(key, size, seconds)` is called after each call of `run` (for metrics).
    """

    def __init__(self, run: Runner, max_batch: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[Hashable, int, float], None] | None = None):
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.max_queue, self.on_batch = max_queue, on_batch
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._carried: Job | None = None  # a job that did not fit the last batch
        self._lock = threading.Lock()
        self._depth = 0
        self._worker = threading.Thread(target=self._work, name="mtbert-batcher", daemon=True)

    @property
    def depth(self) -> int:
        """Inputs submitted and not yet running."""
        return self._depth

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._worker.join()

    def submit(self, key: Hashable, inputs: list) -> Future:
        job = Job(key, inputs)
        with self._lock:
            if self._depth + len(inputs) > self.max_queue:
                raise QueueFull(f"the queue holds {self._depth} inputs; at most "
                                f"{self.max_queue} may wait")
            self._depth += len(inputs)
        self._queue.put(job)
        return job.future

    def _work(self) -> None:
        stopping = False
        while not stopping or self._carried:
            jobs, stopping = self._gather(stopping)
            try:
                self._run_batch(jobs)
            except Exception as error:  # noqa: BLE001 (handed to the batch's requests)
                log.exception("a batch failed outside the model call")
                for job in jobs:
                    if not job.future.done():
                        _fail(job.future, error)

    def _gather(self, stopping: bool) -> tuple[list[Job], bool]:
        """The next batch: the oldest job, then whatever arrives before its deadline while
        the batch has room. A job that would overflow it opens the next batch."""
        first, self._carried = self._carried, None
        if first is None:
            if stopping:
                return [], True
            first = self._queue.get()
            if first is None:
                return [], True
        jobs, size = [first], len(first.inputs)
        deadline = first.enqueued + self.max_wait_s
        while size < self.max_batch and not stopping:
            try:  # a deadline already past still takes what is queued now
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                stopping = True
            elif size + len(job.inputs) > self.max_batch:
                self._carried = job
                break
            else:
                jobs.append(job)
                size += len(job.inputs)
        return jobs, stopping

    def _run_batch(self, jobs: list[Job]) -> None:
        with self._lock:
            self._depth -= sum(len(job.inputs) for job in jobs)
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        groups: dict[Hashable, list[Job]] = {}
        for job in live:
            groups.setdefault(job.key, []).append(job)
        for key, group in groups.items():
            self._run_group(key, group)

    def _run_group(self, key: Hashable, group: list[Job]) -> None:
        inputs = [value for job in group for value in job.inputs]
        start = time.perf_counter()
        try:
            results = self.run(key, inputs)
        except Exception as error:  # noqa: BLE001 (handed to the requests)
            if len(group) > 1:  # one bad job must not fail the others: run them one by one
                for job in group:
                    self._run_group(key, [job])
                return
            log.exception("a request of %r failed", key)
            _fail(group[0].future, error)
            return
        if self.on_batch:
            self.on_batch(key, len(inputs), time.perf_counter() - start)
        offset = 0
        for job in group:
            job.future.set_result(results[offset:offset + len(job.inputs)])
            offset += len(job.inputs)


def _fail(future: Future, error: Exception) -> None:
    try:
        future.set_exception(error)
    except InvalidStateError:  # cancelled meanwhile: the client has gone
        pass
