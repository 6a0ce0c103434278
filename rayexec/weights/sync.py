"""The driver side of a weight sync: ask both sides what they hold and need, plan,
start every actor's part at once, and keep the serving side's weight state.

    report = sync_weights(state, dst_group, src_group, version=3)

Bytes move only between actors, by one of two routes (`via`):
  "process_group"  gloo (CPU) or NCCL (CUDA) send/recv between the actors, in
                   rounds of at most bucket_bytes per pair (transport.py);
  "object_store"   CPU weights through Ray's object store: each source puts what a
                   node reads once, its destination ranks map it without a copy
                   (object_store.py);
  "auto"           (default) the object store when every actor of both sides is on
                   one node, the weights are on CPU on both sides, no actor is on
                   both sides, every tensor a rank needs comes from one source rank
                   (none is assembled from parts), and what is put fits in half of
                   the node's object store; else the process group.
The driver sends each actor its share of the plan and reads back small reports.
`WeightState` is what the executor keeps between syncs: the version served, and
whether steps may run:
  "seeded"  the weights the workers loaded themselves (version None);
  "synced"  every rank holds `version`;
  "mixed"   a sync failed after some ranks loaded some new tensors: steps are
            refused until a sync succeeds;
  "dropped" sleep(level=2) freed the weights: steps refused until a sync.
A failed staged sync (stage=True) changes nothing: the old version keeps serving.

Not here: the plan (plan.py), the bytes (transport.py, object_store.py), step locking
(executor.py).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import ray
from ray.exceptions import RayActorError

from rayexec.errors import ExecutorAsleepError, RayExecError, WeightSyncError
from rayexec.group import WorkerGroup
from rayexec.weights import object_store, transport
from rayexec.weights.plan import WeightPlan, plan_transfers, schedule

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 32 << 20
DEFAULT_SYNC_TIMEOUT_S = 300.0  # when neither timeout= nor rpc_timeout_s bounds a sync
SERVABLE = ("seeded", "synced")
ROUTES = ("auto", "process_group", "object_store")
# "auto" takes the object store only while what it puts is at most this share of the
# node's object store, so that a sync never makes Ray spill objects to disk.
OBJECT_STORE_SHARE = 0.5


@dataclass(frozen=True)
class SyncReport:
    version: Any
    bytes: int
    """Bytes that crossed process boundaries."""
    seconds: float
    bytes_by_source_rank: dict[int, int]
    bytes_by_destination_rank: dict[int, int]
    rounds: int
    transfers: int
    bucket_bytes: int
    staged: bool
    started: float = field(default=0.0)
    """time.time() at the start (orders concurrent calls)."""
    peak_extra_bytes_by_actor: list[int] = field(default_factory=list)
    """Per sync actor (sources, then destinations): the most bytes its bucket buffers
    and the tensors it was assembling held at once (process-group route), or the
    tensors it assembled from several pieces (object-store route, where what is put
    lives in Ray's object store, counted in `bytes`)."""
    route: str = "process_group"
    """How the bytes moved: "process_group" or "object_store" (module docstring)."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "bytes": self.bytes, "seconds": self.seconds,
                "gb_per_s": self.gb_per_s, "rounds": self.rounds, "route": self.route,
                "bytes_by_source_rank": self.bytes_by_source_rank,
                "bytes_by_destination_rank": self.bytes_by_destination_rank}


class WeightState:
    """The serving side's weights between syncs. `lock` serializes syncs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.version: Any = None
        self.status = "seeded"
        self.detail = ""
        self.asleep = 0  # the sleep level, 0 when awake
        # (actor ids in sync-rank order, group id, store port) of the last good sync:
        # the same actors reuse their process group (one TCP mesh set-up saved).
        self.session: tuple[tuple[str, ...], str, int] | None = None

    def check_servable(self) -> None:
        if self.asleep:
            raise ExecutorAsleepError(f"steps are refused: the executor is asleep (level "
                                      f"{self.asleep}); call wake_up() first")
        if self.status not in SERVABLE:
            raise WeightSyncError(f"steps are refused: {self.detail}")

    def workers_rebuilt(self) -> None:
        """Every engine worker was built again (restart_failed_workers): they hold the
        weights they load themselves, not a synced version."""
        self.session = None
        self.asleep = 0
        if self.status != "seeded":
            self.set("dropped", self.version,
                     f"restart_failed_workers() rebuilt the workers, so they no longer hold "
                     f"version {self.version!r}; call update_weights() before the next step")

    def set(self, status: str, version: Any, detail: str = "") -> None:
        self.status, self.version, self.detail = status, version, detail


def sync_weights(state: WeightState, dst: WorkerGroup, src: WorkerGroup, *, version: Any,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, stage: bool = False,
                 timeout: float, via: str = "auto") -> SyncReport:
    """Move `src`'s weights into `dst` (see the module docstring). The caller holds
    `state.lock` and keeps steps away from `dst`."""
    if via not in ROUTES:
        raise ValueError(f"update_weights(via={via!r}): expected one of {ROUTES}")
    started_wall, start = time.time(), time.perf_counter()
    deadline = time.monotonic() + timeout
    # Both sides are asked at once (and rank 0 for a port for the group's store).
    src_refs = src.run_async(transport.describe_source)
    dst_refs = dst.run_async(transport.describe_destination)
    src_where = src.run_async(object_store.locate, (True,))
    dst_where = dst.run_async(object_store.locate, (False,))
    port_ref = src.run_async(transport.free_port, ranks=[0])
    what, setting = "update_weights: describing the weights", "update_weights(timeout=)"
    src_layout = dict(enumerate(src._wait(src_refs, timeout, what, setting)))
    dst_layout = dict(enumerate(dst._wait(dst_refs, timeout, what, setting)))
    where = {("src", r): w for r, w in enumerate(src._wait(src_where, timeout, what, setting))}
    where.update({("dst", d): w for d, w in enumerate(dst._wait(dst_where, timeout, what,
                                                                setting))})
    port = src._wait(port_ref, timeout, what, setting)[0]
    src_ids = {a._actor_id.hex(): r for r, a in enumerate(src.actors)}
    same = {d: src_ids[a._actor_id.hex()] for d, a in enumerate(dst.actors)
            if a._actor_id.hex() in src_ids}
    if via != "process_group":
        plan = plan_transfers(src_layout, dst_layout, split_replicas=False)
        route = _route(via, plan, where, same)
        if route == "object_store":
            node_of = {d: where[("dst", d)][0] for d in dst_layout}
            return _sync_by_objects(state, dst, src, plan, node_of, version, stage,
                                    timeout, deadline, bucket_bytes, start, started_wall)
    plan = plan_transfers(src_layout, dst_layout, same_process=same)
    rounds = schedule(plan, bucket_bytes)

    # Sync ranks: the source's, then the destination actors that are not also sources.
    actors, peers, roles = list(src.actors), {}, {}
    for r, a in enumerate(src.actors):
        peers[("src", r)] = r
        roles[a._actor_id.hex()] = [r, None]
    for d, a in enumerate(dst.actors):
        key = a._actor_id.hex()
        if key not in roles:
            roles[key] = [None, d]
            actors.append(a)
        else:
            roles[key][1] = d
        peers[("dst", d)] = actors.index(a)
    key = tuple(a._actor_id.hex() for a in actors)
    if state.session is not None and state.session[0] == key:
        group_id, port = state.session[1], state.session[2]
    else:
        group_id = uuid.uuid4().hex
    state.session = None  # set again only when this sync succeeds
    jobs = []
    for sync_rank, a in enumerate(actors):
        src_rank, dst_rank = roles[a._actor_id.hex()]
        mine = [[b for b in r if b.src == src_rank or b.dst == dst_rank] for r in rounds]
        # Keep round indexes (they are the message tags); drop only trailing empties.
        while mine and not mine[-1]:
            mine.pop()
        local = tuple(t for t in plan.transfers if t.local and t.dst == dst_rank)
        jobs.append(transport.SyncJob(group_id, src.node_ip(0), port, len(actors), sync_rank,
                                      src_rank, dst_rank, peers, mine, bucket_bytes, version,
                                      stage, timeout, local))
    label = [f"source rank {roles[a._actor_id.hex()][0]}" if roles[a._actor_id.hex()][0]
             is not None else f"destination rank {roles[a._actor_id.hex()][1]}" for a in actors]
    logger.info("weight sync v%s: %d transfers, %.1f MiB in %d rounds of <= %d MiB buckets",
                version, len(plan.transfers), plan.wire_bytes / 2**20, len(rounds),
                bucket_bytes >> 20)
    payload = cloudpickle.dumps(transport.run_sync)
    refs = [a.execute_method.remote(payload, job) for a, job in zip(actors, jobs)]
    failure = _wait_all(refs, label, timeout)
    if failure is not None:
        _fail(state, dst, version, stage, failure, timeout)
    results = [ray.get(r) for r in refs]
    dst_results = {roles[a._actor_id.hex()][1]: res for a, res in zip(actors, results)
                   if roles[a._actor_id.hex()][1] is not None}
    _finish(state, dst, version, stage, {d: r["loaded"] for d, r in dst_results.items()},
            {d: len(dst_layout[d]) for d in dst_results}, timeout)
    state.session = (key, group_id, port)
    return SyncReport(version, plan.wire_bytes, time.perf_counter() - start,
                      plan.bytes_by_source(), plan.bytes_by_destination(), len(rounds),
                      len(plan.transfers), bucket_bytes, stage, started_wall,
                      [r["peak_extra_bytes"] for r in results])


def _route(via: str, plan: WeightPlan, where: dict[tuple[str, int], tuple[str, str]],
           same: dict[int, int]) -> str:
    """The route "auto" takes (module docstring); for via="object_store", a
    ValueError when the weights are not on CPU."""
    devices = {device for _, device in where.values()}
    if via == "object_store":
        if devices != {"cpu"}:
            on = sorted(f"{role} rank {r}: {d}" for (role, r), (_, d) in where.items()
                        if d != "cpu")
            raise ValueError(f"update_weights(via='object_store') moves CPU tensors, but "
                             f"{on[:4]}; use via='process_group' (NCCL) or 'auto'")
        return via
    nodes = {node for node, _ in where.values()}
    if devices != {"cpu"} or len(nodes) != 1 or same:
        return "process_group"
    pieces = Counter((t.dst, t.name) for t in plan.transfers)
    if any(n > 1 for n in pieces.values()):
        # A tensor assembled from several sources' parts costs a copy more than the
        # process group, which receives each part in place (weight_sync benchmark,
        # TP2 -> PP2: 0.121 s against 0.090 s for 256 MiB).
        return "process_group"
    node_of = {d: where[("dst", d)][0] for d in plan.destination}
    needed = object_store.put_bytes(object_store.regions_by_source(plan, node_of),
                                    object_store.itemsizes(plan))
    capacity = _object_store_bytes(next(iter(nodes)))
    if needed > OBJECT_STORE_SHARE * capacity:
        logger.info("weight sync: %.1f MiB would take more than %d%% of the node's object "
                    "store (%.1f MiB): syncing over a process group", needed / 2**20,
                    OBJECT_STORE_SHARE * 100, capacity / 2**20)
        return "process_group"
    return "object_store"


def _object_store_bytes(node_id: str) -> float:
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return float(node.get("Resources", {}).get("object_store_memory", 0.0))
    return 0.0


def _sync_by_objects(state: WeightState, dst: WorkerGroup, src: WorkerGroup, plan: WeightPlan,
                     node_of: dict[int, str], version: Any, stage: bool, timeout: float,
                     deadline: float, bucket_bytes: int, start: float, started_wall: float
                     ) -> SyncReport:
    """The object-store route: sources put, then destinations map and load (or stage)."""
    regions = object_store.regions_by_source(plan, node_of)
    put = object_store.put_bytes(regions, object_store.itemsizes(plan))
    logger.info("weight sync v%s through the object store: %d transfers, %.1f MiB put by %d "
                "source rank(s)", version, len(plan.transfers), put / 2**20, len(regions))
    sources = sorted(regions)
    publish = cloudpickle.dumps(object_store.publish)
    refs = [src.actors[s].execute_method.remote(publish, regions[s]) for s in sources]
    failure = _wait_all(refs, [f"source rank {s}" for s in sources], _left(deadline), timeout)
    if failure is not None:  # before any destination read anything: nothing changed
        served = state.version if state.status != "seeded" else "the seeded weights"
        raise WeightSyncError(f"weight sync to version {version!r} failed: {failure}. "
                              f"Nothing was loaded (the source ranks failed while putting "
                              f"their weights); the executor keeps serving version "
                              f"{served!r} unchanged")
    published = dict(zip(sources, ray.get(refs)))  # the objects live while this holds them
    jobs = object_store.collect_jobs(plan, published, node_of, version, stage, _left(deadline))
    collect = cloudpickle.dumps(object_store.collect)
    ranks = sorted(jobs)
    refs = [dst.actors[d].execute_method.remote(collect, jobs[d]) for d in ranks]
    failure = _wait_all(refs, [f"destination rank {d}" for d in ranks], _left(deadline),
                        timeout)
    if failure is not None:
        _fail(state, dst, version, stage, failure, _left(deadline) or 1.0)
    results = dict(zip(ranks, ray.get(refs)))
    _finish(state, dst, version, stage, {d: r["loaded"] for d, r in results.items()},
            {d: len(plan.destination[d]) for d in ranks}, _left(deadline) or 1.0)
    del published
    return SyncReport(version, put, time.perf_counter() - start, plan.bytes_by_source(),
                      plan.bytes_by_destination(), 1, len(plan.transfers), bucket_bytes, stage,
                      started_wall, [0] * len(src.actors)
                      + [results[d]["peak_extra_bytes"] for d in ranks], "object_store")


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _finish(state: WeightState, dst: WorkerGroup, version: Any, stage: bool,
            loaded: dict[int, int], needed: dict[int, int], timeout: float) -> None:
    """Commit a staged sync, or check that every rank loaded what it needs; then the
    version is served."""
    if stage:
        try:
            dst.run(transport.commit_staged, (version,), timeout=timeout)
        except RayExecError as e:
            state.set("mixed", state.version,
                      f"committing staged weights of version {version!r} failed ({e}); some "
                      f"ranks may hold the new version. Run update_weights again")
            raise WeightSyncError(state.detail) from e
    else:
        short = {d: (loaded[d], needed[d]) for d in loaded if loaded[d] != needed[d]}
        if short:
            state.set("mixed", version, f"destination ranks loaded fewer tensors than they "
                      f"need (rank: (loaded, needed)) {short}")
            raise WeightSyncError(state.detail)
    state.set("synced", version)


def _wait_all(refs: list[Any], labels: list[str], timeout: float,
              bound: float | None = None) -> str | None:
    """None when every call succeeded; else what went wrong, a dead actor first (its
    death explains its peers' "connection closed"), with the labels. Waits at most
    `timeout` (what is left of the sync's `bound`, which the message names)."""
    label_of = dict(zip(refs, labels))
    pending, deadline = list(refs), time.monotonic() + timeout
    died, failed = [], []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1,
                                  timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            late = [label_of[r] for r in pending]
            failed.append(f"{late} did not finish within timeout={bound or timeout:g}s "
                          f"(update_weights(timeout=) / ExecutorConfig.rpc_timeout_s / "
                          f"DEFAULT_SYNC_TIMEOUT_S)")
            break
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError as e:
                died.append(f"{label_of[ref]} died ({type(e).__name__})")
            except Exception as e:
                cause = getattr(e, "cause", None) or e
                line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
                failed.append(f"{label_of[ref]} failed: {line}")
    return "; ".join(died + failed[:2]) or None


def _fail(state: WeightState, dst: WorkerGroup, version: Any, stage: bool, failure: str,
          timeout: float) -> None:
    """Record what a failed sync left behind and raise WeightSyncError."""
    if stage:
        try:
            dst.run(transport.discard_staged, timeout=timeout)
        except RayExecError as e:
            logger.warning("discarding staged weights after a failed sync: %s", e)
        served = state.version if state.status != "seeded" else "the seeded weights"
        raise WeightSyncError(f"weight sync to version {version!r} failed: {failure}. Staged: "
                              f"the executor keeps serving version {served!r} unchanged")
    loaded = _progress(dst, timeout)
    state.set("mixed", version,
              f"weight sync to version {version!r} failed midway ({failure}); destination "
              f"ranks hold a mix of versions (rank: new tensors loaded / needed: {loaded}). "
              f"Run update_weights again (stage=True keeps the old version on failure)")
    raise WeightSyncError(state.detail)


def _progress(dst: WorkerGroup, timeout: float) -> dict[int, str]:
    try:
        got = dst.run(transport.sync_progress, timeout=min(timeout, 10.0))
    except RayExecError as e:
        return {-1: f"unknown ({e})"}
    return {r: f"{loaded}/{needed}" for r, (loaded, needed) in enumerate(got)}
