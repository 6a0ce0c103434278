"""The compiled forward DAG: PP stages deep, TP workers wide (Ray Compiled Graphs).

Ray calls compiled graphs "maintenance mode", so everything that touches them lives
here behind one small interface: `ForwardDag(grid, transport, ...)`, `.execute(step,
batch)` returning one result ref per last-stage worker, `.output(value)` turning what
such a ref gives back into the worker's output, `.teardown(timeout_s)`.

On CPU (`frames=True`) every edge -- the driver's input, each stage-to-stage edge, the
last stage's result -- carries one `wire` frame: `bytes`, which Ray's channels pass
without serializing, with the tensors' raw bytes inside. On accelerators the edges
between stages keep `with_tensor_transport` (NCCL, or shm for workers sharing a
device). Channel buffers are sized for `max_step_bytes` up front, since Ray grows a
channel on the first larger message and keeps the old buffer. The plain
Ray-call path (forward="rpc") lives in the executor and needs none of this.

Checks with clear errors: Ray too old or `ray[cgraph]` missing, nccl without cupy
on a worker (the executor asks the workers; the driver needs no cupy).
Teardown is bounded: on Ray 2.60 a graph that moved ~1 MB payloads over shared
memory can hang in teardown (a reader stays blocked after close); the caller then
kills the actors, which releases it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from packaging.version import Version

from rayexec import wire

logger = logging.getLogger(__name__)

MIN_RAY_VERSION = "2.44.0"
CUPY_HINT = ("install cupy on every worker node, matching its CUDA: pip install "
             "cupy-cuda12x (CUDA 12) or cupy-cuda13x (CUDA 13); cupy-rocm-* on ROCm")


_teardown_explained = False


def _log_blocked_teardown(timeout_s: float) -> None:
    """Known Ray behaviour, not a fault: say why once per process (INFO), then DEBUG,
    so a program that closes many executors is not flooded."""
    global _teardown_explained
    if _teardown_explained:
        logger.debug("compiled graph teardown still running after %gs; killing its workers",
                     timeout_s)
        return
    _teardown_explained = True
    logger.info("compiled graph teardown still running after %gs: Ray 2.60's shared-memory "
                "readers can stay blocked after a graph moved payloads of about 1 MB or more. "
                "Killing its workers releases it; nothing is lost (the graph was being closed). "
                "Said once per process.", timeout_s)


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


def resolve_transport(
    channel: str, whole_gpus: bool, manage_visibility: bool = True,
    no_cupy: Mapping[int, str] | None = None,
) -> str:
    """The edge transport: nccl, shm or gloo.

    `whole_gpus`: every worker holds a whole GPU of its own. `no_cupy`: rank -> import
    error, for the workers where cupy (Ray's NCCL driver) does not import; it is
    checked on the workers, not the driver. auto = nccl when it can work, else shm
    (with a warning naming the ranks when only cupy is missing)."""
    no_cupy = dict(no_cupy or {})
    if channel == "auto":
        if not whole_gpus or not manage_visibility:
            return "shm"
        if no_cupy:
            logger.warning(
                "channel='auto' uses shm, not nccl: cupy does not import on rank(s) %s (%s). "
                "To use NCCL between stages, %s", sorted(no_cupy),
                no_cupy[min(no_cupy)], CUPY_HINT)
            return "shm"
        return "nccl"
    if channel == "nccl":
        if not whole_gpus:
            raise ValueError(
                "ExecutorConfig.channel='nccl' needs a whole GPU on every worker, but the "
                "workers hold none or share one (num_devices_per_worker < 1); use channel='shm' "
                "or 'auto'"
            )
        if not manage_visibility:
            raise ValueError("ExecutorConfig.channel='nccl' needs manage_visibility=True")
        if no_cupy:
            raise ImportError(
                f"ExecutorConfig.channel='nccl' needs cupy on every worker for Ray's NCCL "
                f"channels; it does not import on rank(s) {sorted(no_cupy)} "
                f"({no_cupy[min(no_cupy)]}). {CUPY_HINT}; or use channel='shm' / 'auto'"
            )
    return channel


def await_proxy(compiled: Any, timeout_s: float) -> None:
    """Wait (at most `timeout_s`) until the compiled graph's driver-side proxy actor is up.

    Ray creates one `DAGDriverProxyActor` per compiled graph and returns from compile
    without waiting for it. When no idle worker process is left to host it, Ray starts
    a new one, whose start-up (about 0.2 s of CPU here) then competes with the first
    steps: on 2 cores, the first 150 steps of the third executor in one process took
    1.6 ms each instead of 0.27 ms, and that process used the CPU meanwhile. Waiting
    here moves that cost into compile time, where the user expects it. A proxy that
    does not come up is not fatal (Ray needs it only to resize a channel), so it is
    logged, not raised."""
    proxy = getattr(compiled, "_proxy_actor", None)
    if proxy is None:
        return
    try:
        ray.get(proxy.__ray_ready__.remote(), timeout=timeout_s)
    except Exception as e:
        logger.warning("the compiled graph's proxy actor was not up after %gs (%r); "
                       "steps run anyway, the first ones may be slower", timeout_s, e)


class ForwardDag:
    """The compiled PP x TP forward graph over `grid[pp_rank][tp_rank]` actors::

        driver ──(step, batch)──┬─> [pp0,tp0] ──(step, batch, tensors)──> [pp1,tp0] ─┐
                                └─> [pp0,tp1] ──(step, batch, tensors)──> [pp1,tp1] ─┴─> driver
                                      stage 0   nccl|shm|gloo edges         stage 1

    Each edge between stages carries torch tensors over `transport`; the last stage's
    outputs return to the driver in one list (tp order).
    """

    def __init__(
        self,
        grid: Sequence[Sequence[Any]],
        transport: str | Any,
        overlap_comm: bool = False,
        submit_timeout_s: float | None = None,
        frames: bool = False,
        buffer_size_bytes: int | None = None,
        ready_timeout_s: float = 60.0,
    ) -> None:
        """`transport`: "nccl", "shm", or a Ray Communicator instance (gloo.py) that
        every edge uses. `ready_timeout_s` bounds the wait for Ray's proxy actor
        (`await_proxy`)."""
        from ray.dag import InputNode, MultiOutputNode

        check_compiled_graphs()
        self.transport = transport if isinstance(transport, str) else (
            f"{type(transport).__name__}")
        self.frames = frames
        self._teardown_thread: threading.Thread | None = None
        with InputNode() as step_input:
            outputs: list[Any] = [step_input] * len(grid[0])
            outputs_by_stage = []
            for pp_rank, stage in enumerate(grid):
                edge = "frames" if frames else "transport"
                outputs = [w.run_step.bind(x, edge) for w, x in zip(stage, outputs)]
                if pp_rank < len(grid) - 1 and not frames:
                    outputs = [o.with_tensor_transport(transport=transport) for o in outputs]
                outputs_by_stage.append(outputs)
            graph = MultiOutputNode(outputs)
        self._stage_outputs = outputs_by_stage
        from ray.dag.context import DAGContext

        self.compiled = graph.experimental_compile(
            _submit_timeout=submit_timeout_s,
            _buffer_size_bytes=buffer_size_bytes,
            _overlap_gpu_communication=overlap_comm,
            # Room for PP steps in flight behind PP idle-park steps (park.py).
            _max_inflight_executions=max(DAGContext.get_current().max_inflight_executions,
                                         2 * len(grid) + 2),
        )
        logger.info("compiled the forward DAG: %d stage(s) x %d worker(s), %s edges",
                    len(grid), len(grid[0]), "bytes-frame" if frames else self.transport)
        await_proxy(self.compiled, ready_timeout_s)

    def edge_type_hints(self) -> list[Any]:
        """The type hint of every stage-to-stage edge (for inspection and tests)."""
        return [node.type_hint for stage in self._stage_outputs[:-1] for node in stage]

    def execute(self, step: int, batch: Any) -> list[Any]:
        """Submit one step; returns one result ref per last-stage worker."""
        message = (step, batch)
        # reuse: execute writes the input into the channel (a copy) before it returns.
        return self.compiled.execute(
            wire.pack(message, reuse=True, channel=True) if self.frames else message)

    def output(self, value: Any) -> Any:
        """The worker's output from what a result ref gave back."""
        return wire.unpack(value) if self.frames else value

    def teardown(self, timeout_s: float) -> bool:
        """Tear the graph down, waiting at most `timeout_s`; False if it did not finish
        (the caller must then kill the blocked actors, which releases it)."""
        if self._teardown_thread is None:
            self._teardown_thread = threading.Thread(
                target=self._teardown, name="rayexec-dag-teardown", daemon=True)
            self._teardown_thread.start()
        self._teardown_thread.join(timeout_s)
        if self._teardown_thread.is_alive():
            _log_blocked_teardown(timeout_s)
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
