"""Batch schedulers: per-model batching (TF Serving's) and cross-model batching (NetFuse's).

One ``SharedBatchScheduler`` owns ``num_batch_threads`` threads shared by every queue, as TF
Serving's SharedBatchScheduler does. A queue is *ready* when it holds a full batch or its oldest
request has waited ``batch_timeout_micros``; a free thread takes the ready queue whose oldest
request is oldest, forms the batch under the scheduler's lock and runs it outside the lock.

- ``ModelBatchQueue``: one model version and signature; requests are concatenated along the
  batch dimension up to ``max_batch_size`` rows and the outputs split back per request.
- ``MergedBatchQueue``: one merged model with one sub-queue per member; a batch takes up to
  ``max_batch_size`` rows from *each* member, feeds them as ``m{i}_<input>``, runs the merged
  graph once and returns every request its own slice. Members with no request get a zero-row
  input when the merged graph accepts it, otherwise rows of zeros (see ``MergedModel``); a
  ragged merged model runs only the busy members' rows. A merged queue keeps one run in flight
  (two once a full batch waits), so requests arriving during a run are batched into the next;
  a model whose session uses a share of the cores per run (``intra_op_parallelism``; the
  server's default) keeps one run in flight per share, less the share left to the front end.

Back-pressure: a queue holds at most ``max_batch_size * max_enqueued_batches`` rows (per
member for merged queues); a request beyond that fails at once with RESOURCE_EXHAUSTED (REST
503) instead of waiting in an unbounded queue.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable

import numpy as np

from tfweave.serving.status import (ServingError, internal, invalid_argument, queue_full,
                                     unavailable)

LOG = logging.getLogger(__name__)

_MAX_WAIT_S = 3600.0


class Task:
    """One request waiting for a batch: its inputs, row count and the future it resolves."""

    __slots__ = ("inputs", "rows", "output_keys", "future", "enqueued", "member", "shape_key",
                 "solo")

    def __init__(self, inputs: dict[str, np.ndarray], rows: int | None,
                 output_keys: tuple[str, ...], member: int = 0):
        self.inputs = inputs
        # rows None: the request cannot be concatenated with others (scalar inputs, or inputs
        # disagreeing on the batch dimension); it runs alone, as TF Serving without batching.
        self.solo = rows is None
        self.rows = 1 if rows is None else rows
        self.output_keys = output_keys
        self.future: Future = Future()
        self.enqueued = time.monotonic()
        self.member = member
        # Requests can share a batch only if every input agrees beyond the batch dimension.
        self.shape_key = tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in inputs.items()))


def batch_rows(inputs: dict[str, np.ndarray], *, strict: bool) -> int | None:
    """The batch size of a request, or None when it cannot be batched with others.

    ``strict`` (members of a merged model, whose rows must be known) raises TF Serving's
    batching-session errors instead of returning None.
    """
    rows = None
    for name, value in inputs.items():
        if value.ndim == 0:
            if not strict:
                return None
            raise invalid_argument(
                "Batching session Run() requires all input tensors to have at least one "
                f"dimension; input '{name}' is a scalar")
        if rows is not None and value.shape[0] != rows:
            if not strict:
                return None
            raise invalid_argument(
                "Batching session Run() input tensors must have equal 0th-dimension size; "
                f"input '{name}' has {value.shape[0]}, another has {rows}")
        rows = value.shape[0]
    return rows if rows is not None else 0


class Retired(Exception):
    """The queue belongs to a version that is being unloaded: resolve the model again."""


class _Queue:
    """Shared part of both queue kinds; all state is guarded by the scheduler's lock."""

    def __init__(self, scheduler: "SharedBatchScheduler", name: str, max_batch_size: int,
                 timeout_s: float, max_enqueued_batches: int, batching: bool):
        self.scheduler = scheduler
        self.name = name
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s if batching else 0.0
        self.capacity = max_batch_size * max_enqueued_batches
        self.batching = batching
        # Set by SharedBatchScheduler.retire: submit refuses new tasks, queued ones still run.
        self.retired = False
        self.running = 0   # batches taken from this queue and not yet processed

    def _check_open(self):
        if self.retired:
            raise Retired(self.name)

    # Interface the scheduler calls with its lock held.
    def oldest(self) -> float | None:
        raise NotImplementedError

    def full(self) -> bool:
        raise NotImplementedError

    def take(self):
        raise NotImplementedError

    def process(self, batch) -> None:
        raise NotImplementedError

    def depth(self) -> int:
        raise NotImplementedError

    def drop_all(self) -> list[Task]:
        """Removes and returns every waiting task."""
        raise NotImplementedError

    def _check_size(self, task: Task, model: str | None = None):
        if self.batching and not task.solo and task.rows > self.max_batch_size:
            raise invalid_argument(f"Task size {task.rows} is larger than maximum batch size "
                                   f"{self.max_batch_size} (model {model or self.name}); split "
                                   "the request or raise max_batch_size")


def _claim(tasks) -> list[Task]:
    # A task whose client went away (future cancelled) is dropped before it costs compute.
    return [t for t in tasks if t.future.set_running_or_notify_cancel()]


def _finish(tasks: list[Task], error: BaseException) -> None:
    if not isinstance(error, ServingError):
        LOG.exception("batch failed", exc_info=error)
        error = internal(f"batch failed: {type(error).__name__}: {error}")
    for task in tasks:
        if not task.future.done():
            task.future.set_exception(error)


class ModelBatchQueue(_Queue):
    """Per-model batching for one (model version, signature)."""

    def __init__(self, scheduler, name, run: Callable, *, max_batch_size, timeout_s,
                 max_enqueued_batches, batching, output_keys: tuple[str, ...]):
        super().__init__(scheduler, name, max_batch_size, timeout_s, max_enqueued_batches,
                         batching)
        self._run = run  # run(feeds, output_keys) -> dict of arrays
        self._all_outputs = output_keys
        self._tasks: collections.deque[Task] = collections.deque()
        self._rows = 0

    def submit(self, task: Task) -> Future:
        self._check_size(task)
        with self.scheduler.cv:
            self._check_open()
            if self._rows + task.rows > self.capacity and self._tasks:
                raise queue_full(self.name)
            # A batch thread needs waking only when this request can make the queue ready
            # sooner: it is the oldest one now, or it fills a batch. Otherwise a thread
            # already knows about this queue, and a spare wake-up costs a GIL round trip.
            wake = not self._tasks or not self.batching or task.solo
            self._tasks.append(task)
            self._rows += task.rows
            if wake or self._rows >= self.max_batch_size:
                self.scheduler.cv.notify()
        return task.future

    def oldest(self):
        return self._tasks[0].enqueued if self._tasks else None

    def full(self):
        return self._rows >= self.max_batch_size

    def depth(self):
        return self._rows

    def drop_all(self):
        tasks = list(self._tasks)
        self._tasks.clear()
        self._rows = 0
        return tasks

    def take(self):
        first = self._tasks.popleft()
        self._rows -= first.rows
        batch = [first]
        if not self.batching or first.solo:
            return batch
        rows = first.rows
        kept = collections.deque()
        while self._tasks:
            task = self._tasks.popleft()
            if (not task.solo and task.shape_key == first.shape_key
                    and rows + task.rows <= self.max_batch_size):
                batch.append(task)
                rows += task.rows
                self._rows -= task.rows
            else:
                kept.append(task)
                if rows >= self.max_batch_size:
                    break
        kept.extend(self._tasks)
        self._tasks = kept
        return batch

    def process(self, batch: list[Task]) -> None:
        tasks = _claim(batch)
        if not tasks:
            return
        try:
            if len(tasks) == 1 and (tasks[0].solo or not self.batching):
                task = tasks[0]
                outputs = self._run(task.inputs, task.output_keys)
                task.future.set_result(outputs)
                return
            feeds = {k: (np.concatenate([t.inputs[k] for t in tasks]) if len(tasks) > 1
                         else tasks[0].inputs[k]) for k in tasks[0].inputs}
            total = sum(t.rows for t in tasks)
            start = time.perf_counter()
            outputs = self._run(feeds, self._all_outputs)
            self.scheduler.metrics.observe_batch(self.name, total, 1,
                                                 time.perf_counter() - start)
            for key, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != total:
                    raise internal(f"Batched output tensor '{key}' of model {self.name} has "
                                   f"shape {list(value.shape)}, not {total} rows; this model "
                                   "cannot be batched (serve it without --enable_batching)")
            offset = 0
            for task in tasks:
                end = offset + task.rows
                task.future.set_result({k: outputs[k][offset:end] for k in task.output_keys})
                offset = end
        except BaseException as error:
            _finish(tasks, error)


class MergedBatchQueue(_Queue):
    """Cross-model batching for one merged model version: one sub-queue per member."""

    def __init__(self, scheduler, name, merged, *, max_batch_size, timeout_s,
                 max_enqueued_batches, batching, max_in_flight: int = 1):
        super().__init__(scheduler, name, max_batch_size, timeout_s, max_enqueued_batches,
                         batching)
        self.merged = merged  # servables.MergedModel: run_members(per_member_tasks)
        n = merged.num_members
        self._tasks = [collections.deque() for _ in range(n)]
        self._rows = [0] * n
        self._waiting = 0
        # One merged run in flight at a time (a second only once a full batch waits): the
        # requests that arrive during a run then join the next run together, instead of
        # another batch thread starting a run of one or two beside it (both runs then share
        # the cores, and each computes only a sliver of the members). A session pinned to
        # fewer intra-op threads than cores (the server's default) allows one run per share
        # of the cores, less the share left to the front end (LoadedModel.concurrent_runs).
        self.max_in_flight = max(1, max_in_flight)
        self._in_flight = 0
        self._full_members = 0   # members holding a full batch (kept as requests come and go)

    def submit(self, task: Task) -> Future:
        i = task.member
        # named for the member the client asked for, not the merged model serving it
        self._check_size(task, self.merged.member_names[i])
        with self.scheduler.cv:
            self._check_open()
            if self._rows[i] + task.rows > self.capacity and self._tasks[i]:
                raise queue_full(f"{self.merged.member_names[i]} (merged into {self.name})")
            self._tasks[i].append(task)
            self._rows[i] += task.rows
            self._waiting += 1
            if self._rows[i] >= self.max_batch_size > self._rows[i] - task.rows:
                self._full_members += 1
            # While a run is in flight a request only waits for it (the run's end wakes a
            # batch thread); waking one per request would find nothing to do, at a GIL
            # round trip each.
            if not (self.batching and self._in_flight >= self.max_in_flight
                    and not self._full_members):
                self.scheduler.cv.notify()
        return task.future

    def oldest(self):
        if not self._waiting or (self.batching and self._in_flight >= self.max_in_flight
                                 and not self.full()):
            return None
        return min(q[0].enqueued for q in self._tasks if q)

    def full(self):
        return self._full_members > 0

    def depth(self):
        return sum(self._rows)

    def drop_all(self):
        tasks = [t for queue in self._tasks for t in queue]
        for queue in self._tasks:
            queue.clear()
        self._rows = [0] * len(self._tasks)
        self._waiting = 0
        self._full_members = 0
        return tasks

    def take(self):
        self._in_flight += 1
        per_member: list[list[Task]] = []
        if not self.batching:
            # One request per run: the oldest one; the other members get no rows.
            i = min((q[0].enqueued, i) for i, q in enumerate(self._tasks) if q)[1]
            task = self._tasks[i].popleft()
            self._rows[i] -= task.rows
            self._waiting -= 1
            self._recount_full()
            return [[task] if j == i else [] for j in range(len(self._tasks))]
        for i, queue in enumerate(self._tasks):
            taken = []
            if queue:
                first = queue[0]
                rows = 0
                while queue and rows + queue[0].rows <= self.max_batch_size \
                        and queue[0].shape_key == first.shape_key:
                    task = queue.popleft()
                    rows += task.rows
                    taken.append(task)
                self._rows[i] -= rows
                self._waiting -= len(taken)
            per_member.append(taken)
        self._recount_full()
        return per_member

    def _recount_full(self):
        self._full_members = sum(1 for r in self._rows if r >= self.max_batch_size)

    def process(self, per_member: list[list[Task]]) -> None:
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                with self.scheduler.cv:
                    self._in_flight -= 1
                    if self._waiting:   # they were held back while this run was in flight
                        self.scheduler.cv.notify()

        try:
            self._process(per_member, release)
        finally:
            release()

    def _process(self, per_member: list[list[Task]], release: Callable[[], None]) -> None:
        per_member = [_claim(tasks) for tasks in per_member]
        everyone = [t for tasks in per_member for t in tasks]
        if not everyone:
            return
        try:
            start = time.perf_counter()
            results = self.merged.run_members(per_member)
            self.scheduler.metrics.observe_batch(
                self.name, len(everyone), sum(1 for tasks in per_member if tasks),
                time.perf_counter() - start)
            # The run is over: another batch thread may start the next one while this one
            # hands out the answers (waking one gRPC thread per request, under the GIL).
            release()
            for tasks, member_outputs in zip(per_member, results):
                offset = 0
                for task in tasks:
                    end = offset + task.rows
                    task.future.set_result(
                        {k: member_outputs[k][offset:end] for k in task.output_keys})
                    offset = end
        except BaseException as error:
            _finish(everyone, error)


class SharedBatchScheduler:
    """``num_threads`` batch threads shared by every queue of the server."""

    def __init__(self, num_threads: int, metrics):
        self.cv = threading.Condition()
        self.metrics = metrics
        self._queues: list[_Queue] = []
        self._stopped = False
        self._threads = [threading.Thread(target=self._loop, name=f"tfweave-batch-{i}",
                                          daemon=True) for i in range(num_threads)]
        for thread in self._threads:
            thread.start()

    def add_queue(self, queue: _Queue) -> _Queue:
        with self.cv:
            self._queues.append(queue)
        return queue

    def queue_depths(self) -> dict[str, int]:
        with self.cv:
            depths: dict[str, int] = {}
            for queue in self._queues:
                depths[queue.name] = depths.get(queue.name, 0) + queue.depth()
            return depths

    def _next_batch(self):
        """Called with the lock held: (queue, batch) if one is ready, else seconds to wait."""
        now = time.monotonic()
        best, best_oldest, wait = None, None, None
        for queue in self._queues:
            oldest = queue.oldest()
            if oldest is None:
                continue
            due = oldest + queue.timeout_s
            if queue.full() or due <= now:
                if best is None or oldest < best_oldest:
                    best, best_oldest = queue, oldest
            else:
                wait = due - now if wait is None else min(wait, due - now)
        if best is not None:
            return best, best.take()
        return wait

    def _loop(self):
        while True:
            with self.cv:
                while True:
                    if self._stopped:
                        return
                    found = self._next_batch()
                    if isinstance(found, tuple):
                        break
                    # A timeout of years (batch_timeout_micros is any int64, as in TF Serving)
                    # is past what Condition.wait takes: waking hourly to look again is the same.
                    self.cv.wait(timeout=None if found is None else min(found, _MAX_WAIT_S))
                # More work may remain (a timeout just expired for another queue): wake another
                # batch thread only then, not after every batch (a wake-up that finds nothing
                # costs a GIL round trip per batch).
                if any(q.oldest() is not None for q in self._queues):
                    self.cv.notify()
                queue, batch = found
                queue.running += 1
            try:
                queue.process(batch)
            finally:
                with self.cv:
                    queue.running -= 1
                    if queue.retired:
                        self.cv.notify_all()   # retire() may be waiting for it to drain

    def retire(self, queue: _Queue, timeout_s: float) -> bool:
        """Stops ``queue`` taking requests, waits until the ones it holds have been answered,
        then removes it. False if that took longer than ``timeout_s``: the queue is removed
        anyway, the requests still waiting in it fail UNAVAILABLE, and a batch still running
        fails with its session's error when the caller closes the model."""
        with self.cv:
            queue.retired = True
            drained = self.cv.wait_for(lambda: not queue.depth() and not queue.running,
                                       timeout_s)
            if queue in self._queues:
                self._queues.remove(queue)
            if not drained:
                tasks = queue.drop_all()
        if not drained:
            _finish(tasks, unavailable(f"model {queue.name}: its version was unloaded before "
                                       "this request ran"))
        return drained

    def stop(self):
        with self.cv:
            self._stopped = True
            self.cv.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
