"""Server-side batching for `cascade serve --enable_batching`: concurrent Predict calls for the same
model version, signature, inputs and outputs are merged along the batch (0th) dimension, run once,
and each caller gets its own rows back.

It follows TF Serving's BatchingSession over a SharedBatchScheduler: each key has a queue of
batches; a request joins the open batch if it fits, else opens a new one, and is refused with
UNAVAILABLE when `max_enqueued_batches` are already waiting. A batch runs on one of
`num_batch_threads` when it is full, when a newer batch has opened behind it, or when it has been
open for `batch_timeout_micros`. A request larger than `max_batch_size` is INVALID_ARGUMENT.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Hashable

import numpy as np
from grpc import StatusCode

from serving.model_server.config import BatchingParameters
from serving.model_server.status import ServingError

Tensors = dict[str, np.ndarray]
RunFunction = Callable[[Tensors], Tensors]


@dataclasses.dataclass(eq=False)
class _Task:
    run: RunFunction  # the same model call for every task of a queue
    inputs: Tensors
    size: int  # rows, the 0th dimension of every input
    deadline: float | None  # time.monotonic() seconds
    batch: "_Batch | None" = None  # while waiting in a queue
    outputs: Tensors | None = None
    error: ServingError | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def finish(self, outputs: Tensors | None = None, error: ServingError | None = None) -> None:
        self.outputs, self.error = outputs, error
        self.done.set()


@dataclasses.dataclass(eq=False)
class _Batch:
    opened: float
    tasks: list[_Task] = dataclasses.field(default_factory=list)
    size: int = 0


@dataclasses.dataclass(eq=False)
class _Queue:
    batches: collections.deque = dataclasses.field(default_factory=collections.deque)


def batch_size(inputs: Tensors) -> int:
    """The common 0th dimension of the inputs (TF Serving's ComputeTensorBatchSize)."""
    if not inputs:
        raise ServingError(StatusCode.INVALID_ARGUMENT,
                           "Batching Run() must have at least one input tensor")
    sizes = set()
    for array in inputs.values():
        if array.ndim == 0:
            raise ServingError(StatusCode.INVALID_ARGUMENT,
                               "Batching Run() input tensors must have at least one dimension")
        sizes.add(array.shape[0])
    if len(sizes) > 1:
        raise ServingError(StatusCode.INVALID_ARGUMENT,
                           "Batching Run() input tensors must have equal 0th-dimension size")
    return sizes.pop()


class Batcher:
    """Queues keyed by (servable, signature, inputs, outputs), served by a shared thread pool."""

    def __init__(self, parameters: BatchingParameters):
        self.parameters = parameters
        self._condition = threading.Condition()
        self._queues: dict[Hashable, _Queue] = {}
        self._next_queue = 0  # round robin over queues, as the shared scheduler does
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.batches_run = 0  # executed batches
        self.tasks_run = 0  # requests answered from those batches

    def start(self) -> "Batcher":
        for index in range(self.parameters.num_batch_threads):
            thread = threading.Thread(target=self._work, name=f"batch-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Runs what is queued (without waiting for timeouts), then ends the threads."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        stopped = ServingError(StatusCode.UNAVAILABLE, "Server is shutting down")
        with self._condition:
            for queue in self._queues.values():
                for batch in queue.batches:
                    for task in batch.tasks:
                        task.finish(error=stopped)
            self._queues.clear()

    def enqueued_tasks(self) -> int:
        """Requests waiting in a queue (not yet running)."""
        with self._condition:
            return sum(len(b.tasks) for q in self._queues.values() for b in q.batches)

    def drop(self, servable: Hashable) -> None:
        """Forgets the (empty) queues of an unloaded servable; keys start with its identity."""
        with self._condition:
            idle = [k for k, q in self._queues.items() if k[0] == servable and not q.batches]
            for key in idle:
                del self._queues[key]

    def run(self, key: tuple, run: RunFunction, inputs: Tensors,
            deadline: float | None = None) -> Tensors:
        """Runs `inputs` as part of a batch and returns this request's rows of every output."""
        size = batch_size(inputs)
        limit = self.parameters.max_batch_size
        if size > limit:
            raise ServingError(StatusCode.INVALID_ARGUMENT,
                               f"Task size {size} is larger than maximum input batch size {limit}")
        task = _Task(run, inputs, size, deadline)
        with self._condition:
            if self._stopping:
                raise ServingError(StatusCode.UNAVAILABLE, "Server is shutting down")
            queue = self._queues.setdefault(key, _Queue())
            if not queue.batches or queue.batches[-1].size + size > limit:
                if len(queue.batches) >= self.parameters.max_enqueued_batches:
                    raise ServingError(StatusCode.UNAVAILABLE, "The batch scheduling queue to "
                                       "which this task was submitted is full")
                queue.batches.append(_Batch(opened=time.monotonic()))
            batch = queue.batches[-1]
            batch.tasks.append(task)
            batch.size += size
            task.batch = batch
            self._condition.notify_all()
        self._wait(task, queue)
        if task.error is not None:
            raise task.error
        return task.outputs

    def _wait(self, task: _Task, queue: _Queue) -> None:
        if task.deadline is None:
            task.done.wait()  # every queued task is finished by a worker or by stop()
            return
        if task.done.wait(min(threading.TIMEOUT_MAX, max(0.0, task.deadline - time.monotonic()))):
            return
        with self._condition:
            batch = task.batch
            if batch is not None:  # still queued: leave the queue so the batch does not carry it
                batch.tasks.remove(task)
                batch.size -= task.size
                if not batch.tasks and batch in queue.batches:
                    queue.batches.remove(batch)
                task.batch = None
        if not task.done.is_set():
            raise ServingError(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    # ------------------------------------------------------------------------- workers

    def _work(self) -> None:
        while True:
            with self._condition:
                picked = self._next_ready()
                while picked is None:
                    if self._stopping and not any(q.batches for q in self._queues.values()):
                        return
                    self._condition.wait(self._time_to_next_ready())
                    picked = self._next_ready()
            self._execute(picked)

    def _next_ready(self) -> _Batch | None:
        """Pops the first batch that may run now, round robin over queues (lock held)."""
        queues = list(self._queues.values())
        now = time.monotonic()
        timeout = self.parameters.batch_timeout_micros / 1e6
        for offset in range(len(queues)):
            queue = queues[(self._next_queue + offset) % len(queues)]
            if not queue.batches:
                continue
            batch = queue.batches[0]
            closed = len(queue.batches) > 1 or batch.size >= self.parameters.max_batch_size
            if self._stopping or closed or now - batch.opened >= timeout:
                queue.batches.popleft()
                for task in batch.tasks:
                    task.batch = None
                self._next_queue = (self._next_queue + offset + 1) % len(queues)
                return batch
        return None

    def _time_to_next_ready(self) -> float:
        timeout = self.parameters.batch_timeout_micros / 1e6
        opened = [q.batches[0].opened for q in self._queues.values() if q.batches]
        if not opened:
            return 1.0
        return min(1.0, max(0.0, min(opened) + timeout - time.monotonic()))

    def _execute(self, batch: _Batch) -> None:
        now = time.monotonic()
        tasks = []
        for task in batch.tasks:
            if task.deadline is not None and task.deadline <= now:
                task.finish(error=ServingError(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            else:
                tasks.append(task)
        if not tasks:
            return
        try:
            merged, padding = self._merge(tasks)
            outputs = tasks[0].run(merged)
            split = self._split(outputs, [t.size for t in tasks], padding)
        except Exception as error:  # the model's failure is every caller's answer
            failure = ServingError.from_exception(error)
            for task in tasks:
                task.finish(error=failure)
            return
        with self._condition:
            self.batches_run += 1
            self.tasks_run += len(tasks)
        for task, outputs in zip(tasks, split):
            task.finish(outputs=outputs)

    def _merge(self, tasks: list[_Task]) -> tuple[Tensors, int]:
        total = sum(t.size for t in tasks)
        allowed = [s for s in self.parameters.allowed_batch_sizes if s >= total]
        padding = (allowed[0] - total) if allowed else 0
        merged = {}
        for name in tasks[0].inputs:
            arrays = [t.inputs[name] for t in tasks]
            if self.parameters.pad_variable_length_inputs:
                arrays = _pad_to_common_shape(arrays)
            elif any(a.shape[1:] != arrays[0].shape[1:] for a in arrays):
                raise ServingError(
                    StatusCode.FAILED_PRECONDITION,
                    f"Tensors with name '{name}' from different tasks have different shapes and "
                    "padding is turned off. Set pad_variable_length_inputs to true, or ensure that "
                    "all tensors with the same name have equal dimensions starting with the first "
                    "dim.")
            if padding:  # copies of the last task's first row, as TF Serving pads
                arrays.append(np.repeat(arrays[-1][:1], padding, axis=0))
            merged[name] = np.concatenate(arrays, axis=0)
        return merged, padding

    @staticmethod
    def _split(outputs: Tensors, sizes: list[int], padding: int) -> list[Tensors]:
        total = sum(sizes) + padding
        bounds = np.cumsum(sizes)[:-1]
        per_task: list[Tensors] = [{} for _ in sizes]
        for name, array in outputs.items():
            if array.ndim == 0:
                raise ServingError(StatusCode.FAILED_PRECONDITION,
                                   "Batched output tensor has 0 dimensions")
            if array.shape[0] != total:
                raise ServingError(StatusCode.FAILED_PRECONDITION,
                                   "Batched output tensor's 0th dimension does not equal the sum "
                                   "of the 0th dimension sizes of the input tensors")
            for rows, part in zip(per_task, np.split(array[:sum(sizes)], bounds)):
                rows[name] = part
        return per_task


def _pad_to_common_shape(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Pads every non-batch dimension to the longest in the batch with each tensor's first value."""
    if any(a.ndim != arrays[0].ndim for a in arrays):
        raise ServingError(StatusCode.INVALID_ARGUMENT,
                           "All tensors with the same name must have the same rank to be padded")
    longest = np.max([a.shape for a in arrays], axis=0)
    padded = []
    for array in arrays:
        widths = [(0, 0)] + [(0, int(m - n)) for m, n in zip(longest[1:], array.shape[1:])]
        if any(after for _, after in widths):
            value = array.flat[0] if array.size else (b"" if array.dtype == object else 0)
            array = np.pad(array, widths, mode="constant", constant_values=value)
        padded.append(array)
    return padded
