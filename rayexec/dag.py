"""The compiled forward DAG: PP stages deep, TP workers wide (Ray Compiled Graphs).

Ray calls compiled graphs "maintenance mode", so everything that touches them lives
here behind one small interface: `ForwardDag(grid, transport)`, `.execute(packed)`
returning one result ref per last-stage worker, `.teardown(timeout_s)`. The plain
Ray-call path (forward="rpc") lives in the executor and needs none of this.

Checks with clear errors: Ray too old or `ray[cgraph]` missing, nccl without cupy.
Teardown is bounded: on Ray 2.60 a graph that moved ~1 MB payloads over shared
memory can hang in teardown (a reader stays blocked after close); the caller then
kills the actors, which releases it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import ray
from packaging.version import Version

logger = logging.getLogger(__name__)

MIN_RAY_VERSION = "2.44.0"
CUPY_HINT = "pip install 'ray[cgraph]' (it brings cupy-cuda12x; use cupy-rocm-* on ROCm)"


def check_compiled_graphs() -> None:
    """Raise ImportError when this Ray cannot build the forward DAG."""
    found = getattr(ray, "__version__", "unknown")
    if found != "unknown" and Version(found) < Version(MIN_RAY_VERSION):
        raise ImportError(
            f"forward='dag' needs Ray compiled graphs from ray >= {MIN_RAY_VERSION}; found ray "
            f"{found}. Upgrade with pip install 'ray[cgraph]>={MIN_RAY_VERSION}', or use "
            f"forward='rpc'."
        )
    try:
        from ray.dag import DAGNode, InputNode, MultiOutputNode  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"forward='dag' needs ray.dag (compiled graphs), which failed to import with "
            f"ray {found}: {e}. Install pip install 'ray[cgraph]>={MIN_RAY_VERSION}', or use "
            f"forward='rpc'."
        ) from e
    if not hasattr(DAGNode, "with_tensor_transport"):
        raise ImportError(
            f"ray {found} has no DAGNode.with_tensor_transport; need ray >= {MIN_RAY_VERSION}"
        )


def check_nccl_transport() -> None:
    """cupy is how Ray's compiled graphs drive NCCL; fail early without it."""
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        raise ImportError(f"channel='nccl' needs cupy for Ray's NCCL channels ({e}). {CUPY_HINT}"
                          ) from e


def resolve_transport(channel: str, all_workers_have_gpu: bool) -> str:
    """The edge transport: nccl or shm. auto = nccl when every worker has a GPU of
    its own (`all_workers_have_gpu`)."""
    if channel == "auto":
        channel = "nccl" if all_workers_have_gpu else "shm"
    if channel == "nccl":
        if not all_workers_have_gpu:
            raise ValueError(
                "ExecutorConfig.channel='nccl' needs a whole GPU on every worker, but the "
                "workers hold none or share one (num_devices_per_worker < 1); use channel='shm' "
                "or 'auto'"
            )
        check_nccl_transport()
    return channel


class ForwardDag:
    """The compiled PP x TP forward graph over `grid[pp_rank][tp_rank]` actors::

        driver ──(step, batch)──┬─> [pp0,tp0] ──(step, batch, tensors)──> [pp1,tp0] ─┐
                                └─> [pp0,tp1] ──(step, batch, tensors)──> [pp1,tp1] ─┴─> driver
                                      stage 0      nccl | shm edges         stage 1

    Each edge between stages carries torch tensors over `transport`; the last stage's
    outputs return to the driver in one list (tp order).
    """

    def __init__(
        self,
        grid: Sequence[Sequence[Any]],
        transport: str,
        overlap_comm: bool = False,
        submit_timeout_s: float | None = None,
    ) -> None:
        from ray.dag import InputNode, MultiOutputNode

        check_compiled_graphs()
        self.transport = transport
        self._teardown_thread: threading.Thread | None = None
        with InputNode() as step_input:
            outputs: list[Any] = [step_input] * len(grid[0])
            outputs_by_stage = []
            for pp_rank, stage in enumerate(grid):
                outputs = [w.run_step.bind(x) for w, x in zip(stage, outputs)]
                if pp_rank < len(grid) - 1:
                    outputs = [o.with_tensor_transport(transport=transport) for o in outputs]
                outputs_by_stage.append(outputs)
            graph = MultiOutputNode(outputs)
        self._stage_outputs = outputs_by_stage
        from ray.dag.context import DAGContext

        self.compiled = graph.experimental_compile(
            _submit_timeout=submit_timeout_s,
            _overlap_gpu_communication=overlap_comm,
            # Room for PP steps in flight behind PP idle-park steps (park.py).
            _max_inflight_executions=max(DAGContext.get_current().max_inflight_executions,
                                         2 * len(grid) + 2),
        )
        logger.info("compiled the forward DAG: %d stage(s) x %d worker(s), %s edges",
                    len(grid), len(grid[0]), transport)

    def edge_type_hints(self) -> list[Any]:
        """The type hint of every stage-to-stage edge (for inspection and tests)."""
        return [node.type_hint for stage in self._stage_outputs[:-1] for node in stage]

    def execute(self, packed: Any) -> list[Any]:
        """Submit one step; returns one result ref per last-stage worker."""
        return self.compiled.execute(packed)

    def teardown(self, timeout_s: float) -> bool:
        """Tear the graph down, waiting at most `timeout_s`; False if it did not finish
        (the caller must then kill the blocked actors, which releases it)."""
        if self._teardown_thread is None:
            self._teardown_thread = threading.Thread(
                target=self._teardown, name="rayexec-dag-teardown", daemon=True)
            self._teardown_thread.start()
        self._teardown_thread.join(timeout_s)
        if self._teardown_thread.is_alive():
            logger.warning("compiled DAG teardown still running after %gs; blocked workers "
                           "will be killed to release it", timeout_s)
            return False
        return True

    def kill_proxy(self) -> None:
        """Kill Ray's driver-side proxy actor of this graph (DAGDriverProxyActor).
        Ray never kills it itself; it dies with the last handle, which a teardown
        still blocked in Ray keeps alive, so a timed-out teardown would leak it."""
        proxy = getattr(self.compiled, "_proxy_actor", None)
        if proxy is None:
            return
        try:
            ray.kill(proxy, no_restart=True)
        except Exception as e:
            logger.warning("killing the compiled graph's proxy actor failed: %r", e)

    def _teardown(self) -> None:
        try:
            self.compiled.teardown()
        except Exception as e:  # a dead actor makes teardown raise; it is still over
            logger.warning("compiled DAG teardown raised (a worker is gone): %r", e)
