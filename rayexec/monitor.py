"""DeathMonitor: notices, without being asked, that a worker process died.

Each worker runs `wait_for_death()` in its own "monitor" concurrency group; the
call never returns while the process lives, so a finished call means a dead actor
(Ray reports it within well under a second). One daemon thread waits on all of
them and reports dead ranks to a callback. It does not restart anything itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import ray

logger = logging.getLogger(__name__)


class DeathMonitor(threading.Thread):
    def __init__(
        self,
        actors: Sequence[Any],
        on_death: Callable[[list[int], list[BaseException]], None],
        poll_s: float = 0.5,
    ) -> None:
        super().__init__(name="rayexec-death-monitor", daemon=True)
        self._on_death = on_death
        self._poll_s = poll_s
        self._stopping = threading.Event()
        self._refs = {a.wait_for_death.remote(): rank for rank, a in enumerate(actors)}

    def watch(self, rank: int, actor: Any) -> None:
        """Also watch `actor` (a replacement) as `rank`."""
        self._refs[actor.wait_for_death.remote()] = rank

    def run(self) -> None:
        while not self._stopping.is_set():
            refs = list(self._refs)
            if not refs:
                self._stopping.wait(self._poll_s)
                continue
            try:
                ready, _ = ray.wait(refs, num_returns=1, timeout=self._poll_s)
                if ready:  # collect every death that is already known, not just one
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            except Exception as e:
                if not ray.is_initialized():  # Ray shut down underneath us: nothing to watch
                    logger.warning("death monitor stops: Ray was shut down (%r)", e)
                    return
                # A passing failure (e.g. the GCS briefly unreachable): keep watching,
                # or a later death would go unnoticed.
                logger.warning("death monitor: ray.wait failed (%r); still watching ranks %s",
                               e, sorted(set(self._refs.values())))
                self._stopping.wait(self._poll_s)
                continue
            if not ready or self._stopping.is_set():
                continue
            ranks, errors = [], []
            for ref in ready:
                ranks.append(self._refs.pop(ref))
                try:
                    ray.get(ref, timeout=0)
                    errors.append(RuntimeError("wait_for_death returned"))
                except Exception as e:
                    errors.append(e)
            logger.error("worker(s) of rank %s died", ranks)
            try:
                self._on_death(ranks, errors)
            except Exception:
                logger.exception("handling the death of ranks %s failed", ranks)

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout_s)
