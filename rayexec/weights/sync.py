"""The driver side of a weight sync: ask both sides what they hold and need, plan,
start every actor's part at once, and keep the serving side's weight state.

    report = sync_weights(state, dst_group, src_group, version=3)

Bytes move only between actors (transport.py); the driver sends each actor its
share of the plan and reads back small reports. `WeightState` is what the executor
keeps between syncs: the version served, and whether steps may run:
  "seeded"  the weights the workers loaded themselves (version None);
  "synced"  every rank holds `version`;
  "mixed"   a sync failed after some ranks loaded some new tensors: steps are
            refused until a sync succeeds;
  "dropped" sleep(level=2) freed the weights: steps refused until a sync.
A failed staged sync (stage=True) changes nothing: the old version keeps serving.

Not here: the plan (plan.py), the bytes (transport.py), step locking (executor.py).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import ray
from ray.exceptions import RayActorError

from rayexec.errors import ExecutorAsleepError, RayExecError, WeightSyncError
from rayexec.group import WorkerGroup
from rayexec.weights import transport
from rayexec.weights.plan import plan_transfers, schedule

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 32 << 20
DEFAULT_SYNC_TIMEOUT_S = 300.0  # when neither timeout= nor rpc_timeout_s bounds a sync
SERVABLE = ("seeded", "synced")


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
    and the tensors it was assembling held at once."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "bytes": self.bytes, "seconds": self.seconds,
                "gb_per_s": self.gb_per_s, "rounds": self.rounds,
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
                 timeout: float) -> SyncReport:
    """Move `src`'s weights into `dst` (see the module docstring). The caller holds
    `state.lock` and keeps steps away from `dst`."""
    started_wall, start = time.time(), time.perf_counter()
    # Both sides are asked at once (and rank 0 for a port for the group's store).
    src_refs = src.run_async(transport.describe_source)
    dst_refs = dst.run_async(transport.describe_destination)
    port_ref = src.run_async(transport.free_port, ranks=[0])
    what = "update_weights: describing the weights"
    src_layout = dict(enumerate(src._wait(src_refs, timeout, what, "update_weights(timeout=)")))
    dst_layout = dict(enumerate(dst._wait(dst_refs, timeout, what, "update_weights(timeout=)")))
    port = src._wait(port_ref, timeout, what, "update_weights(timeout=)")[0]
    src_ids = {a._actor_id.hex(): r for r, a in enumerate(src.actors)}
    same = {d: src_ids[a._actor_id.hex()] for d, a in enumerate(dst.actors)
            if a._actor_id.hex() in src_ids}
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
    if stage:
        try:
            dst.run(transport.commit_staged, (version,), timeout=timeout)
        except RayExecError as e:
            state.set("mixed", state.version,
                      f"committing staged weights of version {version!r} failed ({e}); some "
                      f"ranks may hold the new version. Run update_weights again")
            raise WeightSyncError(state.detail) from e
    else:
        short = {d: (r["loaded"], len(dst_layout[d])) for d, r in dst_results.items()
                 if r["loaded"] != len(dst_layout[d])}
        if short:
            state.set("mixed", version, f"destination ranks loaded fewer tensors than they "
                      f"need (rank: (loaded, needed)) {short}")
            raise WeightSyncError(state.detail)
    state.set("synced", version)
    state.session = (key, group_id, port)
    return SyncReport(version, plan.wire_bytes, time.perf_counter() - start,
                      plan.bytes_by_source(), plan.bytes_by_destination(), len(rounds),
                      len(plan.transfers), bucket_bytes, stage, started_wall,
                      [r["peak_extra_bytes"] for r in results])


def _wait_all(refs: list[Any], labels: list[str], timeout: float) -> str | None:
    """None when every call succeeded; else what went wrong, a dead actor first (its
    death explains its peers' "connection closed"), with the labels."""
    label_of = dict(zip(refs, labels))
    pending, deadline = list(refs), time.monotonic() + timeout
    died, failed = [], []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1,
                                  timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            late = [label_of[r] for r in pending]
            failed.append(f"{late} did not finish within timeout={timeout:g}s "
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
