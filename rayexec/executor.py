"""RayDistributedExecutor: placement + worker group + forward steps + health.

    with RayDistributedExecutor(ExecutorConfig(worker_cls=MyWorker, ...)) as ex:
        ex.collective_rpc("some_method")          # on every rank, results in rank order
        out = ex.execute_model(batch)              # one step through the PP x TP DAG

Start-up: import the worker class on the driver (clear error if it cannot be),
join or start Ray, resolve the device kind and the stage transport, acquire the
placement group, start the WorkerGroup (ranks, environments, init_worker), call
init_device / load_model where the class defines them, start the death monitor.
Any failure on the way shuts down what was started and re-raises.

Steps go through the compiled DAG (forward="dag", compiled on first use or by
warmup()) or through chained plain Ray calls (forward="rpc"); both return the last
stage's first TP rank's output, and non-blocking steps resolve in submission order.

Locks, always taken in this order and never the other way round:
  1. lifecycle lock (`_lifecycle_lock`, RLock): held by a restart for the whole
     replacement. shutdown() waits for it only briefly (SHUTDOWN_RESTART_WAIT_S):
     a restart stuck in a Ray call must not hold shutdown past its bound; the
     restart notices the closing at its next step (closed flag; the group refuses
     new actors) and everything it made is released.
  2. steps lock (`_parts.steps.lock`, RLock): held while a step is submitted to or
     fetched from the graph, while the DAG is built, parked or woken, and by a
     restart while it tears the old DAG down and replaces actors.
  3. state lock (`_parts.state_lock`, Lock): `_closed`, `_dead`, `_generation`,
     the park state and the monitor/timer handles. Never held across a Ray call.
  4. leaf locks: StepQueue's deque lock, WorkerGroup's list lock.
`_serving` (an Event) is not a lock: it is waited on with a bound and never with a
lock held. Shutdown takes no lock but the state lock (and 1, briefly), so it never
waits behind a step being fetched: it tears the DAG down (bounded), kills the
actors, which ends any fetch, then fails the steps still pending.

Bounds: each start-up phase init_timeout_s; a step execute_timeout_s; waiting
for an automatic restart init_timeout_s + RESTART_MARGIN_S; shutdown() about
SHUTDOWN_TIMEOUT_S in all, with a worker hung in a step, frozen or dead.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray
from ray.exceptions import (
    GetTimeoutError,
    RayActorError,
    RayChannelError,
    RayChannelTimeoutError,
    RayTaskError,
)

from rayexec import host_memory
from rayexec.config import ExecutorConfig
from rayexec.contract import load_worker_cls
from rayexec.dag import ForwardDag, check_compiled_graphs, resolve_transport
from rayexec.errors import (
    ExecutorClosedError,
    ExecutorTimeoutError,
    WorkerDiedError,
)
from rayexec.futures import StepQueue
from rayexec.group import Method, WorkerGroup, method_name, unpicklable_error
from rayexec.layout import RankPlan
from rayexec.monitor import DeathMonitor
from rayexec.park import IdleTimer, Park
from rayexec.placement import ensure_ray
from rayexec.platform import Platform, resolve_platform
from rayexec.weights import serving
from rayexec.weights.sync import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_SYNC_TIMEOUT_S,
    SyncReport,
    WeightState,
)

logger = logging.getLogger(__name__)

FailureCallback = Callable[[WorkerDiedError], None]
DAG_TEARDOWN_TIMEOUT_S = 5.0
PROGRESS_TIMEOUT_S = 2.0
# shutdown(): the whole bound and its parts (they add up to under the whole).
SHUTDOWN_TIMEOUT_S = 15.0
SHUTDOWN_RESTART_WAIT_S = 1.0  # for a running restart to reach a checkpoint
SHUTDOWN_WAKE_S = 1.5  # parked workers' park steps read back
SHUTDOWN_TEARDOWN_S = 4.0  # the compiled graph's teardown before the actors are killed
SHUTDOWN_KILL_S = 6.0  # killing the actors and removing the placement group
# A restart replaces actors (Ray starts processes) and runs each phase within
# init_timeout_s; callers waiting for an automatic restart wait this much more.
RESTART_MARGIN_S = 120.0
RESTART_ATTEMPTS = 3  # automatic restarts in a row when workers die during one


class _Parts:
    """What shutdown must release; kept apart from the executor so that
    weakref.finalize can release it without holding the executor alive."""

    def __init__(self) -> None:
        self.group: WorkerGroup | None = None
        self.dag: ForwardDag | None = None
        self.monitor: DeathMonitor | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.idle_timer: IdleTimer | None = None
        self.restart_thread: threading.Thread | None = None
        self.parked = 0  # the park id the workers sleep in (park.py); 0: not parked
        self.park_refs: list[Any] = []  # the park steps' outputs, unread
        self.steps = StepQueue()
        self.state_lock = threading.Lock()  # lock 3 of the executor module docstring
        self.closed = False

    def wake(self, timeout_s: float) -> None:
        """End the workers' park, if any, and read the park steps' outputs (so that
        Ray never waits for them on its own). A worker that died meanwhile makes the
        read fail fast; that death is reported by the monitor and the next step."""
        with self.state_lock:  # taken over here, so two wakes never read one ref
            parked, refs = self.parked, self.park_refs
            self.parked, self.park_refs = 0, []
        if not parked:
            return
        if self.group is not None:
            for rank, actor in enumerate(self.group.actors):
                try:
                    actor.wake.remote(parked)
                except Exception as e:
                    logger.warning("rank %d: waking it from park %d failed: %r", rank, parked, e)
        deadline = time.monotonic() + timeout_s
        for ref in refs:
            try:
                ref.get(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as e:  # a dead or frozen worker; reported elsewhere
                logger.warning("reading a park step's output (park %d): %r", parked, e)

    def release(self) -> None:
        """Stop timers -> wake (bounded) -> tear down the DAG (bounded) -> kill the
        actors and remove our placement group (bounded) -> fail and forget the steps.
        Takes no steps lock: a thread blocked fetching a step must not hold this
        up; killing the actors ends its fetch."""
        with self.state_lock:
            self.closed = True
            monitor, timer, dag = self.monitor, self.idle_timer, self.dag
            self.dag = None
        if timer is not None:
            timer.stop()
        if monitor is not None:
            monitor.stop()
        self.wake(SHUTDOWN_WAKE_S)  # parked workers would hold the teardown
        if dag is not None:
            dag.teardown(SHUTDOWN_TEARDOWN_S)
        if self.group is not None:
            # Kills the actors, which also frees a stuck teardown and ends fetches.
            self.group.shutdown(SHUTDOWN_KILL_S)
        if dag is not None:
            dag.kill_proxy()
        self.steps.fail_all(ExecutorClosedError("the executor was shut down"))
        self.steps.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


class RayDistributedExecutor:
    """Runs an engine's workers on Ray, PP stages x TP workers."""

    def __init__(self, config: ExecutorConfig, platform: Platform | None = None) -> None:
        """`platform` replaces the one `config.device` resolves to (a device kind
        rayexec does not ship, or the recording double the tests use on fake GPUs)."""
        if not isinstance(config, ExecutorConfig):
            raise TypeError(f"expected an ExecutorConfig, got {type(config).__name__}")
        self.config = config
        self._parts = _Parts()
        self._finalizer = weakref.finalize(self, self._parts.release)
        self._step_id = 0
        self._park_id = 0
        self._last_busy = time.monotonic()  # when the idle timer last saw a step
        self._callbacks: list[FailureCallback] = []
        self._dead: dict[int, str] = {}  # rank -> node IP
        self._state_lock = self._parts.state_lock  # lock 3 (module docstring)
        # Lock 1: held while workers are being replaced.
        self._lifecycle_lock = threading.RLock()
        # Cleared from the moment a death is seen (with restart_on_failure) until the
        # replacement is done: calls wait on it instead of failing in between.
        self._serving = threading.Event()
        self._serving.set()
        self._generation = 0  # bumped per restart: stale death reports are ignored
        self._weights = WeightState()  # version served, sleep; lock order: weights/serving.py
        self.platform: Platform | None = platform
        self.transport: str | None = None
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up -------------------------------------------------------------------------
    def _start(self) -> None:
        c = self.config
        self.worker_cls = load_worker_cls(c.worker_cls, c.worker_kwargs)
        if c.forward == "dag":
            check_compiled_graphs()
        how = ensure_ray(c)
        # Registered after Ray's own atexit hook, so it runs first: an executor left
        # open at exit is shut down while Ray still works.
        atexit.register(self._finalizer)
        resources = ray.cluster_resources()
        if self.platform is None:
            self.platform = resolve_platform(c.device, resources,
                                             c.device == "auto" and _torch_is_hip(resources))
        if c.overlap_comm and c.tensor_parallel_size > 1:
            _warn_overlap_with_tp()
        group = WorkerGroup.launch(c, self.platform)
        self._parts.group = group
        if c.forward == "dag":
            self.transport = self._resolve_transport(group)
        logger.info("Ray: %s; device %s; forward %s%s", how, self.platform.name, c.forward,
                    f" over {self.transport}" if self.transport else "")
        self._init_phases()
        self._start_monitor()

    def _init_phases(self) -> None:
        for phase in ("init_device", "load_model"):
            if callable(getattr(self.worker_cls, phase, None)):
                self._group.run_phase(phase)

    @property
    def _closed(self) -> bool:
        return self._parts.closed

    def _resolve_transport(self, group: WorkerGroup) -> str:
        c = self.config
        # NCCL needs a whole GPU per rank: workers sharing a GPU use shm.
        whole_gpus = self.platform is not None and self.platform.resource_key == "GPU" \
            and c.num_devices_per_worker >= 1
        no_cupy: dict[int, str] = {}
        if c.channel in ("auto", "nccl") and whole_gpus and c.manage_visibility:
            # cupy drives Ray's NCCL channels inside the workers: ask them, not the driver.
            refs = [a.probe_module.remote("cupy") for a in group.actors]
            errors = group._wait(refs, c.init_timeout_s, "checking cupy on the workers",
                                 "init_timeout_s")
            no_cupy = {rank: e for rank, e in enumerate(errors) if e is not None}
        return resolve_transport(c.channel, whole_gpus, c.manage_visibility, no_cupy)

    def _start_monitor(self) -> None:
        # A weak method: the monitor thread must not keep the executor alive, or
        # weakref.finalize could never run.
        on_death = weakref.WeakMethod(self._on_death)
        with self._state_lock:
            generation = self._generation
        monitor = DeathMonitor(
            self._group.actors,
            lambda ranks, errors: (on_death() or _ignore)(ranks, errors, generation),
        )
        with self._state_lock:  # shutdown stops what it finds here; after it, nothing starts
            if self._parts.closed:
                raise ExecutorClosedError("the executor was shut down during a restart")
            self._parts.monitor = monitor
            monitor.start()

    def warmup(self) -> None:
        """Compile the forward DAG now rather than on the first step."""
        self._check_usable()
        if self.config.forward == "dag":
            with self._parts.steps.lock:
                self._ensure_dag()

    def _ensure_dag(self) -> ForwardDag:
        """The DAG, compiled if needed. Called with the steps lock held."""
        dag = self._parts.dag
        if dag is not None:
            return dag
        grid = self._group.topology.grid(self._group.actors)
        # CPU edges carry wire frames (bytes: Ray's cheapest channel path); tensors on
        # accelerators, and the gloo channel's, keep the edge's tensor transport.
        frames = self.transport == "shm" and not self.platform.is_accelerator
        if frames:  # each step's output is a fresh host buffer in this process
            host_memory.keep_freed_memory()
        dag = ForwardDag(grid, self._edge_transport(), self.config.overlap_comm,
                         submit_timeout_s=self.config.execute_timeout_s, frames=frames,
                         buffer_size_bytes=self.config.max_step_bytes,
                         ready_timeout_s=self.config.init_timeout_s)
        with self._state_lock:
            closed = self._parts.closed
            if not closed:
                self._parts.dag = dag
                timer = self._parts.idle_timer
                if self.config.idle_park_s is not None and (timer is None
                                                            or not timer.is_alive()):
                    park_if_idle = weakref.WeakMethod(self._park_if_idle)
                    self._parts.idle_timer = IdleTimer(lambda: (park_if_idle() or _none)())
                    self._parts.idle_timer.start()
        if closed:  # shutdown ran while this graph compiled: it never saw it
            dag.teardown(SHUTDOWN_TEARDOWN_S)
            dag.kill_proxy()
            raise ExecutorClosedError("the executor was shut down while the DAG compiled")
        return dag

    def _edge_transport(self) -> Any:
        """What the DAG's edges take: the transport's name, or for gloo a
        communicator over this graph's workers (a fresh rendezvous port per graph)."""
        if self.transport != "gloo":
            return self.transport
        from rayexec.gloo import GlooCommunicator

        group = self._group
        (port,) = group._wait([group.actors[0].find_free_port.remote()],
                              self.config.health_check_timeout_s,
                              "finding a port for the gloo channel on rank 0",
                              "health_check_timeout_s")
        return GlooCommunicator(group.actors, [p.node_ip for p in group.plans], port,
                                self.config.execute_timeout_s)

    # ---- public facts -----------------------------------------------------------------
    @property
    def _group(self) -> WorkerGroup:
        assert self._parts.group is not None, "executor not started"
        return self._parts.group

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def layout(self) -> list[RankPlan]:
        """One RankPlan per rank: node, devices, pp/tp rank, environment."""
        return list(self._group.plans)

    @property
    def pp_tp_workers(self) -> list[list[Any]]:
        """The worker actors as grid[pp_rank][tp_rank]."""
        return self._group.topology.grid(self._group.actors)

    @property
    def workers(self) -> list[Any]:
        """The worker actors in rank order."""
        return list(self._group.actors)

    @property
    def placement_group(self) -> Any:
        return self._group.placement.group

    # ---- collective_rpc -------------------------------------------------------------------
    def collective_rpc(
        self,
        method: Method,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
        non_block: bool = False,
        ranks: Sequence[int] | None = None,
    ) -> list[Any] | Future:
        """Call `method` (a worker method name, or a callable taking the worker first)
        on every rank (or `ranks`); results in rank order."""
        self._wait_until_serving()
        if isinstance(method, str):
            self._check_method(method)
        elif not callable(method):
            raise TypeError(f"method must be a name or a callable, got {type(method).__name__}")
        ranks = self._check_ranks(ranks)
        timeout = self.config.rpc_timeout_s if timeout is None else timeout
        group = self._group
        # Submit now, in the caller's thread, so calls keep the caller's order on
        # each actor; only the waiting happens elsewhere when non_block.
        refs = group.run_async(method, args, kwargs, ranks)
        name = method_name(method)
        wait = lambda: group._wait(refs, timeout, f"collective_rpc({name!r})",  # noqa: E731
                                   "collective_rpc(timeout=) / rpc_timeout_s", labels=ranks)
        if not non_block:
            return wait()
        with self._state_lock:  # two first non-blocking calls must not make two pools
            self._check_open()
            if self._parts.pool is None:
                self._parts.pool = ThreadPoolExecutor(max_workers=4,
                                                      thread_name_prefix="rayexec-rpc")
            return self._parts.pool.submit(wait)

    def _check_method(self, name: str) -> None:
        cls = self.worker_cls
        # A class that forwards attributes (e.g. vLLM's WorkerWrapperBase) cannot be
        # checked on the driver; its workers report a missing method as WorkerError.
        if hasattr(cls, "__getattr__") or callable(getattr(cls, name, None)):
            return
        public = sorted(n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n)))
        raise AttributeError(
            f"worker class {cls.__module__}.{cls.__qualname__} has no method {name!r}; "
            f"its methods are {public}"
        )

    def _check_ranks(self, ranks: Sequence[int] | None) -> list[int]:
        if ranks is None:
            return list(range(self.world_size))
        ranks = list(ranks)
        bad = [r for r in ranks if not isinstance(r, int) or not 0 <= r < self.world_size]
        if bad or not ranks:
            raise ValueError(f"ranks={ranks} is invalid: expected a non-empty list of ranks in "
                             f"0..{self.world_size - 1}")
        return ranks

    # ---- forward steps ---------------------------------------------------------------------
    def execute_model(self, batch: Any, non_block: bool = False) -> Any:
        """One forward step; the output of the last stage's tp_rank 0 (or a future of it).

        Up to PP non-blocking steps may be in flight; their futures resolve in
        submission order (see futures.py)."""
        self._check_usable()
        steps = self._parts.steps
        with steps.lock:
            self._check_open()  # a shutdown or restart may have run while we waited
            self._weights.check_servable()  # not between a failed sync and its verdict
            self._step_id += 1
            step = self._step_id
            self._last_busy = time.monotonic()
            try:
                fetch = (self._submit_dag(step, batch) if self.config.forward == "dag"
                         else self._submit_rpc(step, batch))
            except TypeError as e:
                clear = unpicklable_error(e, "execute_model(batch)")
                if clear is None:
                    raise
                raise clear from None
            if not non_block and steps.empty():
                # Nothing unread before it: fetched here, as fetch_through would (under
                # the steps lock, in this thread), without a future nobody else sees.
                return fetch()
            future = steps.submit(fetch)
        return future if non_block else future.result()

    def _submit_dag(self, step: int, batch: Any) -> Callable[[], Any]:
        """Send one step into the graph; returns what fetches its output."""
        if self._parts.parked:  # set and cleared under the steps lock, which we hold
            self._parts.wake(self.config.execute_timeout_s)
        try:
            dag = self._ensure_dag()
            refs = dag.execute(step, batch)
        except RayChannelTimeoutError:  # stage 0 never took the input
            raise self._step_timeout(step) from None
        except RayChannelError as e:  # torn down by Ray after a death
            raise self._died(e) from None
        return lambda: dag.output(self._fetch_dag(refs, step))

    def _park_if_idle(self) -> float | None:
        """Park the DAG's workers when no step ran for idle_park_s (park.py); returns
        the seconds until it is worth asking again, None once the executor is closed."""
        idle_s = self.config.idle_park_s
        steps = self._parts.steps
        if self._closed or idle_s is None:
            return None
        if not steps.lock.acquire(blocking=False):  # a step is being sent or fetched
            self._last_busy = time.monotonic()
            return idle_s
        try:
            dag = self._parts.dag
            if (dag is None or self._parts.parked or self._dead
                    or self._closed or not self._serving.is_set()):
                self._last_busy = time.monotonic()
                return idle_s
            wait = self._last_busy + idle_s - time.monotonic()
            if wait > 0:
                return wait
            if len(steps):
                # Steps submitted idle_park_s ago and never read: vLLM's in-process
                # engine leaves its last (empty) PP batch unread until its next
                # request. Once every rank finished them, read them here (their
                # futures keep the results, in order) so the workers can park.
                if not self._unread_steps_finished():
                    return idle_s
                steps.fetch_all()
                if self._dead or self._closed:
                    return idle_s
            self._park_id += 1
            refs: list[Any] = []
            try:
                for index in range(self.config.pipeline_parallel_size):
                    refs.extend(dag.execute(self._step_id, Park(self._park_id, index)))
            except (RayChannelError, RayChannelTimeoutError) as e:
                # A worker died and Ray closed the graph; the death is reported by
                # the monitor, and a restart builds a new graph (and parks it).
                logger.warning("not parking the idle workers (park %d): %r", self._park_id, e)
                self._last_busy = time.monotonic()
            if refs:  # also a partial park: woken and read as usual
                with self._state_lock:
                    self._parts.park_refs.extend(refs)
                    self._parts.parked = self._park_id
                logger.debug("idle for %gs: parked the workers (park %d)", idle_s,
                             self._park_id)
            return idle_s
        finally:
            steps.lock.release()

    def _unread_steps_finished(self) -> bool:
        """Whether every rank finished the last submitted step (then reading the
        steps not read yet does not wait for a worker)."""
        progress = self._group.progress(PROGRESS_TIMEOUT_S)
        return all(isinstance(p, tuple) and p[1] >= self._step_id for p in progress)

    def _submit_rpc(self, step: int, batch: Any) -> Callable[[], Any]:
        """Chain one step's plain Ray calls; returns what fetches its output."""
        grid = self.pp_tp_workers
        refs = [w.run_step.remote((step, batch)) for w in grid[0]]
        for stage in grid[1:]:
            refs = [w.run_step.remote(r) for w, r in zip(stage, refs)]
        return lambda: self._fetch_rpc(refs, step)

    def _fetch_dag(self, refs: list[Any], step: int) -> Any:
        deadline = time.monotonic() + self.config.execute_timeout_s
        try:
            outs = [ref.get(timeout=max(0.0, deadline - time.monotonic())) for ref in refs]
        except RayTaskError as e:
            raise self._task_error(e) from None
        except RayActorError as e:
            raise self._died(e) from None
        except RayChannelTimeoutError:
            raise self._step_timeout(step) from None
        except RayChannelError as e:  # the graph was torn down: a worker died
            raise self._died(e) from None
        self._last_busy = time.monotonic()
        return outs[0]

    def _fetch_rpc(self, refs: list[ray.ObjectRef], step: int) -> Any:
        try:
            outs = ray.get(refs, timeout=self.config.execute_timeout_s)
        except GetTimeoutError:
            raise self._step_timeout(step) from None
        except RayTaskError as e:
            raise self._task_error(e) from None
        except RayActorError as e:
            raise self._died(e) from None
        return outs[0]

    def _task_error(self, e: RayTaskError) -> BaseException:
        if isinstance(e.cause, RayActorError):
            return self._died(e.cause)
        return self._group.task_error(e, None)

    def _died(self, e: BaseException) -> WorkerDiedError:
        err = self._group.died_error(e)
        with self._state_lock:
            self._dead.update(zip(err.ranks, err.nodes))
            known = dict(self._dead)
        if err.ranks:
            return err
        if not known:
            # Ray tore the graph down ("Channel closed", no actor named) before the
            # death monitor heard of the death: ask the workers which ones are gone.
            dead, _ = self._group.ping(PROGRESS_TIMEOUT_S)
            with self._state_lock:
                self._dead.update((rank, self._group.node_ip(rank)) for rank in dead)
                known = dict(self._dead)
        return WorkerDiedError(list(known), list(known.values()), err.detail) if known else err

    def _ranks_mid_step(self) -> set[int]:
        """Ranks that started a step and have not finished it (or do not answer)."""
        progress = self._group.progress(PROGRESS_TIMEOUT_S)
        return {rank for rank, p in enumerate(progress)
                if p is None or (p != "dead" and p[0] > p[1])}

    def _step_timeout(self, step: int) -> ExecutorTimeoutError:
        """Which ranks have not finished `step`, asked outside the stuck DAG."""
        late, detail = [], []
        for rank, p in enumerate(self._group.progress(PROGRESS_TIMEOUT_S)):
            if p is None or p == "dead":
                late.append(rank)
                detail.append(f"rank {rank} {'died' if p else 'did not report progress'}")
            elif p[1] < step:
                late.append(rank)
                if p[0] >= step:
                    detail.append(f"rank {rank} has been in step {p[0]} for "
                                  f"{time.time() - p[2]:.1f}s")
        stages = sorted({self._group.topology.pp_rank(r) for r in late})
        return ExecutorTimeoutError(f"forward step {step}", late, self.config.execute_timeout_s,
                                    "ExecutorConfig.execute_timeout_s", stages=stages,
                                    detail="; ".join(detail))

    # ---- health -------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Ping every worker; WorkerDiedError naming dead ranks and nodes, or
        ExecutorTimeoutError naming ranks that did not answer in time."""
        self._check_open()
        timeout = self.config.health_check_timeout_s
        dead, silent = self._group.ping(timeout)
        with self._state_lock:
            dead = sorted(set(dead) | set(self._dead))
        if dead:
            raise WorkerDiedError(dead, [self._group.node_ip(r) for r in dead], "health check")
        if silent:
            raise ExecutorTimeoutError("health check ping", silent, timeout,
                                       "ExecutorConfig.health_check_timeout_s")

    def register_failure_callback(self, callback: FailureCallback) -> None:
        """`callback(error: WorkerDiedError)` runs (in the monitor thread) when a worker
        dies; at once if one already has."""
        self._callbacks.append(callback)
        with self._state_lock:
            dead = dict(self._dead)
        if dead:
            callback(WorkerDiedError(list(dead), list(dead.values()), "died earlier"))

    def _on_death(self, ranks: list[int], errors: list[BaseException], generation: int) -> None:
        group = self._group
        with self._state_lock:
            if generation != self._generation or self._parts.closed:
                return  # a worker we replaced or killed on purpose
            if self.config.restart_on_failure:
                self._serving.clear()
            for rank in ranks:
                self._dead[rank] = group.node_ip(rank)
        detail = str(errors[0]).splitlines()[0] if errors and str(errors[0]) else "actor died"
        error = WorkerDiedError(ranks, [group.node_ip(r) for r in ranks], detail)
        failed = self._parts.steps.fail_all(error)
        logger.error("%s (%d in-flight step(s) failed)", error, failed)
        for callback in list(self._callbacks):
            try:
                callback(error)
            except Exception:
                logger.exception("failure callback %r raised", callback)
        if self.config.restart_on_failure:
            thread = threading.Thread(target=self._restart_quietly, name="rayexec-restart",
                                      daemon=True)
            with self._state_lock:  # shutdown joins what it finds here
                if self._parts.closed:
                    self._serving.set()
                    return
                self._parts.restart_thread = thread
                thread.start()

    def _restart_quietly(self) -> None:
        try:
            for attempt in range(1, RESTART_ATTEMPTS + 1):
                try:
                    self.restart_failed_workers()
                    return
                except WorkerDiedError as e:
                    # Another worker died during the restart (found by fault schedules:
                    # a second SIGKILL while the first was being replaced): that is
                    # one more death to replace, not a reason to stop serving.
                    if attempt == RESTART_ATTEMPTS:
                        raise
                    logger.warning("automatic restart attempt %d of %d: %s; trying again",
                                   attempt, RESTART_ATTEMPTS, e)
        except ExecutorClosedError:
            logger.info("automatic restart stopped: the executor was shut down")
        except Exception:
            logger.exception("automatic restart (restart_on_failure=True) failed")
        finally:
            self._serving.set()

    def restart_failed_workers(self) -> list[int]:
        """Replace dead workers on their own bundles with their own ranks, rebuild every
        engine worker (init_worker, init_device, load_model) with a fresh rendezvous
        (so torch.distributed groups are rebuilt) and the compiled DAG. Steps in
        flight fail with WorkerDiedError. Returns the ranks whose actors were replaced
        (empty when every worker is alive). Each phase is bounded by init_timeout_s;
        a shutdown() meanwhile ends it with ExecutorClosedError."""
        self._check_open()
        with self._lifecycle_lock:
            self._check_open()
            dead, _ = self._group.ping(self.config.health_check_timeout_s)
            with self._state_lock:
                dead = sorted(set(dead) | set(self._dead))
                if not dead:
                    # The generation stays: the running monitor's death reports must
                    # still count (found by fault schedule seed 2: a restart with
                    # nothing dead made every later death look stale, unreported).
                    return []
                self._generation += 1  # from here on, deaths are ours
                monitor, self._parts.monitor = self._parts.monitor, None
            logger.warning("replacing the workers of rank(s) %s", dead)
            if monitor is not None:
                monitor.stop()
            steps = self._parts.steps
            # Fail the steps first: a thread fetching one under the steps lock then
            # returns (its fetch fails fast on the dead rank, or at execute_timeout_s).
            steps.fail_all(WorkerDiedError(dead, [self._group.node_ip(r) for r in dead],
                                           "replaced by restart_failed_workers()"))
            with steps.lock:  # no step, park or DAG build over actors being replaced
                self._check_open()
                steps.clear()
                self._parts.wake(DAG_TEARDOWN_TIMEOUT_S)  # parked survivors hold teardown
                replace, replace_all = set(dead), False
                with self._state_lock:
                    dag, self._parts.dag = self._parts.dag, None
                if dag is not None and not dag.teardown(DAG_TEARDOWN_TIMEOUT_S):
                    # Survivors caught mid-step (e.g. in a collective with the dead rank)
                    # block the teardown: replace them too, which releases it.
                    mid_step = self._ranks_mid_step() - replace
                    logger.warning("rank(s) %s were mid-step; replacing them too",
                                   sorted(mid_step))
                    replace |= mid_step
                    self._group.kill_ranks(sorted(mid_step))
                    replace_all = not dag.teardown(DAG_TEARDOWN_TIMEOUT_S)
                if dag is not None:
                    dag.kill_proxy()
                self._check_open()
                replaced = self._group.restart(sorted(replace), replace_all=replace_all)
                self._check_open()
                self._init_phases()
                self._weights.workers_rebuilt()  # synced weights are gone: refuse until a sync
                with self._state_lock:
                    self._dead.clear()
                self._start_monitor()
            logger.warning("replaced rank(s) %s; the executor serves again", replaced)
            return replaced

    # ---- lifecycle ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._parts.closed:
            raise ExecutorClosedError(
                "this RayDistributedExecutor was shut down; create a new one to run more work"
            )

    def _restart_bound_s(self) -> float:
        return self.config.init_timeout_s + RESTART_MARGIN_S

    def _wait_until_serving(self) -> None:
        """Wait out a restart in progress (bounded), then raise if the executor is closed."""
        bound = self._restart_bound_s()
        setting = f"ExecutorConfig.init_timeout_s (plus {RESTART_MARGIN_S:g}s)"
        if not self._serving.wait(bound):  # an automatic restart
            raise ExecutorTimeoutError("waiting for the automatic restart "
                                       "(restart_on_failure=True)", [], bound, setting)
        self._check_open()
        if not self._lifecycle_lock.acquire(timeout=bound):  # a manual restart
            raise ExecutorTimeoutError("waiting for restart_failed_workers()", [], bound,
                                       setting)
        self._lifecycle_lock.release()
        self._check_open()

    def _check_usable(self) -> None:
        # The common case first, cheaply (every step comes through here): serving, and
        # no manual restart holding the lifecycle lock.
        if self._serving.is_set() and self._lifecycle_lock.acquire(blocking=False):
            self._lifecycle_lock.release()
            self._check_open()
        else:
            self._wait_until_serving()
        if self._dead:
            with self._state_lock:
                dead = dict(self._dead)
            if dead:
                raise WorkerDiedError(list(dead), list(dead.values()), "died earlier")

    def shutdown(self) -> None:
        """Tear down the DAG (bounded), kill the workers, remove a placement group we
        created and wait (bounded) until Ray reports it removed. Idempotent; safe
        after a partial start, during a restart, with a worker hung in a step,
        frozen (SIGSTOP) or dead; returns within about SHUTDOWN_TIMEOUT_S (15 s)."""
        start = time.monotonic()
        with self._state_lock:
            if self._parts.closed and not self._finalizer.alive:
                return
        # Give a running restart a moment to reach a checkpoint; it is safe without
        # (module docstring), so the wait is short.
        got = self._lifecycle_lock.acquire(timeout=SHUTDOWN_RESTART_WAIT_S)
        try:
            self._finalizer()  # _Parts.release: sets closed first
        finally:
            if got:
                self._lifecycle_lock.release()
        self._serving.set()  # wake calls waiting for a restart: they see the closing
        atexit.unregister(self._finalizer)
        thread = self._parts.restart_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, SHUTDOWN_TIMEOUT_S - (time.monotonic() - start)))
            if thread.is_alive():
                logger.warning("the automatic restart thread was still running %gs after "
                               "shutdown() began; everything it had started is released",
                               SHUTDOWN_TIMEOUT_S)

    # ---- weights (logic in rayexec/weights/serving.py) ----------------------------------------
    @property
    def weights_version(self) -> Any:
        """The version of the weights every rank serves (None: the seeded ones)."""
        return self._weights.version

    def update_weights(self, source: WorkerGroup | RayDistributedExecutor, *,
                       version: Any = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                       stage: bool = False, timeout: float | None = None,
                       via: str = "auto") -> SyncReport:
        """Move `source`'s weights into the ranks, actor to actor, resharded to this
        executor's layout, between steps. Concurrent calls run one after another.
        On failure raises WeightSyncError; without `stage` steps are then refused
        until a sync succeeds, with `stage` the old version keeps serving. `via`:
        "process_group", "object_store" or "auto" (rayexec/weights/sync.py)."""
        self._wait_until_serving()
        src = source._group if isinstance(source, RayDistributedExecutor) else source
        return serving.update(self._weights, self._parts.steps, self._group, src,
                              version=version, bucket_bytes=bucket_bytes, stage=stage,
                              timeout=timeout or self.config.rpc_timeout_s
                              or DEFAULT_SYNC_TIMEOUT_S, via=via)

    def sleep(self, level: int = 1) -> list[Any]:
        """Level 1 frees the workers' caches, level 2 caches and weights; steps are
        refused (ExecutorAsleepError) until wake_up()."""
        self._wait_until_serving()
        self._check_method("sleep")
        return serving.sleep(self._weights, self._parts.steps, self._group, level,
                             self.config.rpc_timeout_s or DEFAULT_SYNC_TIMEOUT_S)

    def wake_up(self) -> None:
        self._wait_until_serving()
        self._check_method("wake_up")
        serving.wake_up(self._weights, self._parts.steps, self._group,
                        self.config.rpc_timeout_s or DEFAULT_SYNC_TIMEOUT_S)

    def __enter__(self) -> RayDistributedExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


_overlap_warned = False


def _warn_overlap_with_tp() -> None:
    """Once per process: Ray's NCCL channel runs its sends and receives on side
    streams next to the engine's own TP communicator, and NCCL documents that two
    communicators used concurrently on different streams can deadlock (Ray's
    nccl_group.py says the same)."""
    global _overlap_warned
    if not _overlap_warned:
        _overlap_warned = True
        logger.warning(
            "overlap_comm=True with tensor_parallel_size > 1: Ray's stage-to-stage NCCL "
            "channel then runs on its own CUDA streams next to the engine's TP "
            "communicator, which NCCL documents can deadlock. Set overlap_comm=False if "
            "steps hang.")


def _torch_is_hip(resources: dict[str, float]) -> bool:
    if not resources.get("GPU"):
        return False
    try:
        import torch

        return torch.version.hip is not None
    except ImportError:
        return False


def _ignore(*_: Any) -> None:
    pass


def _none() -> None:
    return None
