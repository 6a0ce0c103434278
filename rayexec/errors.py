"""The exceptions rayexec raises for users to catch.

Every error says what happened, the values involved and, where there is one, the
fix. All of them subclass `RayExecError`. Plain bad arguments (a config field out
of range, an unknown method name) stay `ValueError` / `AttributeError` so they read
like any other Python misuse. This module imports nothing from Ray so that errors
can be pickled into and out of worker processes cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence


class RayExecError(Exception):
    """Base class of every rayexec error."""


class PlacementError(RayExecError):
    """Workers could not be placed: resources missing, a strategy that cannot be
    met, or nodes whose identity (IP address) is inconsistent."""


class ExecutorClosedError(RayExecError):
    """The executor was used after `shutdown()`."""


class WorkerError(RayExecError):
    """A method raised inside a worker.

    Carries the rank, the node IP, the method name, the original exception's type
    name and message, and the remote traceback as text.
    """

    def __init__(
        self,
        rank: int | None,
        node_ip: str,
        method: str,
        exc_type: str,
        exc_message: str,
        traceback: str,
    ) -> None:
        self.rank = rank
        self.node_ip = node_ip
        self.method = method
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.traceback = traceback
        super().__init__(
            f"{exc_type}: {exc_message} (raised in {method}() on rank {rank}, node {node_ip})"
            f"\n--- remote traceback (rank {rank}) ---\n{traceback.rstrip()}"
        )

    def __reduce__(self):
        return (
            WorkerError,
            (self.rank, self.node_ip, self.method, self.exc_type, self.exc_message, self.traceback),
        )


class WorkerDiedError(RayExecError):
    """One or more worker processes died (killed, crashed, node lost)."""

    def __init__(self, ranks: Sequence[int], nodes: Sequence[str], detail: str = "") -> None:
        self.ranks = list(ranks)
        self.nodes = list(nodes)
        self.detail = detail
        where = ", ".join(f"rank {r} on node {n}" for r, n in zip(self.ranks, self.nodes))
        msg = f"worker(s) died: {where or 'unknown rank'}"
        if detail:
            msg += f" ({detail})"
        msg += (
            ". The executor cannot run steps until the workers are replaced: call "
            "restart_failed_workers() or create a new executor."
        )
        super().__init__(msg)

    def __reduce__(self):
        return (WorkerDiedError, (self.ranks, self.nodes, self.detail))


class ExecutorTimeoutError(RayExecError):
    """A step or a call did not finish in time.

    `ranks` are the ranks that had not answered; `stages` the pipeline stages they
    belong to (empty for a collective_rpc); `timeout_s` the limit that ran out and
    `setting` the config field (or argument) that sets it.
    """

    def __init__(
        self,
        what: str,
        ranks: Sequence[int],
        timeout_s: float,
        setting: str,
        stages: Sequence[int] = (),
        detail: str = "",
    ) -> None:
        self.what = what
        self.ranks = list(ranks)
        self.stages = list(stages)
        self.timeout_s = timeout_s
        self.setting = setting
        self.detail = detail
        where = f"rank(s) {self.ranks}" if self.ranks else "no rank identified"
        if self.stages:
            where = f"stage(s) {self.stages}, " + where
        msg = f"{what} did not finish within {timeout_s:g}s: not finished on {where}"
        if detail:
            msg += f" ({detail})"
        msg += f". If the work is expected to take longer, raise {setting}."
        super().__init__(msg)

    def __reduce__(self):
        return (
            ExecutorTimeoutError,
            (self.what, self.ranks, self.timeout_s, self.setting, self.stages, self.detail),
        )


class WeightSyncError(RayExecError):
    """A weight sync (update_weights) failed, or steps are refused because the
    weights are not in a servable state (a failed sync, or freed by sleep(level=2))."""


class ExecutorAsleepError(RayExecError):
    """A step was asked of an executor put to sleep(); call wake_up() first."""
