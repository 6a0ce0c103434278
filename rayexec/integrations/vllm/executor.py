"""RayexecExecutor: vLLM's `Executor` interface over rayexec's RayDistributedExecutor.

What vLLM's engine calls, and what happens:
- `_init_executor`: build an ExecutorConfig from vLLM's parallel config (and any
  RAYEXEC_* variables), start rayexec (placement, rank order, environments,
  `VllmWorker` on every rank through init_worker -> init_device -> load_model) and
  compile the forward DAG so the first step does not pay for it.
- `collective_rpc(method, timeout, args, kwargs, non_block)`: rayexec's, on every
  rank; a callable receives vLLM's `WorkerWrapperBase`, as with vLLM's own backends.
- `execute_model` / `sample_tokens`: as vLLM's Ray backend does, `execute_model`
  only remembers the scheduler output and `sample_tokens` runs the whole step
  (forward on every stage, sampling on the last) through rayexec's compiled DAG.
  With `non_block=True` they return futures; with PP > 1 the engine keeps up to PP
  steps in flight and rayexec resolves them in submission order. Async scheduling
  (vLLM's default where the backend allows it: the engine schedules step N+1 while
  step N runs) is supported, since every worker runs steps in submission order.
- `check_health`, `register_failure_callback` (vLLM's callbacks take no argument;
  called once, from rayexec's death monitor, after the workers are released),
  `shutdown` (also stops a Ray that this executor started).

Worker environment: the driver's VLLM_*, HF_* and TORCHINDUCTOR_* variables are
copied (next to rayexec's own prefixes); on CPU the engine process's LD_PRELOAD
(vLLM's CPU platform preloads tcmalloc / libgomp there) is passed on, and rayexec
pins each worker to its cores with a matching thread count (`cpu_bind`,
`cpu_threads_per_worker`; vLLM's VLLM_CPU_OMP_THREADS_BIND=nobind turns pinning off)
and runs it at niceness 0 (Ray's default is 15), as vLLM's own workers run.

Not supported (refused at start with the reason): data parallelism, prefill or
decode context parallelism and KV-transfer connectors, which all need more than
the last stage's first worker's output or more ranks than PP x TP.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import ray
from vllm import envs as vllm_envs
from vllm.config import VllmConfig
from vllm.platforms import current_platform
from vllm.v1.executor.abstract import Executor

from rayexec import envs
from rayexec.config import ExecutorConfig
from rayexec.errors import ExecutorTimeoutError
from rayexec.executor import RayDistributedExecutor
from rayexec.integrations.vllm.cpu_env import VLLM_ENV_PREFIXES, merge_prefixes
from rayexec.integrations.vllm.worker import VllmWorker

logger = logging.getLogger(__name__)

SHUTDOWN_RPC_TIMEOUT_S = 2.0  # vLLM gives its engine process 5 s after SIGTERM
# After a worker death: how long the failure callback waits for the engine's
# threads to leave Ray before it stops Ray (it never stops Ray under them).
RAY_STOP_WAIT_S = 3.0


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def device_kind() -> str:
    """rayexec's device kind for vLLM's current platform."""
    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_rocm():
        return "rocm"
    if current_platform.is_cuda():
        return "cuda"
    return "auto"


def build_config(vllm_config: VllmConfig) -> ExecutorConfig:
    """The rayexec config for this engine: vLLM decides the layout and the worker;
    RAYEXEC_* variables may set everything else (channel, timeouts, placement)."""
    pc = vllm_config.parallel_config
    overrides: dict[str, Any] = {
        "worker_cls": VllmWorker,
        "pipeline_parallel_size": pc.pipeline_parallel_size,
        "tensor_parallel_size": pc.tensor_parallel_size,
        "device": device_kind(),
    }
    if pc.placement_group is not None:
        overrides["placement_group"] = pc.placement_group
    if needs_tensor_transport(vllm_config):
        overrides["enable_tensor_transport"] = True
    config = ExecutorConfig.from_env(**overrides)
    env_vars = dict(config.env_vars)
    preload = envs.driver_environ().get("LD_PRELOAD")
    if config.device == "cpu" and preload:
        # vLLM's CPU platform preloads tcmalloc / torch's libgomp in the engine
        # process; its multiprocessing workers inherit that, Ray's actors do not.
        env_vars.setdefault("LD_PRELOAD", preload)
    # "nobind" is vLLM's way of saying "do not pin CPU workers"; respect it.
    cpu_bind = config.cpu_bind and vllm_envs.VLLM_CPU_OMP_THREADS_BIND != "nobind"
    return config.replace(
        env_prefixes_to_copy=merge_prefixes(config.env_prefixes_to_copy, VLLM_ENV_PREFIXES),
        env_vars=env_vars,
        cpu_bind=cpu_bind,
        worker_kwargs={"vllm_config": vllm_config, "cpu_bind": cpu_bind},
    )


def needs_tensor_transport(vllm_config: VllmConfig) -> bool:
    """True when the workers must be actors with Ray's tensor transport: vLLM's
    sharded_rdt weight transfer pulls the trainer's slices through it (vLLM's own
    RayExecutorV2 creates its workers with it for the same reason)."""
    wt = vllm_config.weight_transfer_config
    if wt is None or wt.backend != "sharded_rdt":
        return False
    from vllm.distributed.weight_transfer.sharded_rdt_common import check_ray_rdt_version

    check_ray_rdt_version()  # vLLM's clear error for a Ray without Direct Transport
    return True


def check_supported(vllm_config: VllmConfig) -> None:
    """Refuse, with the reason and the alternative, what this backend cannot run."""
    pc = vllm_config.parallel_config
    problems = []
    if pc.world_size != pc.pipeline_parallel_size * pc.tensor_parallel_size:
        problems.append(f"world_size={pc.world_size} is more than PP x TP = "
                        f"{pc.pipeline_parallel_size} x {pc.tensor_parallel_size} (context "
                        f"parallelism)")
    if pc.data_parallel_size > 1:
        problems.append(f"data_parallel_size={pc.data_parallel_size}")
    if vllm_config.kv_transfer_config is not None or vllm_config.ec_transfer_config is not None:
        problems.append("a KV/EC transfer connector (it needs every worker's output)")
    if problems:
        raise NotImplementedError(
            "rayexec's vLLM backend runs PP x TP layouts only; not supported here: "
            + "; ".join(problems) + ". Use distributed_executor_backend='mp' for these."
        )


def _on_vllm_worker(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` re-targeted from rayexec's worker object (VllmWorker) to vLLM's
    WorkerWrapperBase, which is what vLLM's callables expect as their first argument."""

    def call(adapter: VllmWorker, *args: Any, **kwargs: Any) -> Any:
        return fn(adapter.wrapper, *args, **kwargs)

    call.__name__ = getattr(fn, "__name__", "callable")
    return call


def _as_timeout(error: ExecutorTimeoutError) -> TimeoutError:
    # vLLM documents TimeoutError for collective_rpc timeouts; keep rayexec's text.
    timeout = TimeoutError(str(error))
    timeout.__cause__ = error
    return timeout


class _RpcResult(Future):
    """A non-blocking collective_rpc result, with timeouts raised as TimeoutError."""

    def __init__(self, inner: Future) -> None:
        super().__init__()
        inner.add_done_callback(self._settle)

    def _settle(self, inner: Future) -> None:
        error = inner.exception()
        if error is None:
            self.set_result(inner.result())
        else:
            self.set_exception(_as_timeout(error) if isinstance(error, ExecutorTimeoutError)
                               else error)


class _StepResult(Future):
    """The output of one step. rayexec fetches steps lazily, in order, when a result
    is asked for; this future asks on `result()` and unpickles the worker's bytes."""

    def __init__(self, step: Future, in_ray: Callable[[], Any] = contextlib.nullcontext) -> None:
        super().__init__()
        self._step: Future | None = step
        self._in_ray = in_ray  # marks the engine's thread as inside a Ray call
        self._settling = threading.Lock()  # two threads asking settle it once

    def result(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.done() and self._settling.acquire(timeout=-1 if timeout is None else timeout):
            try:
                step = self._step
                if step is not None and not self.done():
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    try:
                        with self._in_ray():
                            packed = step.result(left)
                    except TimeoutError:
                        raise  # not settled: the step stays fetchable
                    except BaseException as e:
                        self.set_exception(e)
                    else:
                        self.set_result(pickle.loads(packed) if packed else None)
                    self._step = None
            finally:
                self._settling.release()
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return super().result(left)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except BaseException:
            pass
        return super().exception(timeout)


class RayexecExecutor(Executor):
    """vLLM executor backend running on rayexec (see the module docstring)."""

    # uses_ray=False keeps vLLM's own Ray set-up (and its CPU platform's refusal
    # of "ray") out of the way: rayexec does all of the Ray work.
    uses_ray = False
    supports_pp = True

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        """Yes: steps run in submission order on every worker, which is all vLLM's
        async scheduling needs (the engine schedules step N+1 while step N runs)."""
        return True

    def _init_executor(self) -> None:
        self._rayexec: RayDistributedExecutor | None = None
        self._closed = False
        self._scheduled = None  # a scheduler output waiting for sample_tokens()
        self._ray_calls = 0  # engine threads inside a Ray call (see _in_ray)
        self._ray_calls_done = threading.Condition()
        check_supported(self.vllm_config)
        # Ray started (or joined) here is shut down with the executor; a Ray the
        # caller had already initialised is left alone.
        self._owns_ray = not ray.is_initialized()
        # Pooling models produce their output in execute_model; nothing to sample.
        self._defer_to_sampling = self.model_config.runner_type != "pooling"
        config = build_config(self.vllm_config)
        try:
            self._rayexec = RayDistributedExecutor(config)
            self._rayexec.warmup()  # compile the DAG now: not on the first request
        except BaseException:
            self.shutdown()
            raise
        logger.info("rayexec backend ready: PP=%d x TP=%d on %s, forward=%s",
                    config.pipeline_parallel_size, config.tensor_parallel_size,
                    self._rayexec.platform.name if self._rayexec.platform else "?",
                    config.forward)
        # Like vLLM's multiprocessing backend: this process only schedules, and
        # multi-threaded torch ops here would compete with the workers for cores.
        from vllm.utils.torch_utils import set_torch_threads_for_runtime

        set_torch_threads_for_runtime()

    @property
    def rayexec(self) -> RayDistributedExecutor:
        """The underlying rayexec executor (layout, workers, health)."""
        if self._rayexec is None:
            raise RuntimeError("the rayexec backend is not started (or failed to start)")
        return self._rayexec

    # ---- calls on every worker -----------------------------------------------------
    def collective_rpc(  # type: ignore[override]
        self,
        method: str | Callable[..., Any],
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        non_block: bool = False,
    ) -> list[Any] | Future:
        if not isinstance(method, str):
            method = _on_vllm_worker(method)
        try:
            with self._in_ray():
                result = self.rayexec.collective_rpc(method, args=args, kwargs=kwargs,
                                                     timeout=timeout, non_block=non_block)
        except ExecutorTimeoutError as e:
            raise _as_timeout(e) from e
        return _RpcResult(result) if non_block else result

    # ---- the forward step ------------------------------------------------------------
    def execute_model(  # type: ignore[override]
        self, scheduler_output: Any, non_block: bool = False
    ) -> Any:
        if self._scheduled is not None:
            raise RuntimeError("vLLM called execute_model() twice without sample_tokens() in "
                               "between; the engine and executor disagree on the step protocol")
        if not self._defer_to_sampling or not scheduler_output.total_num_scheduled_tokens:
            # Nothing to sample: run now (workers still update their request state).
            return self._step(scheduler_output, None, non_block)
        self._scheduled = scheduler_output
        return _done(None) if non_block else None

    def sample_tokens(  # type: ignore[override]
        self, grammar_output: Any, non_block: bool = False
    ) -> Any:
        scheduler_output, self._scheduled = self._scheduled, None
        if scheduler_output is None:
            return _done(None) if non_block else None
        return self._step(scheduler_output, grammar_output, non_block)

    def _step(self, scheduler_output: Any, grammar_output: Any, non_block: bool) -> Any:
        # Pickled once here; Ray's channels move bytes cheaper than objects, and
        # later pipeline stages forward the same bytes instead of re-serializing.
        batch = pickle.dumps((scheduler_output, grammar_output), protocol=pickle.HIGHEST_PROTOCOL)
        with self._in_ray():
            step = self.rayexec.execute_model(batch, non_block=True)
        result = _StepResult(step, self._in_ray)
        return result if non_block else result.result()

    # ---- health and failure ---------------------------------------------------------------
    def check_health(self) -> None:
        self.rayexec.check_health()

    def register_failure_callback(self, callback: Callable[[], None]) -> None:  # type: ignore[override]
        """vLLM's callback (no arguments) runs once, when rayexec first reports a
        dead worker (at once if one already died), after the workers are released."""
        reported = []

        def on_worker_death(error: BaseException) -> None:
            if reported:
                return
            reported.append(error)
            logger.error("vLLM engine loses its executor: %s", error)
            # As vLLM's mp backend does: release the workers before telling the
            # engine, whose process is terminated soon after it hears. Ray itself is
            # not stopped here: this runs in rayexec's death-monitor thread while the
            # engine thread may be inside a Ray call, and ray.shutdown() under it
            # breaks that call in Ray's own code. The engine's shutdown() (or Ray's
            # atexit hook, on SIGTERM) stops a Ray this executor started.
            self.shutdown(graceful=False, stop_ray=False)
            # The workers are gone now, so an engine call still inside Ray returns
            # (with an error) at once, and new ones raise before reaching Ray; once
            # none is inside, Ray can stop (vLLM may kill this process soon after
            # it hears, which would leave Ray's processes behind).
            self._stop_ray_when_no_call(RAY_STOP_WAIT_S)
            callback()

        self.rayexec.register_failure_callback(on_worker_death)

    # ---- shutdown -----------------------------------------------------------------------
    def shutdown(self, graceful: bool = True, stop_ray: bool = True) -> None:
        """Let vLLM's workers clean up (bounded; skipped when not `graceful`), stop
        rayexec, and stop Ray if this executor started it (unless not `stop_ray`).
        Idempotent: a later call still stops Ray when an earlier one did not."""
        if not hasattr(self, "_closed"):
            return  # _init_executor never ran
        if not self._closed:
            self._closed = True
            if self._rayexec is not None:
                if graceful:
                    self._shutdown_workers()
                self._rayexec.shutdown()
        if stop_ray and self._owns_ray and ray.is_initialized():
            ray.shutdown()

    @contextlib.contextmanager
    def _in_ray(self) -> Any:
        """Marks an engine thread as inside a Ray call (rayexec's executor)."""
        with self._ray_calls_done:
            self._ray_calls += 1
        try:
            yield
        finally:
            with self._ray_calls_done:
                self._ray_calls -= 1
                self._ray_calls_done.notify_all()

    def _stop_ray_when_no_call(self, timeout_s: float) -> None:
        """Stop a Ray this executor started once no engine thread is inside a Ray
        call (ray.shutdown under a running call breaks it inside Ray's own code);
        after `timeout_s` leave it to shutdown() or Ray's exit hook, with a warning."""
        if not (self._owns_ray and ray.is_initialized()):
            return
        with self._ray_calls_done:
            idle = self._ray_calls_done.wait_for(lambda: self._ray_calls == 0, timeout_s)
        if idle:
            ray.shutdown()
        else:
            logger.warning("an engine thread is still inside a Ray call %gs after the workers "
                           "were released (RAY_STOP_WAIT_S); Ray is stopped by shutdown() or "
                           "at exit instead", timeout_s)

    def _shutdown_workers(self) -> None:
        if self._rayexec is None:
            return
        try:  # vLLM's own clean-up in every worker (e.g. its process groups)
            self._rayexec.collective_rpc("shutdown", timeout=SHUTDOWN_RPC_TIMEOUT_S)
        except Exception as e:  # a dead or stuck worker: it is killed next anyway
            logger.debug("vLLM worker shutdown: %s", e)
