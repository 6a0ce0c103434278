"""WorkerGroup: one RankActor actor per bundle, in rank order, environment set,
engine workers built. The part of the executor that knows nothing about steps.

Start-up, in order:
  1. create one actor per chosen bundle (static environment in its runtime_env);
  2. ask each where it landed (node id, IP, device ids, CPUs);
  3. decide the rank order and every worker's environment (`layout.plan_ranks`),
     with MASTER_PORT found free on rank 0's node;
  4. send each worker its environment, then `init_worker` with its rank kwargs.
`run` / `run_async` call a method on all (or some) ranks; results come back in rank
order, worker exceptions as `WorkerError`, dead actors as `WorkerDiedError`.
`shutdown` kills the actors, waits for them to exit and removes a group we created.

Concurrency: `shutdown` may run while another thread is inside `restart` (the
executor's shutdown does not wait out a restart that is stuck in a Ray call).
`_lock` (a leaf lock, held only around list updates, never across a Ray call)
guards `_created` and `_closed`: an actor created after shutdown began is killed
at once and the restart fails with ExecutorClosedError, so nothing outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cloudpickle
import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayexec import envs, layout, wire
from rayexec.actor import (
    CONCURRENCY_GROUPS,
    RankActor,
    is_local_address,
)
from rayexec.cluster import driver_node_ip
from rayexec.config import ExecutorConfig
from rayexec.contract import import_worker_cls, load_worker_cls
from rayexec.diagnosis import cpu_oversubscription
from rayexec.errors import (
    ExecutorClosedError,
    ExecutorTimeoutError,
    PlacementError,
    WorkerDiedError,
    WorkerError,
)
from rayexec.placement import (
    Placement,
    acquire_placement,
    ensure_ray,
    remove_group,
)
from rayexec.platform import Platform, resolve_platform
from rayexec.resources import ResourceConfig

logger = logging.getLogger(__name__)

ActorHandle = Any
Method = str | Callable[..., Any]
RESET_TIMEOUT_S = 10.0
ACTOR_START_S = 60.0  # a worker process starting and importing torch on a busy node


def method_name(method: Method) -> str:
    return method if isinstance(method, str) else getattr(method, "__name__", "callable")


@contextlib.contextmanager
def unpicklable_is_clear(what: str) -> Iterator[None]:
    """Turn Ray's and cloudpickle's serialization failures into one clear TypeError."""
    try:
        yield
    except TypeError as e:
        clear = unpicklable_error(e, what)
        if clear is None:
            raise
        raise clear from None


def unpicklable_error(e: TypeError, what: str) -> TypeError | None:
    """One clear TypeError naming `what` and the fix when `e` is a serialization
    failure; None for any other TypeError."""
    if "serialize" not in str(e) and "pickle" not in str(e):
        return None
    first = str(e).strip().splitlines()[0]
    return TypeError(
        f"{what}: a value cannot be pickled to send to the workers ({first}). Pass "
        f"picklable values (plain data, tensors), or create the object inside the worker "
        f"(e.g. in a callable passed to collective_rpc)."
    )


_oversubscribed_warned: set[tuple[int, int]] = set()


def _warn_oversubscribed(workers: int) -> None:
    """Once per process and count: a program that starts many executors of one
    layout (a benchmark, a test suite) hears it once."""
    cores = len(os.sched_getaffinity(0))
    message = cpu_oversubscription(workers, cores)
    if message and (workers, cores) not in _oversubscribed_warned:
        _oversubscribed_warned.add((workers, cores))
        logger.warning(message)


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


class WorkerGroup:
    """The worker actors of one executor (or one SPMD group), in rank order.

    Build one with `WorkerGroup.from_config(worker_cls, worker_kwargs, resources)`,
    `WorkerGroup.from_placement_group(...)` or `WorkerGroup.launch(config, platform)`;
    the constructor alone creates nothing.
    """

    @classmethod
    def from_config(
        cls, worker_cls: type | str, worker_kwargs: dict[str, Any] | None = None,
        resources: ResourceConfig | None = None, **options: Any,
    ) -> WorkerGroup:
        """An SPMD group: one worker per `resources` bundle (default: one CPU worker).
        `options` are further ExecutorConfig fields (env_vars, manage_visibility, ...)."""
        resources = resources or ResourceConfig()
        config = ExecutorConfig(
            worker_cls=worker_cls, worker_kwargs=worker_kwargs or {}, forward="rpc",
            tensor_parallel_size=resources.num_workers, **resources.executor_fields(), **options)
        return cls.launch(config)

    @classmethod
    def from_placement_group(
        cls, worker_cls: type | str, worker_kwargs: dict[str, Any] | None,
        placement_group: Any, bundle_indices: Sequence[int] | None = None, **options: Any,
    ) -> WorkerGroup:
        """An SPMD group on an existing placement group: one worker per chosen bundle
        (default: every bundle). The group is left in place at shutdown."""
        count = len(bundle_indices) if bundle_indices else len(placement_group.bundle_specs)
        config = ExecutorConfig(
            worker_cls=worker_cls, worker_kwargs=worker_kwargs or {}, forward="rpc",
            tensor_parallel_size=count, placement_group=placement_group,
            bundle_indices=None if bundle_indices is None else tuple(bundle_indices), **options)
        return cls.launch(config)

    @classmethod
    def launch(cls, config: ExecutorConfig, platform: Platform | None = None) -> WorkerGroup:
        """Join or start Ray, acquire the placement, start the workers. On failure
        nothing is left behind."""
        load_worker_cls(config.worker_cls, config.worker_kwargs)  # before anything starts
        if platform is None:
            ensure_ray(config)
            platform = resolve_platform(config.device, ray.cluster_resources())
        placement = acquire_placement(config, platform)
        try:
            group = cls(config, platform, placement)
        except BaseException:
            remove_group(placement)
            raise
        try:
            group.start()
        except BaseException:
            group.shutdown()
            raise
        return group

    def __init__(self, config: ExecutorConfig, platform: Platform, placement: Placement) -> None:
        self.config = config
        self.platform = platform
        self.placement = placement
        self.topology = layout.Topology(config.pipeline_parallel_size, config.tensor_parallel_size)
        # The class object, not its "pkg.module.Class" name, goes to the actors: a class
        # named "__main__.X" exists only in the driver's __main__, and cloudpickle sends
        # such a class by value (an importable one still goes by reference).
        self.worker_cls = import_worker_cls(config.worker_cls)
        self.actors: list[ActorHandle] = []  # rank order once started
        self.plans: list[layout.RankPlan] = []
        self._created: list[ActorHandle] = []  # creation order, for cleanup
        self._lock = threading.Lock()  # guards _created and _closed (module docstring)
        self._closed = False
        self.actor_rank: dict[str, int] = {}  # actor id hex -> rank
        self.driver_ip = config.host_ip or envs.node_host_ip() or driver_node_ip()
        if not is_local_address(self.driver_ip):
            raise PlacementError(
                f"host_ip={self.driver_ip!r} is not an address of the driver's machine, so "
                f"workers could not reach it; set host_ip / RAYEXEC_HOST_IP to one of this "
                f"machine's own addresses (Ray knows it as {driver_node_ip()})"
            )

    # ---- start-up ---------------------------------------------------------------------
    def start(self) -> None:
        """Steps 1-4 of the module docstring. On failure the caller calls shutdown()."""
        for i, b in enumerate(self.placement.bundle_indices):
            self._add_actor(i, b)
        self._configure()

    def _add_actor(self, index: int, bundle_index: int) -> None:
        """Create the actor of worker `index` and record it at `_created[index]`,
        unless shutdown began meanwhile (then it is killed at once)."""
        actor = self._create_actor(index, bundle_index)
        previous = None
        with self._lock:
            closed = self._closed
            if not closed:
                if index < len(self._created):
                    previous, self._created[index] = self._created[index], actor
                else:
                    self._created.append(actor)
        if previous is not None:  # dead, or the replacement of a restart that failed
            _kill(previous, f"worker {index} (replaced)")
        if closed:
            _kill(actor, f"worker {index} (created during shutdown)")
            raise ExecutorClosedError("the worker group was shut down while workers were "
                                      "being started")

    def _configure(self, keep_order: list[int] | None = None) -> None:
        """Steps 2-4 over the actors in `_created`. `keep_order` (worker indices in
        rank order) makes sure replacements take the ranks of the workers they replace."""
        created = self._live_created()
        infos = self._wait(
            [a.get_node_and_device_ids.remote(self.platform.resource_key)
             for a in created],
            self.config.pg_ready_timeout_s + ACTOR_START_S, "starting the worker actors",
            f"pg_ready_timeout_s (plus {ACTOR_START_S:g}s allowed for process start)",
        )
        driver_node = ray.get_runtime_context().get_node_id()
        workers = [
            layout.WorkerInfo(
                node_id=info["node_id"],
                # host_ip names the driver node's address on multi-NIC machines.
                node_ip=self.driver_ip if info["node_id"] == driver_node else info["node_ip"],
                device_ids=tuple(info["device_ids"]), node_cpus=info["node_cpus"],
                ray_node_ip=info["ray_node_ip"], ip_is_local=info["ip_is_local"],
            )
            for info in infos
        ]
        order = layout.order_workers(self.driver_ip, workers)
        if keep_order is not None and order != keep_order:
            raise PlacementError(
                f"replacement workers landed on other devices than the ones they replace "
                f"(worker order {order}, expected {keep_order}); create a new executor"
            )
        master_port = self._wait([created[order[0]].find_free_port.remote()],
                                 self.config.init_timeout_s, "finding a free port",
                                 "ExecutorConfig.init_timeout_s")[0]
        self.plans = layout.plan_ranks(
            self.topology, self.platform, self.driver_ip, workers, master_port,
            env_vars=self.config.env_vars, driver_env=envs.driver_environ(),
            env_prefixes_to_copy=self.config.env_prefixes_to_copy,
            cpu_threads_per_worker=self.config.cpu_threads_per_worker,
            cpu_bind=self.config.cpu_bind, host_ip=self.config.host_ip,
            set_visibility=self.config.manage_visibility,
        )
        with self._lock:
            if self._closed:
                raise ExecutorClosedError("the worker group was shut down during start-up")
            self.actors = [created[p.worker_index] for p in self.plans]
        self.actor_rank = {a._actor_id.hex(): r for r, a in enumerate(self.actors)}
        logger.info("rank layout:\n%s", layout.format_layout(self.plans, self.platform))
        if keep_order is None and not self.platform.is_accelerator:
            _warn_oversubscribed(sum(p.node_id == driver_node for p in self.plans))

        self._wait([a.update_environment_variables.remote(dict(p.env))
                    for a, p in zip(self.actors, self.plans)],
                   self.config.init_timeout_s, "setting worker environments",
                   "ExecutorConfig.init_timeout_s")
        init_method = f"tcp://{_url_host(self.plans[0].node_ip)}:{master_port}"
        self._wait(
            [
                a.init_worker.remote(
                    self.worker_cls,
                    {**self.config.worker_kwargs, **self.rank_kwargs(p, init_method)},
                    self.topology.pp,
                    p.cpu_threads if not self.platform.is_accelerator else None,
                    p.cpu_cores,
                    self.platform,
                    self.device_index(p),
                )
                for a, p in zip(self.actors, self.plans)
            ],
            self.config.init_timeout_s, "init_worker", "ExecutorConfig.init_timeout_s",
        )

    def _live_created(self) -> list[ActorHandle]:
        with self._lock:
            if self._closed:
                raise ExecutorClosedError("the worker group was shut down during start-up")
            return list(self._created)

    def run_phase(self, phase: str) -> None:
        """A start-up phase (init_device, load_model) on every rank, bounded by
        init_timeout_s."""
        self.run(phase, timeout=self.config.init_timeout_s,
                 setting="ExecutorConfig.init_timeout_s")

    def restart(self, ranks: Sequence[int], replace_all: bool = False) -> list[int]:
        """Replace the workers of `ranks` (dead or stuck) with new actors on the same
        bundles, keeping every rank; reset the others (their engine worker and
        torch.distributed state) and build every engine worker again with a fresh
        rendezvous. A survivor that cannot be reset in time is replaced too.
        Returns the ranks whose actors were replaced."""
        self._live_created()  # raises once shut down
        actors = list(self.actors)
        replace = set(range(len(actors))) if replace_all else set(ranks)
        survivors = [r for r in range(len(actors)) if r not in replace]
        refs = {r: actors[r].reset_worker.remote() for r in survivors}
        if refs:
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs),
                                timeout=RESET_TIMEOUT_S)
            for rank, ref in refs.items():
                try:
                    if ref not in ready:
                        raise TimeoutError(f"no answer in {RESET_TIMEOUT_S:g}s")
                    ray.get(ref)
                except Exception as e:
                    logger.warning("rank %d could not be reset (%s); replacing it", rank, e)
                    replace.add(rank)
        old_order = [p.worker_index for p in self.plans]
        for rank in sorted(replace):
            _kill(actors[rank], f"rank {rank}")
        for rank in sorted(replace):
            index = self.plans[rank].worker_index
            self._add_actor(index, self.placement.bundle_indices[index])
        self._configure(keep_order=old_order)
        return sorted(replace)
    def device_index(self, plan: layout.RankPlan) -> int | None:
        """The device rayexec makes current for `plan`'s rank: its local_rank on an
        accelerator whose visibility rayexec manages; None (the worker's business)
        on CPU or with manage_visibility=False, where a device set before the worker
        chooses its own visibility would fix the wrong one."""
        if self.platform.is_accelerator and self.config.manage_visibility:
            return plan.local_rank
        return None

    def rank_kwargs(self, plan: layout.RankPlan, init_method: str) -> dict[str, Any]:
        return {
            "rank": plan.rank, "local_rank": plan.local_rank,
            "world_size": self.topology.world_size, "pp_rank": plan.pp_rank,
            "tp_rank": plan.tp_rank, "distributed_init_method": init_method,
        }

    def _create_actor(self, index: int, bundle_index: int) -> ActorHandle:
        c, p = self.config, self.platform
        options: dict[str, Any] = {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.placement.group,
                placement_group_bundle_index=bundle_index,
                placement_group_capture_child_tasks=True,
            ),
            "num_cpus": c.num_cpus_per_worker,
            "max_restarts": 0,
            "runtime_env": self._runtime_env(),
        }
        if p.resource_key == "GPU":
            options["num_gpus"] = c.num_devices_per_worker
        elif p.resource_key == "CPU":
            options["num_cpus"] = c.num_cpus_per_worker + c.num_devices_per_worker
        else:
            options["resources"] = {p.resource_key: c.num_devices_per_worker}
        if c.memory_per_worker:
            options["memory"] = c.memory_per_worker
        # Ray Direct Transport (vLLM's sharded_rdt): a class option in Ray 2.60, where
        # .options(enable_tensor_transport=True) is accepted but ignored. Ray adds its
        # own concurrency groups to the dict it is given, hence a copy.
        tensor_transport = {"enable_tensor_transport": True} if c.enable_tensor_transport else {}
        actor_cls = ray.remote(concurrency_groups=dict(CONCURRENCY_GROUPS),
                               **tensor_transport)(RankActor)
        return actor_cls.options(**options).remote(index)

    def _runtime_env(self) -> dict[str, Any]:
        runtime_env = dict(self.config.runtime_env or {})
        env = dict(runtime_env.get("env_vars", {}))
        env.update(layout.copied_driver_env(envs.driver_environ(),
                                            self.config.env_prefixes_to_copy))
        env.update(self.config.env_vars)
        # Ray renices worker processes to 15 so its daemons stay responsive; these
        # workers are the engine's compute. Compiled-graph readers poll while they
        # wait, so at 15 they lose their cores to the nice-0 driver waiting on them
        # (docs/benchmarks.md has the step times before and after). Ray's core
        # worker reads this variable when the process starts.
        env.setdefault("RAY_worker_niceness", "0")
        if self.platform.noset_var:
            # rayexec owns the visibility variable: one list per node, set before the
            # engine's worker touches a device.
            env[self.platform.noset_var] = "1"
        runtime_env["env_vars"] = env
        return runtime_env

    # ---- calls ------------------------------------------------------------------------
    def run_async(
        self, method: Method, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
        ranks: Sequence[int] | None = None,
    ) -> list[ray.ObjectRef]:
        kwargs = kwargs or {}
        actors = self.actors
        if not actors:
            raise ExecutorClosedError("the workers were shut down; create a new executor")
        ranks = range(len(actors)) if ranks is None else ranks
        # Ray pickles arguments as each call is submitted, so an unpicklable value
        # fails on the first rank, before anything runs anywhere.
        with unpicklable_is_clear(f"collective_rpc({method_name(method)!r})"):
            payload = method if isinstance(method, str) else cloudpickle.dumps(method)
            parts = wire.pack_call(tuple(args), kwargs)
            if parts is not None:  # large host tensors: one copy in the store for all
                ref = ray.put(parts)
                return [actors[r].execute_framed.remote(payload, ref) for r in ranks]
            return [actors[r].execute_method.remote(payload, *args, **kwargs)
                    for r in ranks]

    def run(
        self, method: Method, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
        ranks: Sequence[int] | None = None, timeout: float | None = None,
        setting: str = "timeout / rpc_timeout_s",
    ) -> list[Any]:
        ranks = list(range(len(self.actors)) if ranks is None else ranks)
        refs = self.run_async(method, args, kwargs, ranks)
        return self._wait(refs, timeout, f"collective_rpc({method_name(method)!r})",
                          setting, labels=ranks)

    def _wait(
        self, refs: list[ray.ObjectRef], timeout: float | None, what: str, setting: str,
        labels: Sequence[int] | None = None,
    ) -> list[Any]:
        """Results of `refs` in order. Fails fast on the first error; after `timeout`
        raises ExecutorTimeoutError naming the labels (ranks) still pending."""
        labels = list(range(len(refs))) if labels is None else list(labels)
        label_of = {ref: label for ref, label in zip(refs, labels)}
        pending = list(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in ready:
                self.get(ref, label_of[ref])  # raises on error
            if not ready and left is not None and left <= 0:
                raise ExecutorTimeoutError(what, [label_of[r] for r in pending], timeout, setting)
        return [self.get(ref, label) for ref, label in zip(refs, labels)]

    def get(self, ref: ray.ObjectRef, rank: int, timeout: float | None = None) -> Any:
        """ray.get with errors turned into rayexec's."""
        try:
            return ray.get(ref, timeout=timeout)
        except RayTaskError as e:
            raise self.task_error(e, rank) from None
        except RayActorError as e:
            raise self.died_error(e, default_rank=rank) from None

    def task_error(self, e: RayTaskError, rank: int | None) -> BaseException:
        """What a failed worker call means for the user: the worker's own WorkerError,
        a WorkerDiedError, or a WorkerError built from what Ray reports (e.g. a
        result that could not be pickled on the way back)."""
        if isinstance(e.cause, WorkerError):
            return e.cause
        if isinstance(e.cause, RayActorError):
            return self.died_error(e.cause, default_rank=rank)
        cause = e.cause if e.cause is not None else e
        return WorkerError(rank, self.node_ip(rank) if rank is not None else "?",
                           getattr(e, "function_name", "?"), type(cause).__name__,
                           str(cause).splitlines()[0] if str(cause) else "",
                           getattr(e, "traceback_str", "") or str(e))

    def died_error(self, e: BaseException, default_rank: int | None = None) -> WorkerDiedError:
        """A WorkerDiedError naming the rank behind a Ray actor error."""
        rank = self.actor_rank.get(getattr(e, "actor_id", None) or "", default_rank)
        ranks = [] if rank is None else [rank]
        return WorkerDiedError(ranks, [self.node_ip(r) for r in ranks],
                               detail=str(e).splitlines()[0] if str(e) else type(e).__name__)

    def node_ip(self, rank: int) -> str:
        return self.plans[rank].node_ip if rank < len(self.plans) else "?"

    def progress(self, timeout: float) -> list[tuple[int, int, float] | str | None]:
        """Per rank: (last step started, last step finished, when it started), "dead",
        or None when the worker did not answer within `timeout`. Answered from the
        workers' "control" concurrency group, so a stuck step does not block it."""
        refs = [a.get_progress.remote() for a in self.actors]
        if not refs:  # shut down meanwhile
            return []
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        out: list[tuple[int, int, float] | str | None] = []
        for ref in refs:
            if ref not in ready:
                out.append(None)
                continue
            try:
                out.append(ray.get(ref))
            except (RayActorError, RayTaskError):
                out.append("dead")
        return out

    def ping(self, timeout: float) -> tuple[list[int], list[int]]:
        """(dead ranks, ranks that did not answer within `timeout`)."""
        refs = [a.ping.remote() for a in self.actors]
        if not refs:  # shut down meanwhile
            return [], []
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        dead = []
        for rank, ref in enumerate(refs):
            if ref in ready:
                try:
                    ray.get(ref)
                except (RayActorError, RayTaskError):
                    dead.append(rank)
        return dead, [refs.index(r) for r in pending]

    # ---- sleep (colocation) -------------------------------------------------------------
    def sleep(self, level: int = 1) -> list[Any]:
        """Every worker's sleep(level) (1: caches, 2: caches and weights), results in
        rank order; for handing a shared bundle to a colocated executor."""
        return self.run("sleep", (level,), timeout=self.config.rpc_timeout_s)

    def wake_up(self) -> list[Any]:
        return self.run("wake_up", timeout=self.config.rpc_timeout_s)

    # ---- shutdown -----------------------------------------------------------------------
    def kill_ranks(self, ranks: Sequence[int]) -> None:
        """Kill the actors of `ranks` now (restart replaces them)."""
        for rank in ranks:
            _kill(self.actors[rank], f"rank {rank}")

    def kill(self, timeout_s: float = 10.0) -> None:
        """Kill every actor we created and wait (bounded) until Ray reports them gone."""
        with self._lock:
            created = list(self._created)
        rank_of = {id(a): r for r, a in enumerate(self.actors)}
        names = [f"rank {rank_of[id(a)]}" if id(a) in rank_of else f"worker {i}"
                 for i, a in enumerate(created)]
        for actor, name in zip(created, names):
            _kill(actor, name)
        # wait_for_death never returns while the actor lives: its end means gone.
        ends = {actor.wait_for_death.remote(): name for actor, name in zip(created, names)}
        if not ends:
            return
        _, pending = ray.wait(list(ends), num_returns=len(ends), timeout=timeout_s)
        for ref in pending:
            logger.warning("%s: worker actor still alive %gs after ray.kill", ends[ref], timeout_s)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Kill the workers and remove a group we created, in at most about
        `timeout_s` (half for the workers to exit, half for the group's removal)."""
        with self._lock:
            self._closed = True
        deadline = time.monotonic() + timeout_s
        self.kill(timeout_s / 2)
        with self._lock:
            self._created = []
        self.actors = []
        remove_group(self.placement, max(0.5, deadline - time.monotonic()))


def _kill(actor: ActorHandle, name: str) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception as e:  # Ray gone, or an actor already dead
        logger.warning("%s: ray.kill failed: %r", name, e)
