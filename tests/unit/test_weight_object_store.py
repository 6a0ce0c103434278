"""The object-store route's pure parts: what each source puts per node (each tensor
once, whole where a node's ranks read all of it) and what each destination reads;
split_replicas=False sends each name from one replica. No Ray."""

from __future__ import annotations

import pytest

from rayexec.weights.object_store import collect_jobs, put_bytes, regions_by_source
from rayexec.weights.plan import WeightSpec, box_numel, plan_transfers

SHAPES = {"q": (8, 4), "o": (4, 8), "norm": (4,)}


def replicated(n: int) -> dict[int, dict[str, WeightSpec]]:
    return {r: {k: WeightSpec(s, "float32") for k, s in SHAPES.items()} for r in range(n)}


def tp(parts: int) -> dict[int, dict[str, WeightSpec]]:
    return {r: {"q": WeightSpec(SHAPES["q"], "float32", 0, parts, r),
                "o": WeightSpec(SHAPES["o"], "float32", 1, parts, r),
                "norm": WeightSpec(SHAPES["norm"], "float32")} for r in range(parts)}


def test_tp_ranks_on_one_node_read_one_whole_tensor_per_name():
    plan = plan_transfers(replicated(1), tp(2), split_replicas=False)
    regions = regions_by_source(plan, {0: "n1", 1: "n1"})
    assert regions == {0: {"n1": {"q": ((0, 8), (0, 4)), "o": ((0, 4), (0, 8)),
                                  "norm": ((0, 4),)}}}
    # Put once: the model's bytes, not the sum of what the ranks read (norm twice).
    assert put_bytes(regions, dict.fromkeys(SHAPES, 4)) == 4 * (32 + 32 + 4)
    assert sum(plan.bytes_by_destination().values()) == 4 * (32 + 32 + 4 + 4)


def test_each_node_gets_only_the_boxes_its_ranks_read():
    plan = plan_transfers(replicated(1), tp(2), split_replicas=False)
    regions = regions_by_source(plan, {0: "n1", 1: "n2"})
    assert regions[0]["n1"]["q"] == ((0, 4), (0, 4)) and regions[0]["n2"]["q"] == ((4, 8), (0, 4))
    assert regions[0]["n1"]["o"] == ((0, 4), (0, 4)) and regions[0]["n2"]["o"] == ((0, 4), (4, 8))


def test_replicas_send_whole_names_and_share_the_bytes():
    plan = plan_transfers(replicated(2), tp(2), split_replicas=False)
    senders = {}
    for t in plan.transfers:
        senders.setdefault(t.name, set()).add(t.src)
    assert all(len(s) == 1 for s in senders.values()), senders  # one replica per name
    assert {s for (src,) in senders.values() for s in [src]} == {0, 1}  # both replicas send
    # The default cuts each piece among the replicas instead.
    cut = plan_transfers(replicated(2), tp(2))
    assert len({t.src for t in cut.transfers if t.name == "q"}) == 2


def test_a_sharded_source_is_read_from_both_of_its_ranks():
    plan = plan_transfers(tp(2), replicated(1), split_replicas=False)
    regions = regions_by_source(plan, {0: "n1"})
    assert regions[0]["n1"]["q"] == ((0, 4), (0, 4)) and regions[1]["n1"]["q"] == ((4, 8), (0, 4))
    jobs = collect_jobs(plan, {0: {"n1": "ref0"}, 1: {"n1": "ref1"}}, {0: "n1"}, 3, True, 9.0)
    (job,) = jobs.values()
    reads = {ref: dict(r) for ref, r in job.parts}
    assert set(reads) == {"ref0", "ref1"} and job.version == 3 and job.stage
    covered = sum(box_numel(box) for r in reads.values() for box in r.values())
    assert covered == sum(box_numel(s.box) for s in replicated(1)[0].values())


@pytest.mark.parametrize("dst", [tp(2), replicated(3)])
def test_every_destination_rank_gets_a_job(dst):
    plan = plan_transfers(replicated(1), dst, split_replicas=False)
    node_of = dict.fromkeys(dst, "n1")
    jobs = collect_jobs(plan, {0: {"n1": "ref"}}, node_of, 1, False, 1.0)
    assert sorted(jobs) == sorted(dst)
