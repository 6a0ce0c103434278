"""Resharding plans for weight sync: which source rank sends which slice of which
named tensor to which destination rank, and in which rounds. Pure: no Ray, no torch.

Vocabulary:
  spec      `WeightSpec`: a tensor's full shape, dtype and the part of it a rank
            holds (source) or needs (destination): replicated, or split along `dim`
            into `parts` nearly equal parts (the first `shape[dim] % parts` one
            longer, like numpy.array_split), part `index`.
  box       a region of the full tensor, one (start, stop) per dim.
  layout    rank -> name -> WeightSpec, for the source (what each trainer rank holds)
            or the destination (what each serving rank needs).
  transfer  one box of one name from a source rank to a destination rank; `local`
            when the two ranks are one process (declared with `same_process`), so
            it is a copy, not a message.
  bucket    transfers of one (source, destination) pair packed up to bucket_bytes.
  round     buckets that run at once: each source sends at most one bucket and each
            destination receives at most one, so a rank holds at most one bucket
            of each role at a time.

`plan_transfers` cuts every needed box along the edges of the source boxes that
cover it, so each destination byte comes from exactly one transfer; a piece held
by several sources (DP replicas) is split among them along its longest dim, each
part to the least loaded holder, so replicas share the sending. `schedule` packs
a plan into buckets and rounds.

Not here: moving bytes (weights/sync.py) or asking workers what they hold.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Box = tuple[tuple[int, int], ...]
DTYPE_BYTES = {"float64": 8, "float32": 4, "int64": 8, "int32": 4, "bfloat16": 2,
               "float16": 2, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def split_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` of `size` split into `parts` (array_split rule)."""
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class WeightSpec:
    """The part of a full tensor a rank holds or needs."""

    shape: tuple[int, ...]
    dtype: str
    dim: int | None = None
    """None: the whole tensor (replicated); else the split dimension."""
    parts: int = 1
    index: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"WeightSpec dtype={self.dtype!r}: expected one of "
                             f"{sorted(DTYPE_BYTES)} (torch dtype names without 'torch.')")
        if any(s < 0 for s in self.shape):
            raise ValueError(f"WeightSpec shape={self.shape}: sizes must be >= 0")
        if self.dim is None:
            if (self.parts, self.index) != (1, 0):
                raise ValueError(f"WeightSpec parts={self.parts}, index={self.index} need a "
                                 f"split dim; give dim=, or parts=1, index=0 for replicated")
            return
        if not 0 <= self.dim < len(self.shape):
            raise ValueError(f"WeightSpec dim={self.dim} is out of range for shape "
                             f"{self.shape}")
        if not 1 <= self.parts <= max(1, self.shape[self.dim]) or not 0 <= self.index < self.parts:
            raise ValueError(f"WeightSpec parts={self.parts}, index={self.index} on dim "
                             f"{self.dim} of shape {self.shape}: need 1 <= parts <= "
                             f"{self.shape[self.dim]} and 0 <= index < parts")

    @property
    def box(self) -> Box:
        return tuple(split_range(s, self.parts, self.index) if d == self.dim else (0, s)
                     for d, s in enumerate(self.shape))

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def describe(self) -> str:
        how = "replicated" if self.dim is None else \
            f"dim {self.dim} part {self.index}/{self.parts}"
        return f"{self.dtype}{list(self.shape)} {how}"


Layout = Mapping[int, Mapping[str, WeightSpec]]


def box_numel(box: Box) -> int:
    return math.prod(stop - start for start, stop in box)


def intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


def relative(box: Box, within: Box) -> Box:
    """`box` in the coordinates of the region `within` (which contains it)."""
    return tuple((lo - w0, hi - w0) for (lo, hi), (w0, _) in zip(box, within))


def split_box(box: Box, pieces: int, dim: int | None = None) -> list[Box]:
    """`box` cut into up to `pieces` nearly equal boxes along `dim` (default: its
    longest dim)."""
    if dim is None:
        dim = max(range(len(box)), key=lambda d: box[d][1] - box[d][0]) if box else 0
    if not box:
        return [box]
    lo, hi = box[dim]
    pieces = max(1, min(pieces, hi - lo))
    out = []
    for i in range(pieces):
        a, b = split_range(hi - lo, pieces, i)
        out.append((*box[:dim], (lo + a, lo + b), *box[dim + 1:]))
    return out


def share(box: Box, pieces: int) -> list[Box]:
    """`box` cut into `pieces` nearly equal boxes (fewer only when it has fewer
    elements): along its longest dim, then, where that dim is shorter than
    `pieces`, each slab further along its own longest dim."""
    if pieces <= 1 or not box:
        return [box]
    dim = max(range(len(box)), key=lambda d: box[d][1] - box[d][0])
    extent = box[dim][1] - box[dim][0]
    if extent >= pieces or extent <= 1:
        return split_box(box, pieces, dim)
    out = []
    for i, slab in enumerate(split_box(box, extent, dim)):
        lo, hi = split_range(pieces, extent, i)
        out += share(slab, hi - lo)
    return out


@dataclass(frozen=True)
class Transfer:
    name: str
    src: int
    dst: int
    box: Box
    """The region moved, in full-tensor coordinates."""
    nbytes: int
    local: bool = False
    """Source and destination are one process: a copy, not a message."""


@dataclass(frozen=True)
class Bucket:
    src: int
    dst: int
    transfers: tuple[Transfer, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.transfers)


@dataclass(frozen=True)
class WeightPlan:
    transfers: tuple[Transfer, ...]
    source: dict[int, dict[str, WeightSpec]] = field(repr=False, compare=False)
    destination: dict[int, dict[str, WeightSpec]] = field(repr=False, compare=False)

    @property
    def wire_bytes(self) -> int:
        return sum(t.nbytes for t in self.transfers if not t.local)

    def bytes_by_source(self) -> dict[int, int]:
        out: dict[int, int] = dict.fromkeys(self.source, 0)
        for t in self.transfers:
            if not t.local:
                out[t.src] += t.nbytes
        return out

    def bytes_by_destination(self) -> dict[int, int]:
        out: dict[int, int] = dict.fromkeys(self.destination, 0)
        for t in self.transfers:
            if not t.local:
                out[t.dst] += t.nbytes
        return out


# ---- checking the two layouts ------------------------------------------------------------
def check_layouts(source: Layout, destination: Layout) -> dict[str, WeightSpec]:
    """name -> one spec carrying its full shape and dtype; ValueError naming the
    name, both values and the ranks when the sides disagree."""
    full: dict[str, tuple[int, WeightSpec]] = {}
    for side, layout in (("source", source), ("destination", destination)):
        for rank in sorted(layout):
            for name, spec in layout[rank].items():
                if not isinstance(spec, WeightSpec):
                    raise TypeError(f"{side} rank {rank} describes {name!r} with a "
                                    f"{type(spec).__name__}; expected a WeightSpec")
                if name not in full:
                    full[name] = (rank, spec)
                    continue
                rank0, spec0 = full[name]
                if (spec.shape, spec.dtype) != (spec0.shape, spec0.dtype):
                    first = "source" if rank0 in source and name in source[rank0] else side
                    raise ValueError(
                        f"weight {name!r}: {first} rank {rank0} has full shape "
                        f"{list(spec0.shape)} {spec0.dtype} but {side} rank {rank} has "
                        f"{list(spec.shape)} {spec.dtype}; both sides must describe the same "
                        f"model (same config, same dtype)")
    held = {n for specs in source.values() for n in specs}
    needed = {n for specs in destination.values() for n in specs}

    def ranks_with(layout: Layout, names: list[str]) -> list[int]:
        return sorted(r for r in layout if any(n in layout[r] for n in names[:8]))

    missing, extra = sorted(needed - held), sorted(held - needed)
    if missing:
        unmatched = (f"; the source holds {extra[:8]}{' ...' if len(extra) > 8 else ''} "
                     f"(source ranks {ranks_with(source, extra)}) that no destination rank "
                     f"needs" if extra else "")
        raise ValueError(f"the destination needs weight(s) {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} (destination ranks "
                         f"{ranks_with(destination, missing)}) that no source rank holds"
                         f"{unmatched}; the source holds {len(held)} names (e.g. "
                         f"{sorted(held)[:4]}). Rename to match, or drop them from "
                         f"weight_layout()")
    if extra:
        raise ValueError(f"the source holds weight(s) {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''} (source ranks "
                         f"{ranks_with(source, extra)}) that no destination rank needs; "
                         f"leave them out of weight_shards() or add them to weight_layout()")
    return {name: spec for name, (_, spec) in full.items()}


# ---- planning -------------------------------------------------------------------------------
def _cuts(boxes: Iterable[Box], within: Box) -> list[list[int]]:
    """Per dim, the sorted cut points of `boxes` inside `within`."""
    cuts = []
    for d, (lo, hi) in enumerate(within):
        points = {lo, hi}
        for b in boxes:
            points.update(p for p in b[d] if lo < p < hi)
        cuts.append(sorted(points))
    return cuts


def _cells(cuts: list[list[int]]) -> Iterable[Box]:
    if not cuts:
        yield ()
        return
    first, rest = cuts[0], cuts[1:]
    for lo, hi in itertools.pairwise(first):
        for tail in _cells(rest):
            yield ((lo, hi), *tail)


def plan_transfers(source: Layout, destination: Layout,
                   same_process: Mapping[int, int] | None = None,
                   split_replicas: bool = True) -> WeightPlan:
    """Transfers that give every destination rank exactly the boxes it needs.

    `same_process` maps a destination rank to the source rank living in the same
    process: what that source holds is copied locally and never sent.
    `split_replicas=False` sends each name from one holder where one holds what is
    needed (names spread over the replicas by bytes) instead of cutting every piece
    among its replicas: the object-store route then puts each tensor once, whole."""
    check_layouts(source, destination)
    same_process = dict(same_process or {})
    chosen: dict[str, int] = {}  # name -> its one holder (split_replicas=False)
    load: dict[int, int] = defaultdict(int)
    transfers: list[Transfer] = []
    holders_of: dict[str, list[tuple[int, Box]]] = defaultdict(list)
    for rank in sorted(source):
        for name, spec in source[rank].items():
            holders_of[name].append((rank, spec.box))
    for dst in sorted(destination):
        for name in sorted(destination[dst]):
            spec = destination[dst][name]
            need = spec.box
            if box_numel(need) == 0:
                continue
            overlapping = [(r, b) for r, b in holders_of[name] if intersect(b, need)]
            for cell in _cells(_cuts([b for _, b in overlapping], need)):
                holders = [r for r, b in overlapping if intersect(b, cell) == cell]
                if not holders:
                    raise ValueError(
                        f"weight {name!r}: destination rank {dst} needs {spec.describe()} "
                        f"but no source rank holds the region {[list(r) for r in cell]} "
                        f"(source ranks holding parts of {name!r}: "
                        f"{[(r, [list(x) for x in b]) for r, b in holders_of[name]]}). Give "
                        f"the source a layout whose parts cover the tensor")
                if same_process.get(dst) in holders:
                    transfers.append(Transfer(name, same_process[dst], dst, cell,
                                              box_numel(cell) * spec.itemsize, local=True))
                    continue
                if not split_replicas:
                    src = chosen.get(name)
                    nbytes = box_numel(cell) * spec.itemsize
                    if src not in holders:
                        src = min(holders, key=lambda r: (load[r], r))
                        chosen[name] = src
                        load[src] += nbytes
                    transfers.append(Transfer(name, src, dst, cell, nbytes))
                    continue
                # Replicas share the sending: the piece is cut into one part per
                # holder, each to the least loaded holder (then the lowest rank).
                for part in share(cell, len(holders)):
                    src = min(holders, key=lambda r: (load[r], r))
                    nbytes = box_numel(part) * spec.itemsize
                    load[src] += nbytes
                    transfers.append(Transfer(name, src, dst, part, nbytes))
    return WeightPlan(tuple(transfers), {r: dict(s) for r, s in source.items()},
                      {r: dict(s) for r, s in destination.items()})


# ---- buckets and rounds -------------------------------------------------------------------
def _fit(t: Transfer, bucket_bytes: int) -> list[Transfer]:
    """`t` cut (along its outermost dims first) into transfers of <= bucket_bytes
    where the tensor allows (a single element larger than the bucket is left whole)."""
    if t.nbytes <= bucket_bytes:
        return [t]
    itemsize = t.nbytes // max(1, box_numel(t.box))
    for dim, (lo, hi) in enumerate(t.box):
        if hi - lo <= 1:
            continue
        row = t.nbytes // (hi - lo)
        pieces = split_box(t.box, math.ceil(t.nbytes / bucket_bytes) if row <= bucket_bytes
                           else hi - lo, dim)
        out = []
        for box in pieces:
            out += _fit(Transfer(t.name, t.src, t.dst, box, box_numel(box) * itemsize,
                                 t.local), bucket_bytes)
        return out
    return [t]


def schedule(plan: WeightPlan, bucket_bytes: int) -> list[list[Bucket]]:
    """The plan's wire transfers packed into buckets of <= bucket_bytes per (source,
    destination) pair, in plan order, and the buckets into rounds (each source sends
    and each destination receives at most one bucket per round)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes}: expected a positive byte count")
    queues: dict[tuple[int, int], deque[Bucket]] = {}
    open_: dict[tuple[int, int], list[Transfer]] = defaultdict(list)

    def close(pair: tuple[int, int]) -> None:
        if open_[pair]:
            queues.setdefault(pair, deque()).append(Bucket(*pair, tuple(open_[pair])))
            open_[pair] = []

    for t in plan.transfers:
        if t.local:
            continue
        pair = (t.src, t.dst)
        for piece in _fit(t, bucket_bytes):
            if sum(x.nbytes for x in open_[pair]) + piece.nbytes > bucket_bytes:
                close(pair)
            open_[pair].append(piece)
    for pair in list(open_):
        close(pair)
    rounds: list[list[Bucket]] = []
    while queues:
        sending, receiving, this_round = set(), set(), []
        # Longest queues first: they bound the number of rounds.
        for pair in sorted(queues, key=lambda p: (-len(queues[p]), p)):
            src, dst = pair
            if src in sending or dst in receiving:
                continue
            this_round.append(queues[pair].popleft())
            sending.add(src)
            receiving.add(dst)
            if not queues[pair]:
                del queues[pair]
        rounds.append(this_round)
    return rounds
