"""Idle parking: compiled-graph workers sleep, instead of polling, when no step comes.

Ray's compiled-graph channel readers poll (a `sched_yield` loop) while they wait
for input, so an idle executor keeps one core busy per worker, for as long as it
waits (docs/benchmarks.md, "Idle"). vLLM's own workers poll for 1 s
after their last step and then sleep; this module gives rayexec's DAG workers the
same: after `ExecutorConfig.idle_park_s` with no step, the driver sends PP "park"
steps down the graph (first reading, once every rank finished them, any steps the
caller submitted and left unread; their futures keep the results). On park step
j, the workers of stage pp_rank block (on a condition variable, no CPU) when
j == PP - 1 - pp_rank and pass it on otherwise:
the last stage blocks on the first park step, stage 0 on the last, so that every
stage ends up inside a blocked call at the same time and none is left polling.
The next step first wakes every worker with a plain Ray call to its "control"
concurrency group and reads the park steps' outputs (dropped; they come back as
soon as the workers hear, a few ms), then runs as usual. Shutdown and restart wake
the workers the same way first, since a parked worker would hold Ray's teardown.

Here: the park marker, the worker's gate and the driver's idle timer. Not here:
the graph (dag.py) and when steps run (executor.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Park:
    """The batch of a park step: park `park_id`, step `index` of PP."""

    park_id: int
    index: int

    def blocks(self, pp_rank: int, pipeline_parallel_size: int) -> bool:
        """Whether stage `pp_rank` blocks on this park step (see the module docstring)."""
        return self.index == pipeline_parallel_size - 1 - pp_rank


class ParkGate:
    """A worker's side: `wait(park_id)` blocks until `wake(id)` with id >= park_id.
    A wake that arrives before its park (calls race the graph) is kept."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._woken = 0
        self.parked = False

    def wait(self, park_id: int) -> None:
        with self._cond:
            self.parked = True
            try:
                while self._woken < park_id:
                    self._cond.wait()
            finally:
                self.parked = False

    def wake(self, park_id: int) -> None:
        with self._cond:
            self._woken = max(self._woken, park_id)
            self._cond.notify_all()


class IdleTimer(threading.Thread):
    """The driver's side: calls `park_if_idle()` until stopped. It returns the seconds
    to wait before asking again (it decides what idle means), or None to stop."""

    def __init__(self, park_if_idle: Callable[[], float | None]) -> None:
        super().__init__(name="rayexec-idle-park", daemon=True)
        self._park_if_idle = park_if_idle
        self._stopping = threading.Event()

    def run(self) -> None:
        delay: float | None = 0.0
        while delay is not None and not self._stopping.wait(delay):
            try:
                delay = self._park_if_idle()
            except Exception:  # the next step still works unparked; say why once
                logger.exception("idle parking failed; workers keep polling while idle")
                return

    def stop(self) -> None:
        self._stopping.set()
