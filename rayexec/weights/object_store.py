"""The object-store route of a weight sync: CPU weights through Ray's object store
instead of a process group.

Each source rank puts, per destination node, one object holding the regions of its
shards that the node's destination ranks read (per name, the bounding box of their
boxes: with a tensor-parallel engine, the whole tensor), written once from the
tensors' memory (numpy views, pickled out of band). Every destination rank maps the
objects of its node read-only and without a copy, and hands the loader views of
them; where a view is the box of a whole tensor in the object, a loader that wants
full-shaped tensors (vLLM's) gets that tensor as is, no copy either
(`rayexec.integrations.vllm.weight_layout.full_shaped`). On one node that is one
memory copy per byte in all, against a send, a receive and an assembly with gloo.

Costs: the object store holds what a node reads until the sync ends (no
`bucket_bytes` bound), so the driver picks this route only when that fits in half
of the node's object store (sync.py). A source that dies makes the destinations'
gets fail at once (the owner of the objects is gone); a stalled one runs into the
sync's timeout.

Not here: choosing the route (sync.py), the process-group route (transport.py).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rayexec.weights.plan import Box, WeightPlan, box_numel
from rayexec.weights.transport import PROGRESS, STAGED, box_shape, box_view, dtype_name

Regions = dict[str, dict[str, Box]]  # node id -> name -> box the object holds


def bounding(a: Box, b: Box) -> Box:
    return tuple((min(a0, b0), max(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))


def regions_by_source(plan: WeightPlan, node_of: Mapping[int, str]) -> dict[int, Regions]:
    """Source rank -> destination node -> name -> the box its object for that node
    holds: the bounding box of the boxes that node's destination ranks read from it."""
    out: dict[int, Regions] = defaultdict(lambda: defaultdict(dict))
    for t in plan.transfers:
        held = out[t.src][node_of[t.dst]]
        held[t.name] = bounding(held[t.name], t.box) if t.name in held else t.box
    return {s: {n: dict(names) for n, names in by_node.items()} for s, by_node in out.items()}


def itemsizes(plan: WeightPlan) -> dict[str, int]:
    """name -> bytes per element, from the plan's transfers."""
    return {t.name: t.nbytes // max(1, box_numel(t.box)) for t in plan.transfers}


def put_bytes(regions: Mapping[int, Regions], itemsize: Mapping[str, int]) -> int:
    return sum(box_numel(box) * itemsize[name] for by_node in regions.values()
               for names in by_node.values() for name, box in names.items())


# ---- in the source actors ------------------------------------------------------------------
def locate(worker: Any, source: bool) -> tuple[str, str]:
    """(node id, device type) of this actor's weights: its shards' as a source, its
    device's as a destination."""
    import ray

    if source:
        shards = worker.weight_shards()
        device = next(iter(shards.values()))[0].device.type if shards else "cpu"
    else:
        device = getattr(worker, "device", None)
        device = device.type if isinstance(device, torch.device) else "cpu"
    return ray.get_runtime_context().get_node_id(), device


def publish(worker: Any, regions: Regions) -> dict[str, Any]:
    """Put one object per node (see the module docstring); node id -> its ObjectRef.
    The refs are owned by this actor: they live while the driver holds them."""
    import ray

    shards = worker.weight_shards()
    out = {}
    for node, names in regions.items():
        arrays = {}
        for name, box in names.items():
            tensor, spec = shards[name]
            if tensor.device.type != "cpu":
                raise ValueError(f"weight {name!r} is on {tensor.device}: the object-store "
                                 f"route moves CPU tensors; use via='process_group' (NCCL)")
            piece = box_view(tensor.detach(), box, spec.box).contiguous()
            arrays[name] = (piece.reshape(-1).view(torch.uint8).numpy(), dtype_name(piece.dtype),
                            tuple(piece.shape), box)
        out[node] = ray.put(arrays)
    return out


# ---- in the destination actors -------------------------------------------------------------
@dataclass(frozen=True)
class CollectJob:
    """What one destination rank reads: per object, the (name, box) pieces."""

    dst_rank: int
    parts: tuple[tuple[Any, tuple[tuple[str, Box], ...]], ...]
    version: Any
    stage: bool
    timeout_s: float


def _tensors(obj: Mapping[str, Any]) -> dict[str, tuple[torch.Tensor, Box]]:
    with warnings.catch_warnings():
        # Read-only shared memory: the loaders only copy out of it.
        warnings.simplefilter("ignore", UserWarning)
        return {name: (torch.from_numpy(array).view(getattr(torch, dtype)).view(shape), box)
                for name, (array, dtype, shape, box) in obj.items()}


def collect(worker: Any, job: CollectJob) -> dict[str, Any]:
    """Map this rank's objects and load (or, staged, keep) its pieces; returns
    {"received": bytes read, "loaded": tensors loaded now, "peak_extra_bytes"}."""
    import ray

    layout = worker.weight_layout()
    setattr(worker, PROGRESS, (0, len(layout)))
    try:
        objects = ray.get([ref for ref, _ in job.parts], timeout=job.timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"destination rank {job.dst_rank}: the weight objects were not "
                           f"ready within timeout={job.timeout_s:g}s (a source rank stalled?)"
                           ) from None
    pieces: dict[str, torch.Tensor] = {}
    left = {name: box_numel(spec.box) for name, spec in layout.items()}
    extra = received = 0
    for (_, reads), obj in zip(job.parts, objects):
        tensors = _tensors(obj)
        for name, box in reads:
            tensor, held = tensors[name]
            view = box_view(tensor, box, held)
            need = layout[name].box
            received += view.numel() * view.element_size()
            left[name] -= box_numel(box)
            if box == need:  # all of it in one read: the view itself, no copy
                pieces[name] = view
                continue
            if name not in pieces:
                pieces[name] = torch.empty(box_shape(need), dtype=view.dtype)
                extra += pieces[name].numel() * view.element_size()
            box_view(pieces[name], box, need).copy_(view)
    short = sorted(name for name, n in left.items() if n)
    if short:
        raise RuntimeError(f"destination rank {job.dst_rank} did not receive all of "
                           f"{short[:4]}; the plan and the workers' layouts disagree")
    if job.stage:
        setattr(worker, STAGED, (job.version, pieces))
        return {"received": received, "loaded": 0, "peak_extra_bytes": extra}
    worker.load_weights(pieces, job.version)
    setattr(worker, PROGRESS, (len(pieces), len(layout)))
    return {"received": received, "loaded": len(pieces), "peak_extra_bytes": extra}


def collect_jobs(plan: WeightPlan, refs: Mapping[int, Mapping[str, Any]],
                 node_of: Mapping[int, str], version: Any, stage: bool, timeout_s: float
                 ) -> dict[int, CollectJob]:
    """Destination rank -> its CollectJob, from the objects each source put per node."""
    reads: dict[int, dict[int, list[tuple[str, Box]]]] = defaultdict(lambda: defaultdict(list))
    for t in plan.transfers:
        reads[t.dst][t.src].append((t.name, t.box))
    return {d: CollectJob(d, tuple((refs[s][node_of[d]], tuple(r))
                                   for s, r in reads[d].items()), version, stage, timeout_s)
            for d in plan.destination}
