"""Executing a redistribution Plan: torch.distributed collectives among the workers
of a WorkerGroup or RayDistributedExecutor, driven from the driver.

Worker-side convention: a worker keeps the tensors it holds in a dict attribute
`held_tensors`, (data id, key) -> torch.Tensor; `held_tensors(worker)` returns it
(creating an empty one on a worker that has none). Received tensors are written
there; nothing is removed (a gather root keeps what it relayed).

`execute_plan(target, plan, tracker)`, on the driver:
  1. asks the workers for the shape, dtype and device of every item the plan sends,
     and checks that each sender holds what the plan says;
  2. picks the backend from the tensors' device: gloo for CPU, nccl for CUDA;
  3. makes one call on every rank (all ranks, since creating a process group
     involves every rank of the default group), which:
       - initialises the default process group from the RANK / WORLD_SIZE /
         MASTER_ADDR / MASTER_PORT environment rayexec gave the worker, unless the
         worker already did;
       - creates the plan's process groups up front, every rank in the same order
         (`Plan.process_groups`), as torch.distributed.new_group requires;
       - runs the stages: starts its collectives of a stage asynchronously, waits
         for them, then goes on to the next stage;
  4. records the moves in the tracker.

Each step is one collective over its ranks, carrying one uint8 buffer that packs
the step's tensors (receivers know every shape from step 1, so they unpack without
another round): broadcast, gather (peers -> root) or scatter (root -> peers).
gather/scatter need equal-sized buffers from every member, so buffers are padded
to the step's largest; a step that mixes very uneven amounts wastes that padding.
No point-to-point send/recv: the three collectives cover every step kind and gloo
and NCCL both implement them on subgroups.

Not here: deciding what moves (redistribute.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from rayexec.executor import RayDistributedExecutor
from rayexec.group import WorkerGroup
from rayexec.redistribute import Item, Plan, Step, Tracker

logger = logging.getLogger(__name__)

HELD_TENSORS = "held_tensors"
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    """Device type: "cpu" or "cuda"."""

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def held_tensors(worker: Any) -> dict[Item, torch.Tensor]:
    """The worker's (data id, key) -> tensor dict, created empty when missing."""
    held = getattr(worker, HELD_TENSORS, None)
    if held is None:
        held = {}
        setattr(worker, HELD_TENSORS, held)
    elif not isinstance(held, dict):
        raise TypeError(f"{type(worker).__name__}.{HELD_TENSORS} is a {type(held).__name__}; "
                        f"rayexec.transfer expects a dict (data id, key) -> torch.Tensor")
    return held


# ---- driver side ----------------------------------------------------------------------------
def execute_plan(target: Any, plan: Plan, tracker: Tracker, timeout: float | None = None) -> None:
    """Run `plan` on the workers of `target` (a WorkerGroup or RayDistributedExecutor)
    and record its moves in `tracker`. `timeout` bounds each call (default: the
    config's rpc_timeout_s)."""
    if not plan.stages:
        return
    run, world_size = _caller(target, timeout)
    outside = sorted({r for step in plan.steps for r in step.ranks if r >= world_size})
    if outside:
        raise ValueError(f"the plan uses ranks {outside} but the workers are ranks "
                         f"0..{world_size - 1}; plan with the workers' ranks")
    sent = {item for step in plan.steps for _, _, item in step.moves()}
    reports = run(_describe, (sorted(sent, key=repr),))
    meta = _check_senders(plan, reports)
    devices = sorted({m.device for m in meta.values()})
    if len(devices) != 1 or devices[0] not in BACKENDS:
        raise ValueError(f"the plan moves tensors on devices {devices}; a plan runs on one "
                         f"backend ({BACKENDS}): move the tensors to one device kind first")
    backend = BACKENDS[devices[0]]
    logger.info("executing a %d-stage redistribution plan over %s", len(plan.stages), backend)
    results = run(_execute, (plan, meta, backend, world_size))
    for position, (rank, received) in enumerate(results):
        if rank != position:
            raise RuntimeError(
                f"the worker at rank {position} has torch.distributed rank {rank}: its process "
                f"group was initialised with another rank order. Initialise it with the rank "
                f"rayexec gives the worker (the rank kwarg, or RANK in its environment)")
        expected = sorted((repr(i) for _, dst, i in plan.moves() if dst == rank))
        got = sorted(repr(i) for i in received)
        if got != expected:
            raise RuntimeError(
                f"rank {rank} received pieces {got} but the plan sends it {expected}: the "
                f"workers ran different plans (execute_plan must get the same plan on every "
                f"rank; rebuild it with plan_redistribution and retry)")
    tracker.apply_plan(plan)


def _caller(target: Any, timeout: float | None) -> tuple[Any, int]:
    """(call fn(worker, *args) on every rank -> results in rank order, world size)."""
    if not isinstance(target, (RayDistributedExecutor, WorkerGroup)):
        raise TypeError(f"execute_plan runs on a WorkerGroup or RayDistributedExecutor, "
                        f"got {type(target).__name__}")
    timeout = target.config.rpc_timeout_s if timeout is None else timeout
    if isinstance(target, RayDistributedExecutor):
        return (lambda fn, args: target.collective_rpc(fn, args, timeout=timeout),
                target.world_size)
    return (lambda fn, args: target.run(fn, args, timeout=timeout)), len(target.actors)


def _check_senders(plan: Plan, reports: list[dict[Item, TensorMeta]]) -> dict[Item, TensorMeta]:
    """Metadata of every sent item; a ValueError when a sender lacks what it must
    send (an item it receives earlier in the plan does not count as lacking)."""
    meta: dict[Item, TensorMeta] = {}
    for held in reports:
        for item, m in held.items():
            meta.setdefault(item, m)
    arrived: set[tuple[int, Item]] = set()
    lacking = []
    for step in plan.steps:
        for src, dst, item in step.moves():
            if (src, item) not in arrived and item not in reports[src]:
                lacking.append((src, item))
            arrived.add((dst, item))
    if lacking:
        raise ValueError(f"the plan sends items that the workers do not hold (rank, item): "
                         f"{lacking}. The tracker is out of step with the workers' "
                         f"{HELD_TENSORS}; rebuild it from what they hold and plan again")
    return meta


# ---- worker side ------------------------------------------------------------------------------
# These run inside the worker actors (passed by reference to execute_method).

def _describe(worker: Any, items: list[Item]) -> dict[Item, TensorMeta]:
    held = held_tensors(worker)
    return {i: TensorMeta(tuple(held[i].shape), held[i].dtype, held[i].device.type)
            for i in items if i in held}


_groups: dict[tuple[str, tuple[int, ...]], Any] = {}
_groups_world: list[Any] = [None]  # the default group the cached groups belong to


def _process_groups(plan: Plan, backend: str) -> dict[tuple[int, ...], Any]:
    import torch.distributed as dist

    if _groups_world[0] is not dist.group.WORLD:  # a new default group: old ones are gone
        _groups.clear()
        _groups_world[0] = dist.group.WORLD
    # Every rank runs this with the same plan and the same cache, so every rank
    # creates the same new groups in the same order.
    for ranks in plan.process_groups():
        if (backend, ranks) not in _groups:
            _groups[(backend, ranks)] = dist.new_group(list(ranks), backend=backend)
    return {ranks: _groups[(backend, ranks)] for ranks in plan.process_groups()}


def _execute(worker: Any, plan: Plan, meta: dict[Item, TensorMeta], backend: str,
             world_size: int) -> tuple[int, list[Item]]:
    """(this rank, the items it received)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        # device_id binds an NCCL group to this rank's GPU (the current device rayexec
        # set) instead of letting NCCL guess it from the rank.
        device_id = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                     else None)
        dist.init_process_group(backend, init_method="env://", device_id=device_id)
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"the default process group has world size {dist.get_world_size()} "
                           f"but the workers are {world_size}; initialise it over all workers")
    rank = dist.get_rank()
    groups = _process_groups(plan, backend)
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    held = held_tensors(worker)
    received: list[Item] = []
    for stage in plan.stages:
        started = [_start(step, rank, groups[step.ranks], held, meta, device)
                   for step in stage if rank in step.ranks]
        for work, finish in started:
            work.wait()
            received += finish()
    return rank, received


def _pack(tensors: list[torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    """One uint8 buffer of `size` bytes: the tensors' bytes in order, zero padded."""
    parts = [t.detach().to(device).contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    used = sum(p.numel() for p in parts)
    parts.append(torch.zeros(size - used, dtype=torch.uint8, device=device))
    return torch.cat(parts)


def _unpack(buf: torch.Tensor, items: tuple[Item, ...], meta: dict[Item, TensorMeta],
            held: dict[Item, torch.Tensor]) -> list[Item]:
    offset = 0
    for item in items:
        m = meta[item]
        # clone: a fresh, aligned storage of its own, so view(dtype) is legal and the
        # tensor does not keep the whole buffer alive.
        held[item] = buf[offset:offset + m.nbytes].clone().view(m.dtype).reshape(m.shape)
        offset += m.nbytes
    return list(items)


def _start(step: Step, rank: int, group: Any, held: dict[Item, torch.Tensor],
           meta: dict[Item, TensorMeta], device: torch.device) -> tuple[Any, Any]:
    """Start this rank's part of `step`: (work to wait for, callable that stores what
    arrived and returns the received items)."""
    import torch.distributed as dist

    def nbytes(items: tuple[Item, ...]) -> int:
        return sum(meta[i].nbytes for i in items)

    if step.op == "broadcast":
        items = step.items_of(step.peers[0])
        size = max(1, nbytes(items))
        buf = (_pack([held[i] for i in items], size, device) if rank == step.root
               else torch.empty(size, dtype=torch.uint8, device=device))
        work = dist.broadcast(buf, src=step.root, group=group, async_op=True)
        return work, (lambda: [] if rank == step.root else _unpack(buf, items, meta, held))

    # gather / scatter: one equal-sized slot per member of the group, in group-rank
    # order (= ascending global rank); the root's own slot is padding.
    size = max(1, *(nbytes(step.items_of(p)) for p in step.peers))
    slot = {r: (step.items_of(r) if r != step.root else ()) for r in step.ranks}
    if step.op == "gather":
        if rank == step.root:
            slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in step.ranks]
            work = dist.gather(torch.zeros(size, dtype=torch.uint8, device=device), slots,
                               dst=step.root, group=group, async_op=True)
            return work, lambda: [i for r, buf in zip(step.ranks, slots)
                                  for i in _unpack(buf, slot[r], meta, held)]
        mine = _pack([held[i] for i in slot[rank]], size, device)
        return dist.gather(mine, None, dst=step.root, group=group, async_op=True), lambda: []
    out = torch.empty(size, dtype=torch.uint8, device=device)
    slots = ([_pack([held[i] for i in slot[r]], size, device) for r in step.ranks]
             if rank == step.root else None)
    work = dist.scatter(out, slots, src=step.root, group=group, async_op=True)
    return work, ((lambda: []) if rank == step.root
                  else lambda: _unpack(out, slot[rank], meta, held))
