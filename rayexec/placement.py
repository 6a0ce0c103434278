"""Where workers go: start or join Ray, get a placement group, wait for it, and
explain precisely why it cannot be satisfied.

- Ray: join RAY_ADDRESS when set; else an already running local cluster; else
  start an embedded one with enough logical CPUs for a CPU layout (so a 2-core
  laptop runs PP=2 x TP=2). Never a second cluster next to a running one.
- Group: the one given, else the one the caller runs inside, else a live one with
  `placement_group_name`, else a new one (world_size bundles, first bundle pinned to
  the driver's node when that node has the device).
- Waiting is bounded by `pg_ready_timeout_s` and logs progress; on timeout a group
  we created is removed and `PlacementError` says what was asked, what each node
  has free and which constraint cannot be met.
The cluster queries live in `cluster.py`, the pure diagnosis in `diagnosis.py`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

from rayexec import envs
from rayexec.cluster import driver_node_ip, free_resources_per_node, node_resources
from rayexec.config import ExecutorConfig, check_bundle_indices_in_range
from rayexec.diagnosis import diagnose_placement
from rayexec.errors import PlacementError
from rayexec.platform import Platform
from rayexec.resources import ResourceConfig

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class Placement:
    """The placement group in use, which of its bundles the workers take (in
    creation order) and whether rayexec created it (and so must remove it)."""

    group: PlacementGroup
    bundle_indices: tuple[int, ...]
    created: bool


# ---- Ray itself -------------------------------------------------------------------
def ensure_ray(config: ExecutorConfig) -> str:
    """Connect to or start Ray; returns how ("connected", "joined ...", "started ...")."""
    if ray.is_initialized():
        return "connected"
    address = envs.ray_address()
    if address:
        logger.info("joining the Ray cluster at RAY_ADDRESS=%s", address)
        check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except Exception as e:
            raise PlacementError(
                f"cannot reach the Ray cluster at RAY_ADDRESS={address!r}: "
                f"{type(e).__name__}: {e}. Check that the head node is up and the address "
                f"is right, or unset RAY_ADDRESS to start a local Ray."
            ) from e
        return f"joined {address}"
    num_cpus = embedded_cpus(config, usable_cpus())
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    except ValueError as e:
        # ray.init found a running local cluster (started with `ray start`) and
        # refuses num_cpus: join that one rather than starting a second cluster.
        if "existing cluster" not in str(e):
            raise
        logger.info("joining the running local Ray cluster")
        ray.init(logging_level=logging.WARNING)
        return "joined the running local cluster"
    logger.info("started an embedded local Ray with %d logical CPUs", num_cpus)
    return f"started a local Ray with {num_cpus} logical CPUs"


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """PlacementError now if nothing listens at `address` ("host:port" or
    "ray://host:port"): ray.init would otherwise wait for minutes."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" or a form Ray resolves itself
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise PlacementError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address!r}: nothing answers at "
            f"{host}:{port} within {timeout_s:g}s ({e}). Check that the head node is up (`ray "
            f"status` there) and the address and port are right, or unset RAY_ADDRESS to start "
            f"a local Ray."
        ) from None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container or taskset
    limits it), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def embedded_cpus(config: ExecutorConfig, physical_cpus: int) -> int:
    """Logical CPUs for an embedded Ray: the machine's, or what the layout reserves
    when more (CPU workers limit their own threads, so this only books seats)."""
    per_worker = config.num_cpus_per_worker
    if config.device in ("cpu", "auto"):
        per_worker += config.num_devices_per_worker
    return max(physical_cpus, math.ceil(per_worker * config.world_size))


# ---- the placement group ------------------------------------------------------------
def acquire_placement(config: ExecutorConfig, platform: Platform) -> Placement:
    """The group and bundles the workers will use, ready (see module docstring)."""
    group, created = config.placement_group, False
    if group is None:
        group = get_current_placement_group()
        if group is not None:
            logger.info("using the placement group this driver runs inside: %s", group.id.hex())
    if group is None and config.placement_group_name:
        try:
            group = ray.util.get_placement_group(config.placement_group_name)
            logger.info("reusing the live placement group %r", config.placement_group_name)
        except ValueError:
            group = None
    if group is None:
        group, created = _create_group(config, platform), True

    try:
        if not created:
            wait_ready(group, config.pg_ready_timeout_s, bundles=None, strategy=None)
        indices = _choose_bundles(config, group, platform)
    except BaseException:
        if created:
            remove_placement_group(group)
        raise
    return Placement(group=group, bundle_indices=indices, created=created)


def _create_group(config: ExecutorConfig, platform: Platform) -> PlacementGroup:
    resources = ResourceConfig.for_executor(config, platform)
    # Impossible on this cluster even when idle: say so now. Short of *free*
    # resources only: wait, since Ray's free view lags removals by ~0.3 s and other
    # work (or an autoscaler) may free or add them within pg_ready_timeout_s.
    resources.validate_available(capacity=True)
    short = resources.shortfalls(free_resources_per_node())
    if short:
        logger.warning("not enough free resources right now (%s); waiting up to %gs",
                       "; ".join(short), config.pg_ready_timeout_s)
    bundles = [resources.bundle() for _ in range(config.world_size)]
    driver_ip = driver_node_ip()
    driver_node = node_resources().get(driver_ip, {})
    if driver_node.get(platform.resource_key, 0) >= config.num_devices_per_worker:
        # A tiny share of Ray's per-node resource pins bundle 0 (so rank 0) to the
        # driver's node; the driver then talks to its first stage locally.
        bundles[0][f"node:{driver_ip}"] = 0.001
    logger.info(
        "creating a placement group of %d bundles %s (strategy %s)",
        len(bundles), resources.bundle(), config.placement_strategy,
    )
    try:
        group = placement_group(
            bundles, strategy=config.placement_strategy, name=config.placement_group_name or ""
        )
    except Exception as e:
        raise PlacementError(
            f"Ray refused to create the placement group {bundles} "
            f"(strategy {config.placement_strategy}): {e}"
        ) from e
    try:
        wait_ready(group, config.pg_ready_timeout_s, bundles, config.placement_strategy)
    except BaseException:
        remove_placement_group(group)
        raise
    return group


def wait_ready(
    group: PlacementGroup,
    timeout_s: float,
    bundles: Sequence[Mapping[str, float]] | None,
    strategy: str | None,
) -> None:
    """Wait for `group`, logging progress; PlacementError (with a diagnosis) on timeout.
    The caller removes a group it created."""
    ready = group.ready()
    start = time.monotonic()
    while True:
        left = timeout_s - (time.monotonic() - start)
        if left <= 0:
            break
        done, _ = ray.wait([ready], timeout=min(left, PROGRESS_EVERY_S))
        if done:
            return
        logger.info(
            "waiting for placement group %s: %.0fs of %.0fs (pg_ready_timeout_s)",
            group.id.hex()[:12], time.monotonic() - start, timeout_s,
        )
    bundles = bundles or group.bundle_specs
    strategy = strategy or placement_group_table(group).get("strategy", "?")
    raise PlacementError(
        f"placement group not ready after {timeout_s:g}s (pg_ready_timeout_s). "
        + diagnose_placement(bundles, strategy, free_resources_per_node())
    )


def _choose_bundles(config: ExecutorConfig, group: PlacementGroup, platform: Platform) -> tuple:
    specs = group.bundle_specs
    if config.bundle_indices is not None:
        check_bundle_indices_in_range(config.bundle_indices, len(specs))
        indices = tuple(config.bundle_indices)
    else:
        if len(specs) < config.world_size:
            raise PlacementError(
                f"the placement group has {len(specs)} bundles but the layout needs "
                f"world_size={config.world_size}; pass a larger group or set bundle_indices"
            )
        indices = tuple(range(config.world_size))
    need = ResourceConfig.for_executor(config, platform).bundle()
    for i in indices:
        short = {k: v for k, v in need.items() if specs[i].get(k, 0) + 1e-9 < v}
        if short:
            raise PlacementError(
                f"bundle {i} of the placement group is {specs[i]}; each worker needs {need} "
                f"(short: {short}). Choose other bundle_indices or adjust "
                f"num_devices_per_worker / num_cpus_per_worker / memory_per_worker."
            )
    return indices


def remove_group(placement: Placement, timeout_s: float = 10.0) -> None:
    """Remove the group if rayexec created it, and wait (bounded) until Ray reports it
    removed, so its resources are free for whatever comes next. A given group is left
    alone."""
    if not placement.created:
        return
    try:
        remove_placement_group(placement.group)
        deadline = time.monotonic() + timeout_s
        while placement_group_table(placement.group).get("state") != "REMOVED":
            if time.monotonic() > deadline:
                logger.warning("placement group %s not reported removed after %gs",
                               placement.group.id.hex()[:12], timeout_s)
                return
            time.sleep(0.05)
    except Exception as e:  # e.g. Ray already gone (then nothing is reserved anymore)
        logger.warning("removing placement group %s failed: %r", placement.group.id.hex()[:12], e)
