"""Data redistribution planning: who holds which tensor, who needs it, and the
collective steps that move it there. Pure: no Ray, no torch.distributed.

Vocabulary:
  item      (data id, key): one tensor, e.g. (sample 7, "input_ids").
  holdings  rank -> items it holds; a `Tracker` keeps them and records moves.
  needs     rank -> data ids; a rank that needs a data id needs every key of it
            that some rank holds (or only the `keys` a planner is given).
  step      one collective over `root` and `peers`: "gather" (each peer sends its
            own items to root), "scatter" (root sends each peer its own items),
            "broadcast" (root sends the same items to every peer).
  stage     steps that may run at once: in a stage no rank sends twice and no rank
            receives twice.

Two planners, both skipping items a rank already holds:
  plan_gather_scatter  everything moves through one root: gather what the root
                       lacks, then scatter to each destination what it lacks;
                       steps with identical root, peers and ids are merged (their
                       keys travel together).
  plan_broadcast       each item goes straight from one holder to all the ranks
                       that lack it; the holder is the one on the same node as most
                       of them, then the least loaded; steps are packed into stages.

Not here: moving tensors or creating process groups (transfer.py does, from a
Plan); deciding ranks or nodes (layout.py; `node_map` reads its RankPlans).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

DataId = Hashable
Item = tuple[DataId, str]
"""(data id, key)."""
Move = tuple[int, int, Item]
"""(source rank, destination rank, item)."""
OPS = ("gather", "scatter", "broadcast")


@dataclass(frozen=True)
class Step:
    """One collective over the ranks `(root, *peers)`.

    `ids[i]` are the data ids that `peers[i]` sends to root (gather) or receives
    from it (scatter, broadcast; a broadcast's entries are all equal); every key in
    `keys` of each of those ids moves."""

    op: str
    root: int
    peers: tuple[int, ...]
    ids: tuple[tuple[DataId, ...], ...]
    keys: tuple[str, ...]

    def __post_init__(self) -> None:
        def fail(what: str) -> None:
            raise ValueError(f"invalid Step({self.op!r}, root={self.root}, peers={self.peers}, "
                             f"ids={self.ids}, keys={self.keys}): {what}")

        if self.op not in OPS:
            fail(f"op must be one of {list(OPS)}")
        if not self.peers or self.root in self.peers or len(set(self.peers)) != len(self.peers):
            fail("peers must be one or more distinct ranks other than root")
        if len(self.ids) != len(self.peers) or not all(self.ids) or not self.keys:
            fail("ids needs one non-empty tuple per peer, and keys must be non-empty")
        if self.op == "broadcast" and len(set(self.ids)) != 1:
            fail("a broadcast sends the same ids to every peer")

    @property
    def ranks(self) -> tuple[int, ...]:
        """The step's process group, sorted (torch.distributed sorts group ranks)."""
        return tuple(sorted((self.root, *self.peers)))

    @property
    def senders(self) -> tuple[int, ...]:
        return self.peers if self.op == "gather" else (self.root,)

    @property
    def receivers(self) -> tuple[int, ...]:
        return (self.root,) if self.op == "gather" else self.peers

    def items_of(self, peer: int) -> tuple[Item, ...]:
        """What `peer` sends (gather) or receives (scatter, broadcast), in wire order."""
        ids = self.ids[self.peers.index(peer)]
        return tuple(itertools.product(ids, self.keys))

    def moves(self) -> list[Move]:
        if self.op == "gather":
            return [(p, self.root, item) for p in self.peers for item in self.items_of(p)]
        return [(self.root, p, item) for p in self.peers for item in self.items_of(p)]

    def __str__(self) -> str:
        if self.op == "broadcast":
            return f"broadcast {list(self.ids[0])} x {list(self.keys)}: {self.root} -> " \
                   f"{list(self.peers)}"
        arrow = "<-" if self.op == "gather" else "->"
        parts = ", ".join(f"{p}: {list(ids)}" for p, ids in zip(self.peers, self.ids))
        return f"{self.op} {list(self.keys)}: {self.root} {arrow} {{{parts}}}"


@dataclass(frozen=True)
class Plan:
    """Stages of steps; the steps of one stage may run concurrently."""

    stages: tuple[tuple[Step, ...], ...] = ()

    def __post_init__(self) -> None:
        for i, stage in enumerate(self.stages):
            for role, ranks in (("sends", [r for s in stage for r in s.senders]),
                                ("receives", [r for s in stage for r in s.receivers])):
                twice = sorted(r for r, n in Counter(ranks).items() if n > 1)
                if twice:
                    raise ValueError(f"stage {i} is invalid: rank(s) {twice} {role} more than "
                                     f"once in {[str(s) for s in stage]}; split the stage")

    @property
    def steps(self) -> list[Step]:
        return [step for stage in self.stages for step in stage]

    def moves(self) -> list[Move]:
        return [m for step in self.steps for m in step.moves()]

    def process_groups(self) -> list[tuple[int, ...]]:
        """The distinct rank sets the steps run over, in first-use order: the order in
        which every rank must create them."""
        return list(dict.fromkeys(step.ranks for step in self.steps))

    def __str__(self) -> str:
        if not self.stages:
            return "empty plan (nothing to move)"
        return "\n".join(f"stage {i}: " + "; ".join(str(s) for s in stage)
                         for i, stage in enumerate(self.stages))


class Tracker:
    """Who holds which item. Built from rank -> items; `apply` records a step's moves
    after checking that every sender holds what it sends."""

    def __init__(self, holdings: Mapping[int, Iterable[Item]] | None = None) -> None:
        self._by_rank: dict[int, set[Item]] = defaultdict(set)
        self._by_item: dict[Item, set[int]] = defaultdict(set)
        self._keys: dict[DataId, set[str]] = defaultdict(set)
        for rank, items in (holdings or {}).items():
            self.add(rank, items)

    def add(self, rank: int, items: Iterable[Item]) -> None:
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str)):
                raise ValueError(f"rank {rank} holds {item!r}: an item must be a "
                                 f"(data id, key) pair with a str key")
            self._by_rank[rank].add(item)
            self._by_item[item].add(rank)
            self._keys[item[0]].add(item[1])

    def holds(self, rank: int, item: Item) -> bool:
        return item in self._by_rank.get(rank, ())

    def holders(self, item: Item) -> tuple[int, ...]:
        return tuple(sorted(self._by_item.get(item, ())))

    def items(self, rank: int) -> frozenset[Item]:
        return frozenset(self._by_rank.get(rank, ()))

    def keys_of(self, data_id: DataId) -> tuple[str, ...]:
        return tuple(sorted(self._keys.get(data_id, ())))

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted(r for r, items in self._by_rank.items() if items))

    def snapshot(self) -> dict[int, frozenset[Item]]:
        return {r: frozenset(items) for r, items in self._by_rank.items() if items}

    def copy(self) -> Tracker:
        return Tracker(self.snapshot())

    def apply(self, step: Step) -> None:
        missing = [(src, item) for src, _, item in step.moves() if not self.holds(src, item)]
        if missing:
            raise ValueError(f"cannot apply '{step}': senders do not hold {missing}. The plan "
                             f"was made from another state; plan again from this tracker")
        for _, dst, item in step.moves():
            self.add(dst, [item])

    def apply_plan(self, plan: Plan) -> None:
        for step in plan.steps:
            self.apply(step)


# ---- inputs ----------------------------------------------------------------------------
def node_map(nodes: Mapping[int, str] | Sequence[Any] | None, ranks: Iterable[int]
             ) -> dict[int, str]:
    """rank -> node from a plain mapping or from layout RankPlans (their node_ip);
    None puts every rank on one node."""
    ranks = sorted(set(ranks))
    if nodes is None:
        return dict.fromkeys(ranks, "")
    if not isinstance(nodes, Mapping):
        nodes = {p.rank: p.node_ip for p in nodes}
    missing = [r for r in ranks if r not in nodes]
    if missing:
        raise ValueError(f"ranks {missing} have no node in nodes={dict(nodes)}; give every rank "
                         f"that holds or needs data a node (e.g. the executor's layout)")
    return {r: nodes[r] for r in ranks}


def _wanted(tracker: Tracker, needs: Mapping[int, Iterable[DataId]],
            keys: Iterable[str] | None) -> dict[Item, list[int]]:
    """item -> ranks that need it and lack it (ascending), in a deterministic order:
    ranks ascending, then each rank's ids as given, then keys sorted."""
    keys = None if keys is None else tuple(sorted(set(keys)))
    wanted: dict[Item, list[int]] = {}
    unheld: dict[Item, list[int]] = defaultdict(list)
    for rank in sorted(needs):
        for data_id in dict.fromkeys(needs[rank]):
            for key in keys if keys is not None else tracker.keys_of(data_id) or ("*",):
                item = (data_id, key)
                if not tracker.holders(item):
                    unheld[item].append(rank)
                elif not tracker.holds(rank, item):
                    wanted.setdefault(item, []).append(rank)
    if unheld:
        held = sorted({str(i) for r in tracker.ranks for i in tracker.items(r)})
        what = "; ".join(f"{d!r}" + ("" if k == "*" else f" key {k!r}") + f" (needed by {r})"
                         for (d, k), r in unheld.items())
        raise ValueError(f"no rank holds {what}. Held items: {held}. Add the data to the "
                         f"tracker where it lives, or do not ask for it")
    return wanted


# ---- gather then scatter ------------------------------------------------------------------
def plan_gather_scatter(
    tracker: Tracker,
    needs: Mapping[int, Iterable[DataId]],
    root: int | None = None,
    keys: Iterable[str] | None = None,
    nodes: Mapping[int, str] | Sequence[Any] | None = None,
) -> Plan:
    """Gather what `root` lacks of the wanted items, then scatter to each destination
    what it lacks. `root` defaults to the rank that already holds most of the wanted
    items (then the lowest rank); of several holders of an item the gather takes the
    one on root's node (with `nodes`), then the lowest rank. Afterwards the root also
    holds everything it gathered."""
    wanted = _wanted(tracker, needs, keys)
    if not wanted:
        return Plan()
    if root is None:
        candidates = set(tracker.ranks) | set(needs)
        root = min(candidates, key=lambda r: (-sum(tracker.holds(r, i) for i in wanted), r))
    node_of = node_map(nodes, [root, *(r for i in wanted for r in tracker.holders(i))])

    gathers: dict[str, dict[int, list[DataId]]] = defaultdict(lambda: defaultdict(list))
    scatters: dict[str, dict[int, list[DataId]]] = defaultdict(lambda: defaultdict(list))
    for (data_id, key), dsts in wanted.items():
        if not tracker.holds(root, (data_id, key)):
            holders = tracker.holders((data_id, key))
            src = min(holders, key=lambda r: (node_of[r] != node_of[root], r))
            gathers[key][src].append(data_id)
        for dst in dsts:
            if dst != root:  # the gather already delivered the root's own needs
                scatters[key][dst].append(data_id)

    def steps(op: str, per_key: dict[str, dict[int, list[DataId]]]) -> list[Step]:
        merged: dict[tuple, list[str]] = {}
        for key in sorted(per_key):
            peers = tuple(sorted(per_key[key]))
            ids = tuple(tuple(per_key[key][p]) for p in peers)
            merged.setdefault((peers, ids), []).append(key)
        return [Step(op, root, peers, ids, tuple(ks)) for (peers, ids), ks in merged.items()]

    # Gathers must all finish before the scatters read the root's copies.
    plan = Plan(stage_steps(steps("gather", gathers)) + stage_steps(steps("scatter", scatters)))
    logger.debug("gather-scatter plan through root %d:\n%s", root, plan)
    return plan


# ---- broadcast ------------------------------------------------------------------------------
def pick_source(sources: Iterable[int], destinations: Sequence[int], node_of: Mapping[int, str],
                load: Mapping[int, int]) -> int:
    """The source on the same node as most destinations, then the least loaded, then
    the lowest rank."""
    return min(sources, key=lambda s: (-sum(node_of[d] == node_of[s] for d in destinations),
                                       load.get(s, 0), s))


def plan_broadcast(
    tracker: Tracker,
    needs: Mapping[int, Iterable[DataId]],
    nodes: Mapping[int, str] | Sequence[Any] | None = None,
    keys: Iterable[str] | None = None,
) -> Plan:
    """Each wanted item is broadcast from one holder (`pick_source`; load = how many
    destinations a source already serves) to every rank that lacks it. Items with the
    same source, destinations and key share a step; steps that then move the same ids
    to the same ranks merge their keys; steps are packed into stages."""
    wanted = _wanted(tracker, needs, keys)
    node_of = node_map(nodes, [r for i, dsts in wanted.items()
                               for r in (*tracker.holders(i), *dsts)])
    load: Counter[int] = Counter()
    grouped: dict[tuple[int, tuple[int, ...], str], list[DataId]] = defaultdict(list)
    for (data_id, key), dsts in wanted.items():
        src = pick_source(tracker.holders((data_id, key)), dsts, node_of, load)
        load[src] += len(dsts)
        grouped[(src, tuple(dsts), key)].append(data_id)
    merged: dict[tuple, list[str]] = {}
    for (src, dsts, key), ids in grouped.items():
        merged.setdefault((src, dsts, tuple(ids)), []).append(key)
    steps = [Step("broadcast", src, dsts, (ids,) * len(dsts), tuple(sorted(ks)))
             for (src, dsts, ids), ks in merged.items()]
    plan = Plan(stage_steps(steps))
    logger.debug("broadcast plan:\n%s", plan)
    return plan


def stage_steps(steps: Sequence[Step]) -> tuple[tuple[Step, ...], ...]:
    """Greedy packing, keeping the given order within and across stages: each stage
    takes every remaining step none of whose senders already sends in it and none of
    whose receivers already receives in it. Callers pass steps that do not depend on
    one another (each reads only what its senders held before the first stage)."""
    stages = []
    remaining = list(steps)
    while remaining:
        stage, rest, sending, receiving = [], [], set(), set()
        for step in remaining:
            if sending.intersection(step.senders) or receiving.intersection(step.receivers):
                rest.append(step)
                continue
            stage.append(step)
            sending.update(step.senders)
            receiving.update(step.receivers)
        stages.append(tuple(stage))
        remaining = rest
    return tuple(stages)
