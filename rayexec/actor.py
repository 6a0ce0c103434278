"""RankActor: the Ray actor that hosts one engine worker.

A plain class that `group.py` turns into an actor (one per rank; "worker" is the engine's
object it hosts, never this actor). It is created knowing only
its creation index; the executor then asks where it landed, gives it its per-rank
environment and builds the engine's worker inside it with `init_worker`. Engine
methods run through `execute_method` (a name, or a cloudpickled callable taking the
worker first); the forward step runs through `run_step`, the one method
bound into the compiled DAG (and chained by plain calls when forward="rpc").

The device is rayexec's job (docs/gpu.md): `init_worker` makes the rank's device
current before the engine's worker is built, and every entry point below sets it
once on the thread it runs on (Ray runs steps on its compiled-graph thread, rpc
calls and Ray's own `__ray_call__` on the default thread, control calls on theirs):
the current device is per thread, and a thread that never set it computes on
device 0. Ray's channel code is pointed at the same device (its ChannelContext).

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
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle
import ray

from rayexec import envs, wire
from rayexec.contract import import_worker_cls
from rayexec.errors import WorkerError
from rayexec.park import Park, ParkGate
from rayexec.platform import Platform

logger = logging.getLogger(__name__)

CONCURRENCY_GROUPS = {"control": 2, "monitor": 1}


def to_device(value: Any, device: Any) -> Any:
    """`value` with every tensor of `device`'s kind in it (through dicts, lists and
    tuples) moved onto `device` itself; tensors of other kinds (a CPU tensor the
    engine chose to send) stay. Plain Ray calls (forward="rpc") rebuild a CUDA
    tensor on the device index it had in the sender's process, which is another
    GPU here (or none: another node may see fewer)."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.device.type == device.type and value.device != device:
            return value.to(device)
        return value
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_device(v, device) for v in value)
    return value


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
        self._platform: Platform | None = None
        self._device_index: int | None = None  # None: rayexec does not set a device
        self._thread = threading.local()  # .device: what this thread last set

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
        if resource_key == "GPU":
            ids = ray.get_gpu_ids()  # in the order Ray's channels read it (layout.py)
        else:
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
        platform: Platform | None = None,
        device_index: int | None = None,
    ) -> None:
        """Build the engine's worker. With `device_index` (the rank's local_rank on an
        accelerator whose visibility rayexec manages), that device is made current
        first, on this thread and for Ray's channels."""
        self.rank = kwargs["rank"]
        self.pp_rank, self.pipeline_parallel_size = kwargs["pp_rank"], pipeline_parallel_size
        self.is_first_stage = self.pp_rank == 0
        self.is_last_stage = self.pp_rank == pipeline_parallel_size - 1
        if cpu_cores:
            _pin_process(tuple(cpu_cores))
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        self._platform, self._device_index = platform, device_index
        self._thread = threading.local()  # a rebuilt worker sets its device again
        self._run("set_device", self._take_device)
        self._run("__init__", lambda: self._build(worker_cls, kwargs))

    def _take_device(self) -> None:
        if self._device_index is None or self._platform is None:
            return
        self._ensure_device()
        if self._platform.resource_key != "GPU":
            return
        import torch
        from ray.experimental.channel import ChannelContext
        from ray.experimental.channel.accelerator_context import AcceleratorContext

        # Ray's channels read and write inside a device context of their own choosing
        # (the position of ray.get_gpu_ids()[0] in the visibility list); layout.py
        # picks local_rank by the same rule. Check it, and point them at ours.
        context = AcceleratorContext.get()
        # (A gloo channel built in this process earlier replaced Ray's CUDA context.)
        ray_index = (context.get_accelerator_devices()[0].index
                     if context.module_name == self._platform.torch_device else None)
        if ray_index is not None and ray_index != self._device_index:
            raise RuntimeError(
                f"rank {self.rank}: local_rank {self._device_index} but Ray's channels would "
                f"use device {ray_index} ({self._platform.visibility_var}="
                f"{os.environ.get(self._platform.visibility_var or '')}, ray.get_gpu_ids()="
                f"{ray.get_gpu_ids()}); leave {self._platform.visibility_var} to rayexec "
                f"(manage_visibility=True) or report this as a bug")
        ChannelContext.get_current().set_torch_device(
            torch.device(self._platform.torch_device, self._device_index))

    def _ensure_device(self) -> None:
        """Make this rank's device current on the calling thread, once per thread."""
        index = self._device_index
        if index is None or getattr(self._thread, "device", None) == index:
            return
        assert self._platform is not None
        self._platform.set_device(index)
        self._thread.device = index
        logger.debug("rank %s: device %d set on thread %s", self.rank, index,
                     threading.current_thread().name)

    def device_report(self) -> dict[str, Any]:
        """This rank's device facts: what rayexec set, what the calling thread and
        Ray's channels use (for tests and `rayexec doctor`)."""
        self._ensure_device()
        report: dict[str, Any] = {
            "rank": self.rank, "device_index": self._device_index,
            "thread": threading.current_thread().name,
            "current": self._platform.current_device() if self._platform else None,
            "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        }
        if self._device_index is not None and self._platform is not None and \
                self._platform.resource_key == "GPU":
            from ray.experimental.channel import ChannelContext

            report["channel_device"] = str(ChannelContext.get_current().torch_device)
        return report

    def probe_module(self, name: str) -> str | None:
        """None when `name` imports in this worker, else the error (e.g. cupy, which
        Ray's NCCL channels need on every worker, not on the driver)."""
        try:
            importlib.import_module(name)
        except Exception as e:  # an ImportError, or a broken install raising anything
            return f"{type(e).__name__}: {e}"
        return None

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
        self._ensure_device()
        if isinstance(method, bytes):
            fn = cloudpickle.loads(method)
            name = getattr(fn, "__name__", "<callable>")
            return self._run(name, lambda: fn(self.worker, *args, **kwargs))
        return self._run(method, lambda: getattr(self.worker, method)(*args, **kwargs))

    def execute_framed(self, method: str | bytes, parts: tuple[bytes, list[Any], list[Any]]
                       ) -> Any:
        """execute_method with the arguments `wire.pack_call` split (WorkerGroup.run_async
        sends large host tensors this way); the tensors are read-only views of Ray's
        object store (see wire.unpack_call)."""
        args, kwargs = wire.unpack_call(parts)
        return self.execute_method(method, *args, **kwargs)

    def run_step(self, message: Any, edge: str = "rpc") -> Any:
        """The forward step: unpack, call execute_model, pack for the next stage.

        Stage 0 receives the driver's `(step, batch)`; later stages the previous
        stage's `(step, batch, intermediate)`. The last stage returns the worker's
        output; the others pass `(step, batch, output)` on. A `Park` batch never
        reaches the engine's worker (see park.py). `edge` says how messages travel:
          "frames"     compiled graph, CPU: every message is one `wire` frame;
          "transport"  compiled graph, tensors over the edge's tensor transport (Ray
                       delivers them on this rank's device);
          "rpc"        plain Ray calls: CUDA tensors come back on the sender's device
                       index, so they are moved onto this rank's device.
        """
        self._ensure_device()
        message = wire.unpack(message)
        if self.is_first_stage:
            step, batch = message
            intermediate = None
        else:
            step, batch, intermediate = message
            if edge == "rpc" and self._device_index is not None and intermediate is not None:
                intermediate = self._on_own_device(intermediate)
        if isinstance(batch, Park):
            if batch.blocks(self.pp_rank, self.pipeline_parallel_size):
                self.gate.wait(batch.park_id)
            out = None
        else:
            self.step_started, self.step_since = step, time.time()
            try:  # as _run does, without a closure per step
                out = self.worker.execute_model(batch, intermediate)
            except Exception as e:
                raise self._worker_error("execute_model", e) from None
            finally:
                self.step_finished = step
        result = out if self.is_last_stage else (step, batch, out)
        # reuse: Ray's channel write copies the frame and drops it before our next step.
        return wire.pack(result, reuse=True, channel=True) if edge == "frames" else result

    def _on_own_device(self, intermediate: Any) -> Any:
        import torch

        assert self._platform is not None and self._device_index is not None
        return to_device(intermediate, torch.device(self._platform.torch_device,
                                                    self._device_index))

    def _run(self, method: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as e:
            raise self._worker_error(method, e) from None

    def _worker_error(self, method: str, e: Exception) -> WorkerError:
        """The WorkerError for `e`, raised by `method`; call it while handling `e`."""
        tb = traceback.format_exc()
        logger.error("rank %s (%s): %s() raised\n%s", self.rank, self.get_node_ip(), method, tb)
        return WorkerError(self.rank, self.get_node_ip(), method, type(e).__name__, str(e), tb)

    # ---- observable while busy --------------------------------------------------------
    @ray.method(concurrency_group="control")
    def ping(self) -> int | None:
        # No engine code runs on the control threads; the device is set on them
        # anyway, so that nothing a library starts there lands on device 0.
        self._ensure_device()
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
