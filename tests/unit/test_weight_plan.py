"""The weight-sync resharding planner: every destination byte exactly once, no bytes
sent that the destination's own process holds, replicas share the sending, clear
errors for mismatched layouts. Pure: no Ray, no torch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayexec.weights.plan import (
    WeightSpec,
    box_numel,
    intersect,
    plan_transfers,
    relative,
    schedule,
)

DT = {"float32": np.float32, "int16": np.int16}


def full_tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.integers(0, 1 << 15, size=s).astype(np.float32) for n, s in shapes.items()}


def slab(arr: np.ndarray, box) -> np.ndarray:
    return arr[tuple(slice(a, b) for a, b in box)]


@st.composite
def layouts(draw):
    names = draw(st.lists(st.sampled_from(list("abcde")), min_size=1, max_size=4, unique=True))
    shapes = {n: tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))
              for n in names}

    def spec(name: str, parts_max: int, index_of: int) -> WeightSpec:
        shape = shapes[name]
        dim = draw(st.none() | st.integers(0, len(shape) - 1))
        if dim is None:
            return WeightSpec(shape, "float32")
        parts = min(draw(st.integers(1, parts_max)), shape[dim])
        return WeightSpec(shape, "float32", dim, parts, index_of % parts)

    # Source: `replicas` DP copies of a layout of `group` ranks; per name one split
    # shared by the group (each rank part index = its position), so they cover.
    group = draw(st.integers(1, 3))
    replicas = draw(st.integers(1, 3))
    source: dict[int, dict[str, WeightSpec]] = {}
    for name in names:
        shape = shapes[name]
        dim = draw(st.none() | st.integers(0, len(shape) - 1))
        parts = 1 if dim is None else min(group, shape[dim])
        for rep in range(replicas):
            for g in range(group):
                spec_ = (WeightSpec(shape, "float32") if dim is None
                         else WeightSpec(shape, "float32", dim, parts, g % parts))
                source.setdefault(rep * group + g, {})[name] = spec_
    dst_ranks = draw(st.integers(1, 4))
    destination: dict[int, dict[str, WeightSpec]] = {r: {} for r in range(dst_ranks)}
    for name in names:
        for r in draw(st.lists(st.integers(0, dst_ranks - 1), min_size=1, unique=True)):
            destination[r][name] = spec(name, 4, r)
    return shapes, source, destination


@settings(max_examples=300, deadline=None)
@given(layouts(), st.integers(1, 64), st.booleans())
def test_reassembled_tensors_equal_the_full_ones(case, bucket_bytes, split_replicas):
    shapes, source, destination = case
    full = full_tensors(shapes)
    plan = plan_transfers(source, destination, split_replicas=split_replicas)
    got = {(r, n): np.full([b - a for a, b in s.box], np.nan, dtype=np.float32)
           for r, specs in destination.items() for n, s in specs.items()}
    count = {k: np.zeros(v.shape, dtype=int) for k, v in got.items()}
    for rounds in schedule(plan, bucket_bytes):
        srcs = [b.src for b in rounds]
        dsts = [b.dst for b in rounds]
        assert len(set(srcs)) == len(srcs) and len(set(dsts)) == len(dsts)
        for bucket in rounds:
            assert bucket.nbytes <= bucket_bytes or len(bucket.transfers) == 1
            for t in bucket.transfers:
                held = source[t.src][t.name].box
                assert intersect(held, t.box) == t.box  # the sender holds what it sends
                data = slab(slab(full[t.name], held), relative(t.box, held))
                need = destination[t.dst][t.name].box
                rel = tuple(slice(a, b) for a, b in relative(t.box, need))
                got[(t.dst, t.name)][rel] = data
                count[(t.dst, t.name)][rel] += 1
    for (r, n), arr in got.items():
        assert (count[(r, n)] == 1).all(), f"rank {r} {n}: bytes not delivered exactly once"
        np.testing.assert_array_equal(arr, slab(full[n], destination[r][n].box))


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_replicas_share_the_sending(case):
    shapes, source, destination = case
    plan = plan_transfers(source, destination)
    # Fully replicated sources: every piece is split among all of them, so their
    # loads differ by at most one piece's rounding per transfer.
    if all(s.dim is None for specs in source.values() for s in specs.values()) and \
            len(source) > 1:
        loads = plan.bytes_by_source()
        biggest = max(t.nbytes for t in plan.transfers)
        spread = max(loads.values()) - min(loads.values())
        assert spread <= biggest * len(destination) * len(shapes)
        total_cells = sum(box_numel(s.box) for specs in destination.values()
                          for s in specs.values())
        if total_cells >= 4 * len(source):
            assert min(loads.values()) > 0


def test_dp_replicas_split_one_tensor_evenly():
    src = {r: {"w": WeightSpec((8, 4), "float32")} for r in range(4)}
    dst = {0: {"w": WeightSpec((8, 4), "float32")}}
    plan = plan_transfers(src, dst)
    assert plan.bytes_by_source() == {0: 32, 1: 32, 2: 32, 3: 32}
    assert plan.wire_bytes == 8 * 4 * 4


def test_same_process_is_copied_not_sent():
    # Trainer TP2 and serving TP2 with the same split, rank i in one process with i.
    def tp(i):
        return {"w": WeightSpec((6, 4), "float32", 0, 2, i), "n": WeightSpec((4,), "float32")}
    plan = plan_transfers({0: tp(0), 1: tp(1)}, {0: tp(0), 1: tp(1)}, same_process={0: 0, 1: 1})
    assert plan.wire_bytes == 0
    assert all(t.local and t.src == t.dst for t in plan.transfers)
    assert schedule(plan, 16) == []


def test_tp2_to_pp2_moves_each_half_once():
    full = WeightSpec((4, 4), "float32")
    src = {i: {"a": WeightSpec((4, 4), "float32", 0, 2, i),
               "b": WeightSpec((4, 4), "float32", 1, 2, i)} for i in range(2)}
    dst = {0: {"a": full}, 1: {"b": full}}
    plan = plan_transfers(src, dst)
    assert plan.bytes_by_destination() == {0: 64, 1: 64}
    assert plan.bytes_by_source() == {0: 64, 1: 64}
    assert len(schedule(plan, 1024)) == 2


def test_name_on_one_side_is_named():
    w = WeightSpec((2,), "float32")
    with pytest.raises(ValueError, match=r"destination needs weight\(s\) \['extra'\]"):
        plan_transfers({0: {"w": w}}, {0: {"w": w, "extra": w}})
    with pytest.raises(ValueError, match=r"source holds weight\(s\) \['only_src'\]"):
        plan_transfers({0: {"w": w, "only_src": w}}, {0: {"w": w}})


def test_a_renamed_weight_names_both_names_and_their_ranks():
    w = WeightSpec((2,), "float32")
    with pytest.raises(ValueError, match=r"\['q'\] \(destination ranks \[1\]\) that no source "
                                         r"rank holds; the source holds \['query'\] \(source "
                                         r"ranks \[0, 1\]\)"):
        plan_transfers({0: {"w": w, "query": w}, 1: {"query": w}},
                       {0: {"w": w}, 1: {"w": w, "q": w}})


def test_shape_and_dtype_mismatch_name_both():
    with pytest.raises(ValueError, match=r"'w'.*\[4, 2\] float32.*\[4, 3\] float32"):
        plan_transfers({0: {"w": WeightSpec((4, 2), "float32")}},
                       {0: {"w": WeightSpec((4, 3), "float32")}})
    with pytest.raises(ValueError, match=r"'w'.*float32.*bfloat16"):
        plan_transfers({0: {"w": WeightSpec((4,), "float32")}},
                       {0: {"w": WeightSpec((4,), "bfloat16")}})


def test_uncovered_region_is_named():
    src = {0: {"w": WeightSpec((4, 4), "float32", 0, 2, 0)}}  # only the top half exists
    with pytest.raises(ValueError, match=r"'w': destination rank 0 needs .* region \[\[2, 4\]"):
        plan_transfers(src, {0: {"w": WeightSpec((4, 4), "float32")}})


def test_invalid_specs_name_the_field():
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        WeightSpec((4, 4), "float32", 2, 2, 0)
    with pytest.raises(ValueError, match="parts=5, index=0"):
        WeightSpec((4,), "float32", 0, 5, 0)
    with pytest.raises(ValueError, match="dtype='float8'"):
        WeightSpec((4,), "float8")
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        schedule(plan_transfers({0: {"w": WeightSpec((1,), "float32")}},
                                {0: {"w": WeightSpec((1,), "float32")}}), 0)
