"""Pure rank math: who is rank r, what each worker sees, what environment it gets.

Input: the driver's IP and, for each worker actor (in creation order), its node id,
node IP, device ids and the node's CPU count. Output: one `RankPlan` per rank.
The order is decided here, once:
  1. workers on the driver's node first;
  2. then nodes holding fewer of our workers;
  3. then node IP compared numerically (IPv4 before IPv6, "10.0.0.9" < "10.0.0.10");
  4. within a node, device id compared as an integer ("9" < "10").
Rank r is stage r // TP and tp_rank r % TP. Every worker on a node sees the same
sorted list of the devices our workers hold there; local_rank is the position of its
own device in that list. A worker holding several devices is on the first one Ray
lists for it (`ray.get_gpu_ids()[0]`, reported as `device_ids[0]`): the device Ray's
compiled-graph channels pick, so rayexec and Ray agree on one device per worker.
No Ray import: everything here is tested in milliseconds.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from rayexec.errors import PlacementError
from rayexec.platform import PLATFORMS, VISIBILITY_VARS, Platform

T = TypeVar("T")

# Facts that belong to one worker; never copied from the driver's environment and
# never accepted in ExecutorConfig.env_vars.
WORKER_SPECIFIC_VARS: frozenset[str] = (
    VISIBILITY_VARS
    | {p.noset_var for p in PLATFORMS.values() if p.noset_var}
    | {
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
        "MASTER_PORT", "RAYEXEC_HOST_IP", "VLLM_HOST_IP", "VLLM_HOST_PORT",
    }
)


@dataclass(frozen=True)
class WorkerInfo:
    """What one worker actor reports about where it landed."""

    node_id: str
    node_ip: str
    device_ids: tuple[str, ...] = ()
    node_cpus: int = 1
    ray_node_ip: str | None = None
    """The node's IP as Ray knows it (node_ip differs when RAYEXEC_HOST_IP is set)."""
    ip_is_local: bool = True
    """Whether node_ip is an address of the worker's own machine."""


@dataclass(frozen=True)
class Topology:
    """The PP x TP grid. Ranks are stage-major: rank = pp_rank * TP + tp_rank."""

    pp: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.pp * self.tp

    def pp_rank(self, rank: int) -> int:
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def rank(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    def stage_ranks(self, pp_rank: int) -> list[int]:
        return [self.rank(pp_rank, t) for t in range(self.tp)]

    def grid(self, by_rank: Sequence[T]) -> list[list[T]]:
        """`by_rank` reshaped to grid[pp_rank][tp_rank]."""
        assert len(by_rank) == self.world_size, (len(by_rank), self.world_size)
        return [list(by_rank[s * self.tp:(s + 1) * self.tp]) for s in range(self.pp)]


@dataclass(frozen=True)
class RankPlan:
    """Everything decided for one rank before its worker is built."""

    rank: int
    worker_index: int
    """Index of the actor (creation order) that holds this rank."""
    local_rank: int
    pp_rank: int
    tp_rank: int
    node_id: str
    node_ip: str
    device_ids: tuple[str, ...]
    visible_devices: tuple[str, ...]
    cpu_threads: int
    cpu_cores: tuple[int, ...] | None
    env: Mapping[str, str] = field(default_factory=dict)


def ip_sort_key(ip: str) -> tuple[int, int]:
    """Numeric sort key for an IPv4 or IPv6 address (v4 first)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise PlacementError(
            f"node IP {ip!r} is not an IPv4/IPv6 address; set host_ip / RAYEXEC_HOST_IP "
            f"to the node's address"
        ) from None
    return (addr.version, int(addr))


def device_sort_key(device_id: str) -> tuple[int, int | str]:
    """Integer order for numeric ids ("9" < "10"); other ids after, as text."""
    try:
        return (0, int(device_id))
    except ValueError:
        return (1, device_id)


def check_node_identity(workers: Sequence[WorkerInfo]) -> None:
    """Each node must have one IP and each IP one node, else ranks and rendezvous
    addresses would be wrong."""
    ips_of_node: dict[str, set[str]] = defaultdict(set)
    nodes_of_ip: dict[str, set[str]] = defaultdict(set)
    for w in workers:
        if not w.ip_is_local:
            raise PlacementError(
                f"node {w.node_id} (Ray: {w.ray_node_ip}) reports IP {w.node_ip}, which is not "
                f"an address of that machine, so no peer could reach it. Set host_ip / "
                f"RAYEXEC_HOST_IP on that node to one of its own addresses, or unset it."
            )
        ips_of_node[w.node_id].add(w.node_ip)
        nodes_of_ip[w.node_ip].add(w.node_id)
    for node_id, ips in ips_of_node.items():
        if len(ips) > 1:
            raise PlacementError(
                f"node {node_id} reports more than one IP: {sorted(ips, key=ip_sort_key)}. "
                f"Set host_ip (or RAYEXEC_HOST_IP on that node before `ray start`) to the "
                f"one address the node should use."
            )
    for ip, nodes in nodes_of_ip.items():
        if len(nodes) > 1:
            raise PlacementError(
                f"{len(nodes)} nodes report the same IP {ip}: {sorted(nodes)}. Ranks and "
                f"rendezvous addresses need one IP per node: start each node with its own "
                f"--node-ip-address, or set RAYEXEC_HOST_IP (host_ip for the driver's "
                f"node) to a distinct address on each."
            )


def order_workers(driver_ip: str, workers: Sequence[WorkerInfo]) -> list[int]:
    """Worker indices in rank order (see the module docstring for the rules)."""
    per_node: dict[str, int] = defaultdict(int)
    for w in workers:
        per_node[w.node_id] += 1

    def key(i: int):
        w = workers[i]
        return (
            w.node_ip != driver_ip,
            per_node[w.node_id],
            ip_sort_key(w.node_ip),
            w.node_id,
            tuple(sorted(device_sort_key(d) for d in w.device_ids)),
            i,
        )

    return sorted(range(len(workers)), key=key)


def node_visible_devices(workers: Sequence[WorkerInfo]) -> dict[str, tuple[str, ...]]:
    """node_id -> sorted ids of every device our workers hold on that node."""
    devices: dict[str, set[str]] = defaultdict(set)
    for w in workers:
        devices[w.node_id].update(w.device_ids)
    return {node: tuple(sorted(ids, key=device_sort_key)) for node, ids in devices.items()}


def copied_driver_env(driver_env: Mapping[str, str], prefixes: Sequence[str]) -> dict[str, str]:
    """Driver variables matching a prefix, minus every worker-specific one."""
    return {
        k: v for k, v in driver_env.items()
        if k.startswith(tuple(prefixes)) and k not in WORKER_SPECIFIC_VARS
    }


def plan_ranks(
    topology: Topology,
    platform: Platform,
    driver_ip: str,
    workers: Sequence[WorkerInfo],
    master_port: int,
    env_vars: Mapping[str, str] | None = None,
    driver_env: Mapping[str, str] | None = None,
    env_prefixes_to_copy: Sequence[str] = (),
    cpu_threads_per_worker: int | None = None,
    cpu_bind: bool = False,
    host_ip: str | None = None,
    set_visibility: bool = True,
) -> list[RankPlan]:
    """One RankPlan per rank (list index = rank).

    `master_port` must be free on rank 0's node; the caller finds it there after
    this ordering is known (use `order_workers` first) and passes it in.
    `set_visibility=False` leaves the visibility variable to the worker.
    """
    if len(workers) != topology.world_size:
        raise ValueError(
            f"{len(workers)} workers reported for a {topology.pp}x{topology.tp} layout "
            f"(world_size={topology.world_size})"
        )
    check_node_identity(workers)
    if platform.is_accelerator:
        missing = [i for i, w in enumerate(workers) if not w.device_ids]
        if missing:
            raise PlacementError(
                f"workers {missing} hold no {platform.resource_key} although device="
                f"{platform.name!r}; reserve devices with num_devices_per_worker >= 1 or use "
                f"a placement group whose bundles hold {platform.resource_key}"
            )

    order = order_workers(driver_ip, workers)
    visible = node_visible_devices(workers) if platform.is_accelerator else {}
    ranks_on_node: dict[str, list[int]] = defaultdict(list)
    for rank, index in enumerate(order):
        ranks_on_node[workers[index].node_id].append(rank)

    master_addr = workers[order[0]].node_ip
    base_env = copied_driver_env(driver_env or {}, env_prefixes_to_copy)
    base_env.update(env_vars or {})

    plans = []
    for rank, index in enumerate(order):
        w = workers[index]
        node_ranks = ranks_on_node[w.node_id]
        if platform.is_accelerator:
            local_rank = visible[w.node_id].index(w.device_ids[0])
        else:
            local_rank = node_ranks.index(rank)
        threads = cpu_threads_per_worker or max(1, w.node_cpus // len(node_ranks))
        cores = None
        if cpu_bind and not platform.is_accelerator:
            start = node_ranks.index(rank) * threads
            cores = tuple(sorted({(start + j) % w.node_cpus for j in range(threads)}))
        env = dict(base_env)
        env.update({
            "RANK": str(rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(topology.world_size),
            "LOCAL_WORLD_SIZE": str(len(node_ranks)),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
        })
        if platform.is_accelerator:
            if set_visibility:
                env[platform.visibility_var] = ",".join(visible[w.node_id])
        else:
            env["OMP_NUM_THREADS"] = str(threads)
        if host_ip is not None and w.node_ip == driver_ip:
            env["RAYEXEC_HOST_IP"] = host_ip
        plans.append(RankPlan(
            rank=rank, worker_index=index, local_rank=local_rank,
            pp_rank=topology.pp_rank(rank), tp_rank=topology.tp_rank(rank),
            node_id=w.node_id, node_ip=w.node_ip, device_ids=tuple(w.device_ids),
            visible_devices=visible.get(w.node_id, ()), cpu_threads=threads,
            cpu_cores=cores, env=env,
        ))
    return plans


def format_layout(plans: Sequence[RankPlan], platform: Platform) -> str:
    """A small table of the layout for logs and the CLI."""
    var = platform.visibility_var or "devices"
    lines = [f"{'rank':>4} {'pp':>3} {'tp':>3} {'local':>5}  {'node ip':<16} {var}"]
    for p in plans:
        devices = ",".join(p.visible_devices) if platform.is_accelerator else (
            f"cpu threads={p.cpu_threads}" + (f" cores={list(p.cpu_cores)}" if p.cpu_cores else "")
        )
        ids = f"{p.rank:>4} {p.pp_rank:>3} {p.tp_rank:>3} {p.local_rank:>5}"
        lines.append(f"{ids}  {p.node_ip:<16} {devices}")
    return "\n".join(lines)
