"""The worker side of a weight sync: functions the driver runs inside the actors
(through execute_method), and the process group that spans both sides.

The contract a worker class meets (any of the two roles, or both):
  source       `weight_shards() -> {name: (tensor, WeightSpec)}`: what this rank
               holds and which part of the full tensor it is.
  destination  `weight_layout() -> {name: WeightSpec}`: what this rank needs;
               `load_weights(named_tensors, version)`: take tensors shaped as its
               specs' boxes (called with a few names at a time, or with all of them
               at once when the sync is staged);
               optional `weight_buffers() -> {name: tensor}`: its live tensors, which
               an unstaged sync then fills in place (load_weights gets only the
               names it could not, and `{}` at the end to record the version).
  optional     `sleep(level)` / `wake_up()`.

Transport: one gloo (CPU tensors) or NCCL (CUDA tensors) process group over the
source's ranks then the destination's (sync ranks 0..S-1, S..S+D-1), built from a
TCPStore on source rank 0 without touching either side's default process group
(trainers and TP engines have their own). Point-to-point send/recv, one bucket per
rank and role per round (plan.schedule's rounds), from two reused buffers per role
(round i is posted while round i-1 completes): a pure sender or receiver holds at
most 2 x bucket_bytes, plus any tensor it assembles outside the worker's own.
A peer that dies makes gloo's recv fail at once ("Connection closed by peer"); a
peer that hangs runs into the group's timeout.

Not here: planning (plan.py) or anything the driver decides (sync.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from rayexec.weights.plan import Box, Bucket, Transfer, WeightSpec, box_numel, relative

logger = logging.getLogger(__name__)

STAGED = "_rayexec_staged_weights"
DIRECT_BYTES = 1 << 20  # transfers this large travel as their own message
MAX_MESSAGES = 1 << 16  # messages per bucket (message tags are round * this + index)
_groups: dict[str, tuple[Any, Any]] = {}  # group id -> (store, process group), per process


@dataclass(frozen=True)
class SyncJob:
    """What one actor does in one sync."""

    group_id: str
    store_host: str
    store_port: int
    world_size: int
    sync_rank: int
    src_rank: int | None
    dst_rank: int | None
    peers: dict[tuple[str, int], int]
    """("src" | "dst", rank) -> sync rank."""
    rounds: list[list[Bucket]]
    bucket_bytes: int
    version: Any
    stage: bool
    timeout_s: float
    local: tuple[Transfer, ...] = ()
    """Transfers to this actor from itself (its source role to its destination role)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_source(worker: Any) -> dict[str, WeightSpec]:
    shards = worker.weight_shards()
    out = {}
    for name, value in shards.items():
        tensor, spec = value
        if not isinstance(spec, WeightSpec):
            raise TypeError(f"weight_shards()[{name!r}] gives a {type(spec).__name__} as its "
                            f"spec; expected (tensor, WeightSpec)")
        box_shape = tuple(b - a for a, b in spec.box)
        if tuple(tensor.shape) != box_shape or dtype_name(tensor.dtype) != spec.dtype:
            raise ValueError(f"weight_shards()[{name!r}]: the tensor is {dtype_name(tensor.dtype)}"
                             f"{list(tensor.shape)} but its spec ({spec.describe()}) says "
                             f"{spec.dtype}{list(box_shape)}")
        out[name] = spec
    return out


def describe_destination(worker: Any) -> dict[str, WeightSpec]:
    return dict(worker.weight_layout())


def free_port(worker: Any) -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _process_group(job: SyncJob, device: torch.device) -> Any:
    import torch.distributed as dist

    if job.group_id in _groups:
        return _groups[job.group_id][1]
    for old in list(_groups):  # one live sync group per process: drop stale ones
        _groups.pop(old)
    timeout = timedelta(seconds=job.timeout_s)
    store = dist.TCPStore(job.store_host, job.store_port, job.world_size,
                          is_master=job.sync_rank == 0, timeout=timeout)
    if device.type == "cuda":
        pg = dist.ProcessGroupNCCL(dist.PrefixStore(job.group_id, store), job.sync_rank,
                                   job.world_size, timeout=timeout)
    else:
        pg = dist.ProcessGroupGloo(dist.PrefixStore(job.group_id, store), job.sync_rank,
                                   job.world_size, timeout)
    _groups[job.group_id] = (store, pg)
    return pg


def _view(buf: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype,
          shape: tuple[int, ...]) -> torch.Tensor:
    raw = buf[offset:offset + nbytes]
    if offset % torch.empty((), dtype=dtype).element_size():
        raw = raw.clone()  # view(dtype) needs an aligned offset
    return raw.view(dtype).view(shape)


PROGRESS = "_rayexec_sync_progress"


def sync_progress(worker: Any) -> tuple[int, int]:
    """(tensors of the last sync loaded on this rank, tensors it needs)."""
    return getattr(worker, PROGRESS, (0, 0))


def run_sync(worker: Any, job: SyncJob) -> dict[str, Any]:
    """This actor's part of a sync: its buckets, round by round. Returns
    {"sent", "received", "loaded", "seconds"}. On failure it drops its process
    group, so that peers blocked on it fail at once instead of at the timeout."""
    try:
        return _run_sync(worker, job)
    except BaseException:
        _groups.clear()
        import gc

        gc.collect()
        raise


def _run_sync(worker: Any, job: SyncJob) -> dict[str, Any]:
    start = time.perf_counter()
    sources = worker.weight_shards() if job.src_rank is not None else {}
    layout = worker.weight_layout() if job.dst_rank is not None else {}
    # Unstaged, a worker that offers its live tensors gets the pieces written straight
    # into them: no second copy of a tensor while it arrives.
    buffers = (worker.weight_buffers() if job.dst_rank is not None and not job.stage
               and callable(getattr(worker, "weight_buffers", None)) else {})
    in_place = 0
    some = next(iter(sources.values()))[0] if sources else None
    device = some.device if some is not None else _dst_device(worker)
    pg = _process_group(job, device)
    # Two buffers per role, alternating by round: round i is posted (packed and sent,
    # its receive started) before round i-1 is waited for and unpacked, so packing,
    # the wire and unpacking overlap. Each is as large as this rank's largest bucket.
    mine = [b for r in job.rounds for b in r]
    send_size = max((b.nbytes for b in mine if b.src == job.src_rank), default=0)
    recv_size = max((b.nbytes for b in mine if b.dst == job.dst_rank), default=0)
    bufs: dict[tuple[str, int], torch.Tensor] = {}  # allocated when a message needs one

    def buffer(role: str, index: int) -> torch.Tensor:
        if (role, index % 2) not in bufs:
            size = send_size if role == "send" else recv_size
            bufs[(role, index % 2)] = torch.empty(size, dtype=torch.uint8, device=device)
        return bufs[(role, index % 2)]
    assembling: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (tensor, elements left)
    staged: dict[str, torch.Tensor] = {}
    sent = received = loaded = 0
    peak = 0  # high-water mark of the buffers plus the tensors being assembled
    if job.dst_rank is not None:
        setattr(worker, PROGRESS, (0, len(layout)))

    def target(name: str) -> tuple[torch.Tensor, WeightSpec]:
        """The tensor `name` is assembled in: the worker's own (in place) or a new one."""
        spec = layout[name]
        if name not in assembling:
            shape, dtype = tuple(b - a for a, b in spec.box), getattr(torch, spec.dtype)
            live = buffers.get(name)
            if live is None or tuple(live.shape) != shape or live.dtype != dtype:
                live = torch.empty(shape, dtype=dtype, device=device)
            assembling[name] = (live, torch.Size(shape).numel())
        return assembling[name][0], spec

    def post(index: int, buckets: list[Bucket]) -> tuple[list[Any], list[Any]]:
        """Start this rank's messages of round `index`; (works, pieces to copy out of
        the receive buffer once they arrived)."""
        nonlocal sent, received
        works, copies = [], []
        for bucket in buckets:
            if bucket.src == job.src_rank:
                cursor = 0
                peer = job.peers[("dst", bucket.dst)]
                for tag, message in enumerate(messages(bucket)):
                    region = None
                    if len(message) == 1:
                        tensor, spec = sources[message[0].name]
                        region = box_view(tensor.detach(), message[0].box, spec.box)
                    if region is not None and region.is_contiguous():
                        wire = region.view(-1).view(torch.uint8)  # zero-copy
                    else:
                        size = sum(t.nbytes for t in message)
                        wire = buffer("send", index)[cursor:cursor + size]
                        _pack(wire, message, sources)
                        cursor += size
                    works.append(pg.send([wire], peer, _tag(index, tag)))
                sent += bucket.nbytes
            if bucket.dst == job.dst_rank:
                cursor = 0
                peer = job.peers[("src", bucket.src)]
                for tag, message in enumerate(messages(bucket)):
                    view = None
                    if len(message) == 1:
                        into, spec = target(message[0].name)
                        view = box_view(into, message[0].box, spec.box)
                    if view is not None and view.is_contiguous():
                        wire = view.view(-1).view(torch.uint8)  # straight into place
                    else:
                        size = sum(t.nbytes for t in message)
                        wire = buffer("recv", index)[cursor:cursor + size]
                        copies.append((wire, message))
                        cursor += size
                    works.append(pg.recv([wire], peer, _tag(index, tag)))
                received += bucket.nbytes
                copies.append((None, bucket.transfers))  # count every piece as arrived
        return works, copies

    def finish(works: list[Any], copies: list[Any]) -> None:
        nonlocal loaded, in_place, peak
        for work in works:
            work.wait()
        outside = sum(t.numel() * t.element_size() for n, (t, _) in assembling.items()
                      if buffers.get(n) is not t)  # tensors assembled outside the worker's
        peak = max(peak, sum(b.numel() for b in bufs.values()) + outside)
        done = {}
        for wire, message in copies:
            offset = 0
            for t in message:
                into, spec = target(t.name)
                if wire is not None:  # arrived in the buffer: copy it into place
                    dtype = into.dtype
                    piece = _view(wire, offset, t.nbytes, dtype, box_shape(t.box))
                    box_view(into, t.box, spec.box).copy_(piece)
                    offset += t.nbytes
                    continue
                left = assembling[t.name][1] - box_numel(t.box)
                assembling[t.name] = (into, left)
                if left == 0:
                    done[t.name] = into
                    del assembling[t.name]
        if not done:
            return
        if job.stage:
            staged.update(done)
            return
        written = {n: t for n, t in done.items() if buffers.get(n) is not t}
        if written:
            worker.load_weights(written, job.version)
        loaded += len(done)
        in_place += len(done) - len(written)
        setattr(worker, PROGRESS, (loaded, len(layout)))

    if job.local:  # copies within this process; none when both are the same memory
        for t in job.local:
            into, spec = target(t.name)
            tensor, held = sources[t.name]
            mine, theirs = box_view(into, t.box, spec.box), box_view(tensor.detach(), t.box,
                                                                   held.box)
            if mine.data_ptr() != theirs.data_ptr() or mine.stride() != theirs.stride():
                mine.copy_(theirs)
        finish([], [(None, job.local)])
    previous = None
    for index, buckets in enumerate(job.rounds):
        posted = post(index, buckets)
        if previous is not None:
            finish(*previous)
        previous = posted
    if previous is not None:
        finish(*previous)
    if in_place:
        worker.load_weights({}, job.version)  # the tensors are in place; record the version
    if assembling:
        raise RuntimeError(f"sync {job.group_id}: destination rank {job.dst_rank} did not "
                           f"receive all of {sorted(assembling)[:4]}; the plan and the "
                           f"workers' layouts disagree")
    if job.stage:
        setattr(worker, STAGED, (job.version, staged))
    return {"sent": sent, "received": received, "loaded": loaded, "peak_extra_bytes": peak,
            "seconds": time.perf_counter() - start}


def messages(bucket: Bucket) -> list[tuple[Transfer, ...]]:
    """How a bucket travels, as both ends compute it: the transfers under
    DIRECT_BYTES packed into one message, each larger one as its own message (sent
    from, and received into, the tensors themselves where the region is contiguous)."""
    small = tuple(t for t in bucket.transfers if t.nbytes < DIRECT_BYTES)
    return ([small] if small else []) + [(t,) for t in bucket.transfers
                                         if t.nbytes >= DIRECT_BYTES]


def _tag(index: int, message: int) -> int:
    return index * MAX_MESSAGES + message


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def box_view(tensor: torch.Tensor, box: Box, held: Box) -> torch.Tensor:
    """The view of `tensor` (which holds the region `held`) for `box`."""
    return tensor[tuple(slice(a, b) for a, b in relative(box, held))]


def _pack(wire: torch.Tensor, message: tuple[Transfer, ...],
          sources: dict[str, tuple[torch.Tensor, WeightSpec]]) -> None:
    offset = 0
    for t in message:
        tensor, spec = sources[t.name]
        region = box_view(tensor.detach(), t.box, spec.box)
        if offset % region.element_size() == 0:  # straight into the buffer
            wire[offset:offset + t.nbytes].view(region.dtype).view(region.shape).copy_(region)
        else:
            wire[offset:offset + t.nbytes].copy_(region.contiguous().view(-1).view(torch.uint8))
        offset += t.nbytes


def _dst_device(worker: Any) -> torch.device:
    device = getattr(worker, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def commit_staged(worker: Any, version: Any) -> int:
    """Load what a staged sync left on this rank; returns how many tensors."""
    staged_version, staged = getattr(worker, STAGED, (None, None))
    if staged is None or staged_version != version:
        raise RuntimeError(f"no staged weights of version {version!r} on this rank (found "
                           f"{staged_version!r}); run update_weights(..., stage=True) again")
    worker.load_weights(staged, version)
    setattr(worker, STAGED, (None, None))
    return len(staged)


def discard_staged(worker: Any) -> None:
    setattr(worker, STAGED, (None, None))
