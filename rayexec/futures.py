"""Futures over forward steps that resolve in submission order.

`StepQueue.submit(fetch)` returns a `StepFuture`, a `concurrent.futures.Future`.
Nothing runs in the background: the first `result()` (or `exception()`) on any
future fetches every earlier pending step first, in order, in the calling thread.
That keeps the per-step path free of thread hops and fits Ray's compiled graphs,
whose execute/get are not thread-safe and whose results must be read in order.
Consequence: `done()` turns True only once a step was fetched (by its own
`result()` or a later one's), or when `fail_all` failed it (a worker died).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any


def _settle(future: Future, fetch: Callable[[], Any]) -> None:
    try:
        value = fetch()
    except BaseException as e:
        _fail(future, e)
    else:
        try:
            future.set_result(value)
        except InvalidStateError:
            pass  # failed meanwhile by fail_all: that verdict stands


def _fail(future: Future, error: BaseException) -> None:
    try:
        future.set_exception(error)
    except InvalidStateError:
        pass


class StepFuture(Future):
    """A step's result; fetching it first fetches every earlier step."""

    def __init__(self, queue: StepQueue, fetch: Callable[[], Any]) -> None:
        super().__init__()
        self._queue = queue
        self._fetch = fetch

    def result(self, timeout: float | None = None) -> Any:
        self._queue.fetch_through(self)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._queue.fetch_through(self)
        return super().exception(timeout)


class StepQueue:
    """Pending steps, oldest first."""

    def __init__(self, lock: threading.RLock | None = None) -> None:
        self._pending: deque[StepFuture] = deque()
        # Shared with whoever submits steps, so that submitting and fetching never
        # interleave on the compiled graph.
        self.lock = lock or threading.RLock()

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, fetch: Callable[[], Any]) -> StepFuture:
        future = StepFuture(self, fetch)
        with self.lock:
            self._pending.append(future)
        return future

    def fetch_through(self, target: StepFuture) -> None:
        """Fetch pending steps in order until `target` is settled."""
        with self.lock:
            while not target.done() and self._pending:
                head = self._pending.popleft()
                if not head.done():
                    _settle(head, head._fetch)
                head._fetch = None  # drop the ref: release Ray's buffers early

    def fetch_all(self) -> None:
        """Fetch every pending step, in order; their futures keep the results."""
        with self.lock:
            if self._pending:
                self.fetch_through(self._pending[-1])

    def fail_all(self, error: BaseException) -> int:
        """Fail every pending step now (without fetching); returns how many."""
        failed = 0
        for future in list(self._pending):
            if not future.done():
                _fail(future, error)
                failed += 1
        return failed

    def clear(self) -> None:
        with self.lock:
            self._pending.clear()
