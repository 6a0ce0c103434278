"""ResourceConfig: what a group of workers reserves, checked against the cluster.

A frozen, validated description of per-worker accelerators (GPU, NPU or none),
CPUs and memory, the number of workers, accelerators per node and the placement
strategy; `from_total` splits totals over workers. `validate_available` compares
the request with the live cluster's free resources and names every shortfall
(needed vs free, per resource) before any placement group exists. It maps onto the
executor's config with `executor_fields()`, so SPMD groups (group.py) and the
inference executor place workers the same way. No Ray calls except in
`validate_available` with no argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rayexec.cluster import free_resources_per_node, total_resources_per_node
from rayexec.config import PLACEMENT_STRATEGIES, ExecutorConfig
from rayexec.diagnosis import describe_request, placement_shortfalls
from rayexec.errors import PlacementError
from rayexec.platform import Platform

ACCELERATORS = {"GPU": "cuda", "NPU": "npu", None: "cpu"}


@dataclass(frozen=True, kw_only=True)
class ResourceConfig:
    num_workers: int = 1
    """Workers (actors) in the group: one per bundle."""
    accelerator: str | None = None
    """Ray resource each worker holds devices of: "GPU", "NPU", or None for CPU-only."""
    accelerators_per_worker: float = 1.0
    """Devices per worker (a fraction below 1 shares a device); ignored without an
    accelerator."""
    cpus_per_worker: float = 1.0
    """Logical CPUs per worker."""
    memory_per_worker: int | None = None
    """Bytes of Ray memory per worker; None reserves none."""
    accelerators_per_node: int | None = None
    """Devices each node contributes; when set, the group needs
    ceil(total / per node) nodes that each have that many free."""
    placement_strategy: str = "PACK"
    """PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (Ray's strategies)."""
    placement_group_name: str | None = None
    """Name of the group; a live group with this name is reused."""
    pg_ready_timeout_s: float = 60.0
    """Seconds to wait for the group to be ready."""

    def __post_init__(self) -> None:
        def fail(name: str, allowed: str) -> None:
            raise ValueError(f"ResourceConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) \
                or self.num_workers < 1:
            fail("num_workers", "expected an integer >= 1")
        if self.accelerator not in ACCELERATORS:
            fail("accelerator", 'expected "GPU", "NPU" or None')
        a = self.accelerators_per_worker
        if not isinstance(a, (int, float)) or a <= 0 or (a > 1 and a != int(a)):
            fail("accelerators_per_worker", "expected a fraction in (0, 1] or a whole number")
        if not isinstance(self.cpus_per_worker, (int, float)) or self.cpus_per_worker < 0:
            fail("cpus_per_worker", "expected a number >= 0")
        if self.accelerator is None and self.cpus_per_worker <= 0:
            fail("cpus_per_worker", "a CPU-only worker must reserve some CPU (> 0)")
        if self.memory_per_worker is not None and (
                not isinstance(self.memory_per_worker, int) or self.memory_per_worker <= 0):
            fail("memory_per_worker", "expected None or bytes > 0")
        if self.accelerators_per_node is not None and (
                not isinstance(self.accelerators_per_node, int) or self.accelerators_per_node < 1):
            fail("accelerators_per_node", "expected None or an integer >= 1")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            fail("placement_strategy", f"expected one of Ray's strategies "
                                       f"{list(PLACEMENT_STRATEGIES)}")
        if isinstance(self.pg_ready_timeout_s, bool) or not isinstance(
                self.pg_ready_timeout_s, (int, float)) or self.pg_ready_timeout_s <= 0:
            fail("pg_ready_timeout_s", "expected a number of seconds > 0 (not a string)")

    @classmethod
    def from_total(
        cls,
        total_accelerators: float,
        total_cpus: float,
        total_memory: int | None,
        num_workers: int,
        accelerator: str | None = "GPU",
        **kwargs: Any,
    ) -> ResourceConfig:
        """Split cluster-wide totals evenly over `num_workers`."""
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers={num_workers!r} is invalid: expected an integer >= 1")
        per_acc = total_accelerators / num_workers if accelerator else 1.0
        if accelerator and per_acc > 1 and per_acc != int(per_acc):
            raise ValueError(
                f"total_accelerators={total_accelerators} does not split evenly over "
                f"num_workers={num_workers} ({per_acc:g} each); use a multiple of {num_workers}"
            )
        return cls(
            num_workers=num_workers, accelerator=accelerator, accelerators_per_worker=per_acc,
            cpus_per_worker=total_cpus / num_workers,
            memory_per_worker=None if not total_memory else total_memory // num_workers,
            **kwargs,
        )

    @classmethod
    def for_executor(cls, config: ExecutorConfig, platform: Platform) -> ResourceConfig:
        """The reservation an ExecutorConfig asks for on `platform`."""
        accelerator = None if platform.resource_key == "CPU" else platform.resource_key
        return cls(
            num_workers=config.world_size, accelerator=accelerator,
            accelerators_per_worker=config.num_devices_per_worker,
            cpus_per_worker=(config.num_cpus_per_worker if accelerator
                             else config.num_cpus_per_worker + config.num_devices_per_worker),
            memory_per_worker=config.memory_per_worker,
            placement_strategy=config.placement_strategy,
            placement_group_name=config.placement_group_name,
            pg_ready_timeout_s=config.pg_ready_timeout_s,
        )

    @property
    def device(self) -> str:
        return ACCELERATORS[self.accelerator]

    def bundle(self) -> dict[str, float]:
        """One worker's reservation."""
        bundle: dict[str, float] = {}
        if self.accelerator:
            bundle[self.accelerator] = float(self.accelerators_per_worker)
        if self.cpus_per_worker:
            bundle["CPU"] = float(self.cpus_per_worker)
        if self.memory_per_worker:
            bundle["memory"] = float(self.memory_per_worker)
        return bundle

    def required(self) -> dict[str, float]:
        """Totals over all workers."""
        return {k: v * self.num_workers for k, v in self.bundle().items()}

    def shortfalls(
        self, free_per_node: Mapping[str, Mapping[str, float]], word: str = "free"
    ) -> list[str]:
        """Each reason the request does not fit `free_per_node` (node -> resources)."""
        reasons = placement_shortfalls([self.bundle()] * self.num_workers,
                                       self.placement_strategy, free_per_node, word)
        if self.accelerator and self.accelerators_per_node:
            total = self.accelerators_per_worker * self.num_workers
            nodes_needed = math.ceil(total / self.accelerators_per_node)
            able = [n for n, res in free_per_node.items()
                    if res.get(self.accelerator, 0) + 1e-9 >= self.accelerators_per_node]
            if len(able) < nodes_needed:
                reasons.append(
                    f"{total:g} {self.accelerator} at {self.accelerators_per_node} per node need "
                    f"{nodes_needed} node(s) with {self.accelerators_per_node} {word}; "
                    f"{len(able)} have that")
        return reasons

    def validate_available(
        self, cluster: Mapping[str, Mapping[str, float]] | None = None, capacity: bool = False
    ) -> None:
        """PlacementError naming every shortfall, needed vs free per resource.

        `cluster` is node -> free resources; None reads the live Ray cluster's free
        resources, or with `capacity=True` what its nodes hold in total (a request
        that fails that check can never be placed)."""
        word = "in all" if capacity else "free"
        if cluster is None:
            cluster = (total_resources_per_node() if capacity
                       else free_resources_per_node())
        reasons = self.shortfalls(cluster, word)
        if reasons:
            have = {k: sum(r.get(k, 0) for r in cluster.values()) for k in self.required()}
            short = [f"{k} needed {v:g} vs {have[k]:g} {word}"
                     for k, v in self.required().items() if have[k] + 1e-9 < v]
            head = (f"not enough resources for {self.num_workers} worker(s): {', '.join(short)}"
                    if short else
                    f"cannot place {self.num_workers} worker(s) with {self.placement_strategy}")
            raise PlacementError(
                head + ". "
                + describe_request([self.bundle()] * self.num_workers,
                                             self.placement_strategy, cluster, word)
                + " Cannot be placed: " + "; ".join(reasons) + ". Fix: ask for fewer workers or "
                "smaller ones, free resources, or add nodes."
            )

    def executor_fields(self) -> dict[str, Any]:
        """The ExecutorConfig fields that express the same reservation."""
        extra_cpus = self.cpus_per_worker if self.accelerator else 0.0
        return dict(
            device=self.device,
            num_devices_per_worker=(self.accelerators_per_worker if self.accelerator
                                    else self.cpus_per_worker),
            num_cpus_per_worker=extra_cpus,
            memory_per_worker=self.memory_per_worker,
            placement_strategy=self.placement_strategy,
            placement_group_name=self.placement_group_name,
            pg_ready_timeout_s=float(self.pg_ready_timeout_s),
        )
