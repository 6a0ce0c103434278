"""Helpers for tests: leak checks through Ray's GCS tables (the ray.util.state API
needs the dashboard, which ray[cgraph] does not install) and polling.

What a finished executor must not leave behind (`assert_no_leaks`):
- a RankActor (rayexec's worker actor) or a DAGDriverProxyActor (the driver-side
  actor of a Ray compiled graph) that is not DEAD;
- a placement group that is not REMOVED;
- a thread of this process whose name starts with "rayexec-";
- a /dev/shm entry that names the pid of one of rayexec's worker processes
  (torch / gloo / vLLM segments and semaphores carry the creator's pid), created
  during the test.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

LEAKY_ACTOR_CLASSES = ("RankActor", "CompiledDAG.DAGDriverProxyActor")
SHM_DIR = "/dev/shm"


def _actors() -> dict:
    from ray._private import state

    return state.actors()


def live_actors(classes: tuple[str, ...] = LEAKY_ACTOR_CLASSES) -> set[str]:
    """Ids of actors of `classes` (Ray's class names) that are not DEAD."""
    return {actor_id for actor_id, a in _actors().items()
            if a["ActorClassName"] in classes and a["State"] != "DEAD"}


def live_worker_actors() -> set[str]:
    """Ids of RankActor actors that are not DEAD."""
    return live_actors(("RankActor",))


def worker_pids() -> dict[int, float]:
    """Pid -> start time (seconds since the epoch) of every RankActor Ray knows of,
    dead or alive (the latest actor with that pid)."""
    out: dict[int, float] = {}
    for a in _actors().values():
        if a["ActorClassName"] == "RankActor" and a.get("Pid"):
            pid = int(a["Pid"])
            out[pid] = max(out.get(pid, 0.0), float(a.get("StartTime") or 0) / 1000)
    return out


def live_placement_groups() -> set[str]:
    import ray

    return {pg_id for pg_id, pg in ray.util.placement_group_table().items()
            if pg["state"] != "REMOVED"}


def rayexec_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("rayexec-") and t.is_alive()}


def shm_entries() -> set[str]:
    try:
        return set(os.listdir(SHM_DIR))
    except OSError:
        return set()


def shm_of(pids: dict[int, float], names: set[str]) -> set[str]:
    """The names among `names` that carry one of `pids` as a number of their own and
    were made after that process's actor started. Pids are reused: on a machine that
    has run many tests, /dev/shm can hold an entry an earlier, long-gone process with
    the same pid left (a CI run failed on one)."""
    out = set()
    for name in names:
        starts = [pids[int(x)] for x in re.findall(r"\d+", name) if int(x) in pids]
        if starts and _made_at(name) >= min(starts) - SHM_CLOCK_SLACK_S:
            out.add(name)
    return out


SHM_CLOCK_SLACK_S = 5.0  # the actor table's start time vs the file's change time


def _made_at(name: str) -> float:
    try:
        return os.stat(os.path.join(SHM_DIR, name)).st_ctime
    except OSError:  # gone meanwhile: not a leak
        return float("-inf")


@dataclass
class Snapshot:
    actors: set[str] = field(default_factory=set)
    groups: set[str] = field(default_factory=set)
    threads: set[threading.Thread] = field(default_factory=set)
    shm: set[str] = field(default_factory=set)


def cluster_snapshot() -> Snapshot:
    return Snapshot(live_actors(), live_placement_groups(), rayexec_threads(), shm_entries())


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def leaks(before: Snapshot) -> dict[str, list[str]]:
    """What exists now that did not before (empty lists: nothing leaked)."""
    new_shm = shm_entries() - before.shm
    return {
        "actors": sorted(live_actors() - before.actors),
        "placement groups": sorted(live_placement_groups() - before.groups),
        "threads": sorted(t.name for t in rayexec_threads() - before.threads),
        "/dev/shm": sorted(shm_of(worker_pids(), new_shm)),
    }


def assert_no_leaks(before: Snapshot | None = None, timeout_s: float = 15.0) -> None:
    """Nothing of §"what a finished executor must not leave" beyond `before`
    survives, within `timeout_s` (Ray reports deaths and removals asynchronously)."""
    before = before or Snapshot()
    found: dict[str, list[str]] = {}

    def clean() -> bool:
        nonlocal found
        found = leaks(before)
        return not any(found.values())

    assert wait_until(clean, timeout_s), f"leaked: { {k: v for k, v in found.items() if v} }"
