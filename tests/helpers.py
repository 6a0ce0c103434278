"""Helpers for tests: leak checks through Ray's GCS tables (the ray.util.state API
needs the dashboard, which ray[cgraph] does not install) and polling."""

from __future__ import annotations

import time
from collections.abc import Callable


def live_worker_actors() -> set[str]:
    """Ids of RankActor actors that are not DEAD."""
    from ray._private import state

    return {
        actor_id for actor_id, a in state.actors().items()
        if a["ActorClassName"] == "RankActor" and a["State"] != "DEAD"
    }


def live_placement_groups() -> set[str]:
    import ray

    return {pg_id for pg_id, pg in ray.util.placement_group_table().items()
            if pg["state"] != "REMOVED"}


def cluster_snapshot() -> tuple[set[str], set[str]]:
    return live_worker_actors(), live_placement_groups()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def assert_no_leaks(before: tuple[set[str], set[str]] = (set(), set())) -> None:
    """No worker actor and no placement group beyond those in `before` survive."""
    ok = wait_until(lambda: live_worker_actors() <= before[0]
                    and live_placement_groups() <= before[1], timeout_s=15)
    actors, groups = live_worker_actors() - before[0], live_placement_groups() - before[1]
    assert ok, f"leaked worker actors {sorted(actors)} and placement groups {sorted(groups)}"
