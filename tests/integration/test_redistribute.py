"""Executing redistribution plans on 4 CPU workers with torch.distributed (gloo):
a broadcast plan on a WorkerGroup and a gather-then-scatter plan on a
RayDistributedExecutor. Each rank's tensors are read back and compared by value,
dtype and shape, and the tracker must agree with what the workers hold."""

from __future__ import annotations

import pytest
import torch

from rayexec import ExecutorConfig, RayDistributedExecutor
from rayexec.group import WorkerGroup
from rayexec.redistribute import Tracker, plan_broadcast, plan_gather_scatter
from rayexec.resources import ResourceConfig
from rayexec.transfer import execute_plan, held_tensors
from tests.workers import RecordingWorker

KEYS = ("emb", "half", "ids", "mask")
TIMEOUT_S = 60.0
# Data 1 is held twice (ranks 0 and 2); rank 3 holds nothing at first.
HOLDINGS = {0: [(d, k) for d in (0, 1) for k in KEYS],
            1: [(2, k) for k in KEYS],
            2: [(1, k) for k in KEYS]}
NEEDS = {1: [0], 2: [0, 2], 3: [0, 1, 2]}


def make_tensor(data_id: int, key: str) -> torch.Tensor:
    """Distinct values per (data id, key), in dtypes of 1, 2, 4 and 8 bytes and odd
    lengths, so that packed buffers put tensors at unaligned offsets."""
    if key == "emb":
        return torch.full((data_id + 1, 3), float(data_id)) + torch.arange(3) * 0.5
    if key == "half":
        return torch.arange(3, dtype=torch.bfloat16) + data_id
    if key == "ids":
        return torch.arange(data_id + 2, dtype=torch.int64) + 100 * data_id
    return torch.arange(data_id + 3) % 2 == data_id % 2


# Run inside the workers (RecordingWorker keeps its rank as .rank).
def seed(worker, holdings):
    held = held_tensors(worker)
    held.clear()
    for data_id, key in holdings.get(worker.rank, []):
        held[(data_id, key)] = make_tensor(data_id, key)


def dump(worker):
    return dict(held_tensors(worker))


def expected_holdings(final: dict[int, frozenset]) -> list[set]:
    return [set(final.get(r, ())) for r in range(4)]


def check_values(dumps: list[dict], wanted: list[set]) -> None:
    for rank, (held, items) in enumerate(zip(dumps, wanted)):
        assert set(held) == items, rank
        for data_id, key in items:
            got, want = held[(data_id, key)], make_tensor(data_id, key)
            assert got.dtype == want.dtype and got.shape == want.shape, (rank, data_id, key)
            assert torch.equal(got, want), (rank, data_id, key, got, want)


@pytest.fixture
def group(local_ray, no_leaks):
    group = WorkerGroup.from_config(RecordingWorker, None,
                                    ResourceConfig(num_workers=4, cpus_per_worker=0.5))
    try:
        group.run(seed, args=(HOLDINGS,))
        yield group
    finally:
        group.shutdown()


def test_broadcast_plan_moves_the_right_tensors(group):
    # A tracker out of step with the workers is refused before anything moves.
    stale = Tracker({**HOLDINGS, 3: [(9, "emb")]})  # rank 3 holds no such tensor
    with pytest.raises(ValueError, match=r"do not hold \(rank, item\): \[\(3, \(9, 'emb'\)\)\]"):
        execute_plan(group, plan_broadcast(stale, {0: [9]}), stale, timeout=TIMEOUT_S)
    assert stale.holders((9, "emb")) == (3,)  # not recorded as moved

    tracker = Tracker(HOLDINGS)
    # Ranks 2 and 3 pretend to share a node: data 1 must come from rank 2, not rank 0.
    nodes = {0: "A", 1: "A", 2: "B", 3: "B"}
    plan = plan_broadcast(tracker, NEEDS, nodes=nodes)
    assert [s.root for s in plan.steps if s.ids[0] == (1,)] == [2]
    assert len(plan.stages) > 1  # rank 3 receives from several sources: several stages

    execute_plan(group, plan, tracker, timeout=TIMEOUT_S)

    wanted = expected_holdings(tracker.snapshot())
    assert wanted == [set(HOLDINGS[0]), {*HOLDINGS[1], *((0, k) for k in KEYS)},
                      {*HOLDINGS[2], *((d, k) for d in (0, 2) for k in KEYS)},
                      {(d, k) for d in (0, 1, 2) for k in KEYS}]
    check_values(group.run(dump), wanted)

    # Planned again from the updated tracker: nothing is left to move.
    assert plan_broadcast(tracker, NEEDS, nodes=nodes).stages == ()


def test_gather_scatter_plan_on_an_executor(local_ray, no_leaks):
    config = ExecutorConfig(worker_cls=RecordingWorker, tensor_parallel_size=4, device="cpu",
                            num_devices_per_worker=0.5, forward="rpc")
    with RayDistributedExecutor(config) as executor:
        executor.collective_rpc(seed, args=(HOLDINGS,))
        tracker = Tracker(HOLDINGS)
        plan = plan_gather_scatter(tracker, NEEDS, root=3, nodes=executor.layout)
        # One gather (all keys merged) from ranks 0 and 1, one scatter to ranks 1 and 2.
        assert [(s.op, s.peers, s.ids) for s in plan.steps] == [
            ("gather", (0, 1), ((0, 1), (2,))), ("scatter", (1, 2), ((0,), (0, 2)))]

        execute_plan(executor, plan, tracker, timeout=TIMEOUT_S)

        wanted = expected_holdings(tracker.snapshot())
        # The root (3) asked for everything; the others get what they lacked.
        assert wanted[3] == {(d, k) for d in (0, 1, 2) for k in KEYS}
        assert wanted[1] == {*HOLDINGS[1], *((0, k) for k in KEYS)}
        assert wanted[2] == {*HOLDINGS[2], *((d, k) for d in (0, 2) for k in KEYS)}
        check_values(executor.collective_rpc(dump), wanted)
