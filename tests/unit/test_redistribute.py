"""Redistribution planning (pure, no Ray): hand-checked plans for both planners,
single- and multi-node, and a property test that executing any plan, simulated in
Python, leaves every destination holding exactly what it asked for, with no rank
sending or receiving twice in a stage."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayexec.layout import Topology, WorkerInfo, plan_ranks
from rayexec.platform import CPU
from rayexec.redistribute import (
    Plan,
    Step,
    Tracker,
    node_map,
    pick_source,
    plan_broadcast,
    plan_gather_scatter,
    stage_steps,
)


def bcast(root, peers, ids, keys):
    return Step("broadcast", root, tuple(peers), (tuple(ids),) * len(peers), tuple(keys))


def items(*data_ids, keys=("x", "y")):
    return [(d, k) for d in data_ids for k in keys]


# ---- broadcast ----------------------------------------------------------------------------
def test_broadcast_merges_keys_and_splits_stages_where_a_rank_would_receive_twice():
    tracker = Tracker({0: items(0), 1: items(1)})
    plan = plan_broadcast(tracker, {2: [0, 1], 3: [0]})
    assert plan.stages == (
        (bcast(0, [2, 3], [0], ["x", "y"]),),
        (bcast(1, [2], [1], ["x", "y"]),),  # rank 2 already receives in stage 0
    )


def test_independent_broadcasts_share_a_stage():
    tracker = Tracker({0: [("a", "x")], 1: [("b", "x")]})
    plan = plan_broadcast(tracker, {2: ["a"], 3: ["b"]})
    assert plan.stages == ((bcast(0, [2], ["a"], ["x"]), bcast(1, [3], ["b"], ["x"])),)


def test_broadcast_skips_what_destinations_hold_and_ids_of_several_keys():
    tracker = Tracker({0: items("a"), 1: [("a", "x")]})
    # rank 1 holds ("a", "x") already: it receives only "y".
    plan = plan_broadcast(tracker, {1: ["a"], 0: ["a"]})
    assert plan.steps == [bcast(0, [1], ["a"], ["y"])]
    assert plan_broadcast(tracker, {0: ["a"]}).stages == ()


def test_broadcast_restricted_to_some_keys():
    tracker = Tracker({0: items("a", "b")})
    plan = plan_broadcast(tracker, {1: ["a", "b"]}, keys=["y"])
    assert plan.steps == [bcast(0, [1], ["a", "b"], ["y"])]


def two_node_layout():
    """Ranks 0,1 on 10.0.0.1 (the driver's node), ranks 2,3 on 10.0.0.2: a real
    layout from layout.plan_ranks."""
    workers = [WorkerInfo("nB", "10.0.0.2"), WorkerInfo("nA", "10.0.0.1"),
               WorkerInfo("nB", "10.0.0.2"), WorkerInfo("nA", "10.0.0.1")]
    plans = plan_ranks(Topology(1, 4), CPU, "10.0.0.1", workers, 29500)
    assert [p.node_ip for p in plans] == ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"]
    return plans


def test_node_map_reads_a_layout_or_a_mapping():
    assert node_map(two_node_layout(), [0, 3]) == {0: "10.0.0.1", 3: "10.0.0.2"}
    assert node_map(None, [1, 0]) == {0: "", 1: ""}
    with pytest.raises(ValueError, match=r"ranks \[5\] have no node"):
        node_map({0: "a"}, [0, 5])


def test_broadcast_source_on_the_destinations_node_beats_a_lower_rank():
    layout = two_node_layout()
    tracker = Tracker({0: [("w", "x")], 2: [("w", "x")]})
    # rank 3 (node B) needs it: rank 2 (node B) sends, not rank 0 (node A).
    assert plan_broadcast(tracker, {3: ["w"]}, nodes=layout).steps == [bcast(2, [3], ["w"], ["x"])]
    # rank 1 (node A) needs it: rank 0 sends.
    assert plan_broadcast(tracker, {1: ["w"]}, nodes=layout).steps == [bcast(0, [1], ["w"], ["x"])]
    # Without node information the lowest rank wins.
    assert plan_broadcast(tracker, {3: ["w"]}).steps == [bcast(0, [3], ["w"], ["x"])]


def test_broadcast_source_on_the_node_of_most_destinations():
    nodes = {0: "A", 1: "A", 2: "B", 3: "B", 4: "B"}
    tracker = Tracker({0: [("w", "x")], 2: [("w", "x")]})
    plan = plan_broadcast(tracker, {1: ["w"], 3: ["w"], 4: ["w"]}, nodes=nodes)
    assert plan.steps == [bcast(2, [1, 3, 4], ["w"], ["x"])]  # 2 of 3 on node B


def test_broadcast_among_equally_local_sources_takes_the_least_loaded():
    tracker = Tracker({0: [("a", "x"), ("b", "x"), ("c", "x")], 1: [("a", "x"), ("b", "x")]})
    plan = plan_broadcast(tracker, {2: ["a", "b", "c"], 3: ["a", "b"]})
    # a -> {2,3} from 0 (tie, lowest rank; load 0:2), b from 1 (load 1:2), c only from 0.
    assert plan.steps == [bcast(0, [2, 3], ["a"], ["x"]), bcast(1, [2, 3], ["b"], ["x"]),
                          bcast(0, [2], ["c"], ["x"])]
    assert [len(s) for s in plan.stages] == [1, 1, 1]  # each one receives on rank 2
    assert pick_source([0, 1], [2], {0: "A", 1: "A", 2: "A"}, {0: 3, 1: 1}) == 1


# ---- gather then scatter -----------------------------------------------------------------
def test_gather_scatter_through_the_best_root_merges_keys():
    tracker = Tracker({0: items(0), 1: items(1), 2: [(2, "x")]})
    plan = plan_gather_scatter(tracker, {3: [0, 1], 2: [0]})
    # Root: ranks 0 and 1 each hold 2 wanted items; the lower rank wins.
    assert plan.stages == (
        (Step("gather", 0, (1,), ((1,),), ("x", "y")),),
        (Step("scatter", 0, (2, 3), ((0,), (0, 1)), ("x", "y")),),
    )


def test_gather_scatter_keeps_steps_apart_when_ids_differ_per_key():
    tracker = Tracker({0: [("a", "x"), ("a", "y")], 1: [("b", "x")], 2: [("b", "y")]})
    plan = plan_gather_scatter(tracker, {3: ["a", "b"]}, root=0)
    assert plan.stages == (
        (Step("gather", 0, (1,), (("b",),), ("x",)),),
        (Step("gather", 0, (2,), (("b",),), ("y",)),),
        (Step("scatter", 0, (3,), (("a", "b"),), ("x", "y")),),
    )


def test_gather_scatter_skips_gathers_the_root_has_and_sends_the_root_nothing():
    tracker = Tracker({1: items("a", "b"), 2: items("a")})
    plan = plan_gather_scatter(tracker, {1: ["a", "b"], 2: ["a", "b"], 3: ["b"]}, root=1)
    assert plan.stages == ((Step("scatter", 1, (2, 3), (("b",), ("b",)), ("x", "y")),),)
    # A root that needs data only gathers it.
    plan = plan_gather_scatter(tracker, {0: ["a"]}, root=0)
    assert plan.stages == ((Step("gather", 0, (1,), (("a",),), ("x", "y")),),)
    assert plan_gather_scatter(tracker, {2: ["a"]}).stages == ()


def test_gather_prefers_a_holder_on_the_roots_node():
    layout = two_node_layout()
    tracker = Tracker({0: [("a", "x")], 2: [("a", "x")]})
    plan = plan_gather_scatter(tracker, {3: ["a"]}, root=3, nodes=layout)
    assert plan.steps == [Step("gather", 3, (2,), (("a",),), ("x",))]
    assert plan_gather_scatter(tracker, {3: ["a"]}, root=3).steps[0].peers == (0,)


# ---- errors and invariants ---------------------------------------------------------------
def test_asking_for_data_nobody_holds_names_it():
    tracker = Tracker({0: [("a", "x")]})
    with pytest.raises(ValueError, match=r"no rank holds 'zz' \(needed by \[1, 2\]\)"):
        plan_broadcast(tracker, {1: ["a", "zz"], 2: ["zz"]})
    with pytest.raises(ValueError, match="no rank holds 'a' key 'y'"):
        plan_gather_scatter(tracker, {1: ["a"]}, keys=["y"])


def test_tracker_rejects_a_step_whose_sender_lacks_the_data():
    tracker = Tracker({0: [("a", "x")]})
    with pytest.raises(ValueError, match=r"senders do not hold \[\(1, \('a', 'x'\)\)\]"):
        tracker.apply(bcast(1, [2], ["a"], ["x"]))
    tracker.apply(bcast(0, [2, 3], ["a"], ["x"]))
    assert tracker.holders(("a", "x")) == (0, 2, 3)


def test_a_stage_where_a_rank_receives_twice_is_refused():
    with pytest.raises(ValueError, match=r"rank\(s\) \[2\] receives more than once"):
        Plan(((bcast(0, [2], ["a"], ["x"]), bcast(1, [2], ["b"], ["x"])),))
    with pytest.raises(ValueError, match="same ids to every peer"):
        Step("broadcast", 0, (1, 2), (("a",), ("b",)), ("x",))


def test_process_groups_are_distinct_and_in_first_use_order():
    steps = [bcast(3, [1], ["a"], ["x"]), bcast(0, [2], ["b"], ["x"]),
             bcast(1, [3], ["c"], ["x"])]
    plan = Plan(stage_steps(steps))
    assert plan.process_groups() == [(1, 3), (0, 2)]


# ---- property: any plan delivers exactly what was asked ----------------------------------
@st.composite
def scenarios(draw):
    world = draw(st.integers(1, 6))
    nodes = {r: f"node{draw(st.integers(0, 2))}" for r in range(world)}
    ranks = st.integers(0, world - 1)
    holdings = defaultdict(set)
    data_ids = list(range(draw(st.integers(1, 5))))
    for d in data_ids:
        for key in draw(st.lists(st.sampled_from("abc"), min_size=1, unique=True)):
            for r in draw(st.lists(ranks, min_size=1, max_size=3, unique=True)):
                holdings[r].add((d, key))
    needs = {r: draw(st.lists(st.sampled_from(data_ids), unique=True))
             for r in draw(st.lists(ranks, unique=True))}
    root = draw(st.none() | ranks)
    return dict(holdings), needs, nodes, root


def simulate(plan, holdings):
    """Run the plan on per-rank stores of values. Within a stage every sender reads
    the state from before the stage (steps of a stage run concurrently)."""
    origin = {item: f"value of {item}" for items_ in holdings.values() for item in items_}
    store = {r: {i: origin[i] for i in items_} for r, items_ in holdings.items()}
    deliveries = Counter()
    for stage in plan.stages:
        before = {r: dict(s) for r, s in store.items()}
        for step in stage:
            for src, dst, item in step.moves():
                assert item in before.get(src, {}), f"{src} sends {item} it does not hold yet"
                assert item not in before.get(dst, {}), f"{dst} is sent {item} it already holds"
                store.setdefault(dst, {})[item] = before[src][item]
                deliveries[(dst, item)] += 1
    assert max(deliveries.values(), default=1) == 1, "an item was delivered twice"
    return store, origin


def check_stage_invariant(plan):
    for stage in plan.stages:
        sends = Counter(r for s in stage for r in s.senders)
        receives = Counter(r for s in stage for r in s.receivers)
        assert max(sends.values()) == 1 and max(receives.values()) == 1, stage


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_any_plan_delivers_exactly_what_was_asked(scenario):
    holdings, needs, nodes, root = scenario
    keys_of = defaultdict(set)
    for items_ in holdings.values():
        for d, k in items_:
            keys_of[d].add(k)
    asked = {r: {(d, k) for d in ids for k in keys_of[d]} for r, ids in needs.items()}

    plans = {"broadcast": plan_broadcast(Tracker(holdings), needs, nodes=nodes),
             "gather-scatter": plan_gather_scatter(Tracker(holdings), needs, root=root,
                                                   nodes=nodes)}
    for name, plan in plans.items():
        check_stage_invariant(plan)
        merge_keys = [(s.op, s.root, s.peers, s.ids) for s in plan.steps]
        assert len(merge_keys) == len(set(merge_keys)), f"{name}: unmerged steps"
        store, origin = simulate(plan, holdings)
        relay = plan.steps[0].root if name == "gather-scatter" and plan.steps else None
        for r in set(store) | set(asked):
            had, has = holdings.get(r, set()), set(store.get(r, {}))
            assert asked.get(r, set()) <= has, (name, r)
            assert all(store[r][i] == origin[i] for i in has)  # the right data
            if r != relay:  # only a gather root holds more than it asked for
                assert has == had | asked.get(r, set()), (name, r)
        tracker = Tracker(holdings)
        tracker.apply_plan(plan)
        assert tracker.snapshot() == {r: frozenset(s) for r, s in store.items() if s}

    for step in plans["broadcast"].steps:  # locality: no holder is nearer the receivers
        for item in step.items_of(step.peers[0]):
            holders = [r for r, items_ in holdings.items() if item in items_]
            near = {h: sum(nodes[p] == nodes[h] for p in step.peers) for h in holders}
            assert near[step.root] == max(near.values()), (step, near)
