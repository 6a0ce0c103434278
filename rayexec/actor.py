"""RankActor: the Ray actor that hosts one engine worker.

A plain class that `group.py` turns into an actor (one per rank; "worker" is the engine's
object it hosts, never this actor). It is created knowing only
its creation index; the executor then asks where it landed, gives it its per-rank
environment and builds the engine's worker inside it with `init_worker`. Engine
methods run through `execute_method` (a name, or a cloudpickled callable taking the
worker first); the forward step runs through `run_step`, the one method
bound into the compiled DAG (and chained by plain calls when forward="rpc").

Two extra concurrency groups keep the worker observable while it is busy:
"control" (ping, step progress) and "monitor" (a call that never returns, so its
failure tells the driver the process died). This module does not decide ranks or
environments; `layout.py` does.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle
import ray

from rayexec import envs
from rayexec.errors import WorkerError
from rayexec.park import Park, ParkGate

logger = logging.getLogger(__name__)

CONCURRENCY_GROUPS = {"control": 2, "monitor": 1}
STEP_HEADER = struct.Struct("<q")  # step
EDGE_HEADER = struct.Struct("<qq")  # step, len(batch)


def pack_step(step: int, batch: Any) -> Any:
    """What the driver sends stage 0. A `bytes` batch goes as bytes with the step id
    in front: Ray's channels hand bytes over as they are, with no msgpack or pickle on
    either side, their cheapest path (an engine that pickles its batch once, like the
    vLLM backend, takes it on every step). Any other batch goes as (step, batch)."""
    if isinstance(batch, bytes):
        return STEP_HEADER.pack(step) + batch
    return step, batch


def unpack_step(packed: Any) -> tuple[int, Any]:
    """(step, batch) from what `pack_step` made."""
    if isinstance(packed, bytes):
        return STEP_HEADER.unpack_from(packed)[0], packed[STEP_HEADER.size:]
    return packed


def pack_edge(step: int, batch: Any, out: Any) -> Any:
    """What a stage sends the next one. When the batch and the stage's output are
    both `bytes` (a worker that serializes small outputs itself), one bytes frame,
    for the same reason as `pack_step`; otherwise (step, batch, out), whose tensors
    take the edge's tensor transport."""
    if isinstance(batch, bytes) and isinstance(out, bytes):
        return EDGE_HEADER.pack(step, len(batch)) + batch + out
    return step, batch, out


def unpack_edge(packed: Any) -> tuple[int, Any, Any]:
    """(step, batch, out) from what `pack_edge` made."""
    if isinstance(packed, bytes):
        step, size = EDGE_HEADER.unpack_from(packed)
        start = EDGE_HEADER.size
        return step, packed[start:start + size], packed[start + size:]
    return packed


def import_worker_cls(worker_cls: type | str) -> type:
    """The class itself, importing "pkg.module.Class" strings."""
    if isinstance(worker_cls, type):
        return worker_cls
    module_name, _, cls_name = worker_cls.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"ExecutorConfig.worker_cls={worker_cls!r} cannot be imported: {e}. Install the "
            f"package that defines it on the driver and every node, or pass the class object"
        ) from None
    cls = getattr(module, cls_name, None)
    if not isinstance(cls, type):
        raise ValueError(
            f"ExecutorConfig.worker_cls={worker_cls!r}: module {module_name!r} has no class "
            f"{cls_name!r}"
        )
    return cls


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def _pin_process(cores: tuple[int, ...]) -> None:
    # sched_setaffinity(0) pins only the calling thread; Ray already runs several
    # threads (one per concurrency group, the DAG loop), so pin each of them.
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:
            pass  # a thread that ended between listdir and the call
        except OSError as e:  # e.g. cores outside this container's cpuset
            # Pinning only helps speed: the worker runs unpinned, but say so.
            logger.warning("pinning thread %s to cores %s failed: %s; it runs unpinned. "
                           "Set cpu_bind=False, or give the workers cores they may use",
                           tid, list(cores), e)


def is_local_address(ip: str) -> bool:
    """Whether `ip` is an address of this machine (binding to it succeeds)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


class RankActor:
    """Hosts one engine worker; every public method is callable from the driver."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.rank: int | None = None
        self.worker: Any = None
        self.is_first_stage = True
        self.is_last_stage = True
        self.pp_rank = 0
        self.pipeline_parallel_size = 1
        self.gate = ParkGate()
        # Step progress, written by the step thread and read from "control".
        self.step_started = -1
        self.step_finished = -1
        self.step_since = time.time()
        self._node_ip: str | None = None

    # ---- identity and environment -------------------------------------------------
    def get_node_ip(self) -> str:
        if self._node_ip is None:
            self._node_ip = envs.node_host_ip() or ray.util.get_node_ip_address()
        return self._node_ip

    def get_node_and_device_ids(self, resource_key: str) -> dict[str, Any]:
        """Where this worker landed: node id, the IP it will use (RAYEXEC_HOST_IP or
        Ray's), Ray's IP for the node, whether that IP is an address of this machine,
        the ids of the `resource_key` devices Ray gave it, and the node's CPU count."""
        ctx = ray.get_runtime_context()
        ids = [] if resource_key == "CPU" else ctx.get_accelerator_ids().get(resource_key, [])
        ip = self.get_node_ip()
        return {
            "node_id": ctx.get_node_id(), "node_ip": ip,
            "ray_node_ip": ray.util.get_node_ip_address(), "ip_is_local": is_local_address(ip),
            "device_ids": [str(i) for i in ids], "node_cpus": _usable_cpus(),
        }

    def find_free_port(self) -> int:
        """A TCP port free on this node's own address (the rendezvous binds there)."""
        with socket.socket(socket.AF_INET6 if ":" in self.get_node_ip() else socket.AF_INET) as s:
            s.bind((self.get_node_ip(), 0))
            return s.getsockname()[1]

    def update_environment_variables(self, env: dict[str, str]) -> None:
        for key, value in env.items():
            if os.environ.get(key) != value:
                logger.debug("worker %s: setting %s=%s", self.index, key, value)
            os.environ[key] = value
        if "RAYEXEC_HOST_IP" in env:
            self._node_ip = env["RAYEXEC_HOST_IP"]

    # ---- building the engine's worker ----------------------------------------------
    def init_worker(
        self,
        worker_cls: type | str,
        kwargs: dict[str, Any],
        pipeline_parallel_size: int,
        cpu_threads: int | None = None,
        cpu_cores: tuple[int, ...] | None = None,
    ) -> None:
        self.rank = kwargs["rank"]
        self.pp_rank, self.pipeline_parallel_size = kwargs["pp_rank"], pipeline_parallel_size
        self.is_first_stage = self.pp_rank == 0
        self.is_last_stage = self.pp_rank == pipeline_parallel_size - 1
        if cpu_cores:
            _pin_process(tuple(cpu_cores))
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        self._run("__init__", lambda: self._build(worker_cls, kwargs))

    def _build(self, worker_cls: type | str, kwargs: dict[str, Any]) -> None:
        self.worker = import_worker_cls(worker_cls)(**kwargs)

    def reset_worker(self) -> None:
        """Drop the engine's worker and torch.distributed state, so that init_worker can
        build it again (used when a peer is replaced)."""
        self.worker = None
        self.step_started = self.step_finished = -1
        if "torch" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        gc.collect()

    # ---- calls from the driver ------------------------------------------------------
    def execute_method(self, method: str | bytes, *args: Any, **kwargs: Any) -> Any:
        """Run `method` (a name, or a cloudpickled callable(worker, ...)) on the worker."""
        if isinstance(method, bytes):
            fn = cloudpickle.loads(method)
            name = getattr(fn, "__name__", "<callable>")
            return self._run(name, lambda: fn(self.worker, *args, **kwargs))
        return self._run(method, lambda: getattr(self.worker, method)(*args, **kwargs))

    def run_step(self, packed: Any) -> Any:
        """The forward step: unpack, call execute_model, pack for the next stage.

        Stage 0 receives the driver's `pack_step(step, batch)`; later stages receive
        the previous stage's `pack_edge(step, batch, intermediate)`. The last stage
        returns the worker's output; the others pass `pack_edge(...)` on. A `Park`
        batch never reaches the engine's worker (see park.py).
        """
        if self.is_first_stage:
            step, batch = unpack_step(packed)
            intermediate = None
        else:
            step, batch, intermediate = unpack_edge(packed)
        if isinstance(batch, Park):
            if batch.blocks(self.pp_rank, self.pipeline_parallel_size):
                self.gate.wait(batch.park_id)
            return None if self.is_last_stage else pack_edge(step, batch, None)
        self.step_started, self.step_since = step, time.time()
        try:
            out = self._run("execute_model", lambda: self.worker.execute_model(batch, intermediate))
        finally:
            self.step_finished = step
        return out if self.is_last_stage else pack_edge(step, batch, out)

    def _run(self, method: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as e:
            tb = traceback.format_exc()
            logger.error("rank %s (%s): %s() raised\n%s", self.rank, self.get_node_ip(), method, tb)
            raise WorkerError(
                self.rank, self.get_node_ip(), method, type(e).__name__, str(e), tb
            ) from None

    # ---- observable while busy --------------------------------------------------------
    @ray.method(concurrency_group="control")
    def ping(self) -> int | None:
        return self.rank

    @ray.method(concurrency_group="control")
    def get_progress(self) -> tuple[int, int, float]:
        """(last step started, last step finished, when the last one started)."""
        return self.step_started, self.step_finished, self.step_since

    @ray.method(concurrency_group="control")
    def wake(self, park_id: int) -> None:
        """End park `park_id` (and any earlier one); see park.py."""
        self.gate.wake(park_id)

    @ray.method(concurrency_group="control")
    def is_parked(self) -> bool:
        """Whether the step thread is blocked in a park step."""
        return self.gate.parked

    @ray.method(concurrency_group="monitor")
    def wait_for_death(self) -> None:
        """Never returns: the driver watches this call to learn the process died."""
        threading.Event().wait()
