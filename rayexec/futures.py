"""Futures over forward steps that resolve in submission order.

`StepQueue.submit(fetch)` returns a `StepFuture`, a `concurrent.futures.Future`.
Nothing runs in the background by default: `result()` (or `exception()`) with no
timeout fetches every earlier pending step first, in order, in the calling thread.
That keeps the per-step path free of thread hops and fits Ray's compiled graphs,
whose execute/get are not thread-safe and whose results must be read in order
(a compiled graph's result can be read once, so a fetch cannot stop half-way).

What else works, and how:
- `result(timeout)` / `exception(timeout)` with a timeout: the fetch runs in a
  helper thread ("rayexec-step-fetch") and the caller waits at most `timeout`,
  then gets `TimeoutError`; the step stays fetchable, the fetch goes on (bounded
  by the executor's execute_timeout_s) and a later `result()` returns it.
- `concurrent.futures.wait` / `as_completed` and `add_done_callback` (which
  `asyncio.wrap_future` uses) start that helper fetch, so they complete.
- `done()` never starts a fetch: it turns True once the step was fetched (by any
  of the above, or a later step's fetch) or failed by `fail_all` (a worker died,
  a restart, shutdown). Polling `done()` alone on an unfetched step stays False.

Locks: `lock` (the executor's "steps lock", an RLock) is held while a step is
submitted to or fetched from the graph. `_pending_lock` is a leaf lock guarding
only the deque, so that `fail_all` and `clear` (death reports, shutdown) never
wait behind a fetch that is blocked in Ray.
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


class _Waiters(list):
    """`Future._waiters`: concurrent.futures.wait / as_completed append a waiter
    here instead of calling a method, so appending is where a step future learns
    that someone waits on it and starts its helper fetch."""

    def __init__(self, future: StepFuture) -> None:
        super().__init__()
        self._future = future

    def append(self, waiter: Any) -> None:
        super().append(waiter)
        self._future.fetch_in_background()


class StepFuture(Future):
    """A step's result; fetching it first fetches every earlier step."""

    def __init__(self, queue: StepQueue, fetch: Callable[[], Any]) -> None:
        super().__init__()
        self._queue = queue
        self._fetch: Callable[[], Any] | None = fetch
        self._waiters = _Waiters(self)
        self._fetching = False  # a helper fetch thread was started for this future

    def result(self, timeout: float | None = None) -> Any:
        self._drive(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._drive(timeout)
        return super().exception(timeout)

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        super().add_done_callback(fn)
        self.fetch_in_background()

    def _drive(self, timeout: float | None) -> None:
        if self.done():
            return
        if timeout is None:
            self._queue.fetch_through(self)
        else:  # the caller's bound holds even while the fetch is blocked in Ray
            self.fetch_in_background()

    def fetch_in_background(self) -> None:
        """Fetch through this step in a helper thread (at most one per future)."""
        # Future's own (reentrant) condition: wait()/as_completed() already hold it
        # when they append their waiter.
        with self._condition:
            if self._fetching or self.done():
                return
            self._fetching = True
        threading.Thread(target=self._queue.fetch_through, args=(self,),
                         name="rayexec-step-fetch", daemon=True).start()


class StepQueue:
    """Pending steps, oldest first."""

    def __init__(self, lock: threading.RLock | None = None) -> None:
        self._pending: deque[StepFuture] = deque()
        # Shared with whoever submits steps, so that submitting and fetching never
        # interleave on the compiled graph.
        self.lock = lock or threading.RLock()
        self._pending_lock = threading.Lock()  # leaf: the deque only

    def __len__(self) -> int:
        with self._pending_lock:
            return len(self._pending)

    def empty(self) -> bool:
        """No step is pending (submitted and not yet read)."""
        return not self._pending

    def submit(self, fetch: Callable[[], Any]) -> StepFuture:
        future = StepFuture(self, fetch)
        with self._pending_lock:
            self._pending.append(future)
        return future

    def fetch_through(self, target: StepFuture) -> None:
        """Fetch pending steps in order until `target` is settled."""
        with self.lock:
            while not target.done():
                with self._pending_lock:
                    if not self._pending:
                        return
                    head = self._pending.popleft()
                fetch, head._fetch = head._fetch, None  # drop the ref: free Ray's buffers
                if not head.done() and fetch is not None:
                    _settle(head, fetch)

    def fetch_all(self) -> None:
        """Fetch every pending step, in order; their futures keep the results (or
        the errors)."""
        with self.lock:
            with self._pending_lock:
                last = self._pending[-1] if self._pending else None
            if last is not None:
                self.fetch_through(last)

    def fail_all(self, error: BaseException) -> int:
        """Fail every pending step now (without fetching); returns how many."""
        with self._pending_lock:
            pending = list(self._pending)
        failed = 0
        for future in pending:
            if not future.done():
                _fail(future, error)
                failed += 1
        return failed

    def clear(self) -> None:
        """Forget every pending step (after `fail_all`); takes only the leaf lock."""
        with self._pending_lock:
            self._pending.clear()
