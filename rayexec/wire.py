"""What crosses a step's CPU edges: one `bytes` frame per message.

Ray's compiled-graph channels hand `bytes` over as they are (their RAW fast path: no
msgpack, no pickle, no tensor extraction), while any other value goes through Ray's
serializer, and torch tensors through its tensor transport, which costs several times
the bytes they hold on CPU (docs/benchmarks.md has the side-by-side numbers). So on
CPU edges rayexec sends every message -- the driver's `(step, batch)`, a stage's
`(step, batch, intermediate)`, the last stage's output -- as one frame:

    skeleton (pickle) | pad to 64 | tensor bytes | pad | ... | data start | MAGIC

The skeleton takes one of three forms. A message that is one host tensor -- what a
last stage returns -- has a struct header (dtype code, ndim, shape) and no pickle
at all (MAGIC_ONE, `_one`): 4 KiB of it packs in about 2.5 us and unpacks in
1.4, against 3.8 and 2.5-3.5 flattened. What a step's edges mostly carry -- a tuple of
plain values, host tensors and str-keyed dicts of host tensors -- is flattened into
one plain pickle of the values plus a table of (offset, dtype, shape) per tensor
(MAGIC_FLAT, `_flatten`). Anything else is pickled with every plain CPU tensor
replaced by a call naming where its bytes lie (MAGIC, `_dump`): C pickle when that
can carry the message, cloudpickle otherwise (classes and functions defined in
`__main__`, lambdas, local classes). Measured alone, a 4 KiB stage message took
7.7 us to pack with cloudpickle and takes about 4 flattened. `unpack` rebuilds
the tensors as views of the frame: no copy on the receiving side. A message holding
a tensor on another device (CUDA, NPU, meta) is not framed: `pack` returns it
unchanged, and it takes the edge's tensor transport (NCCL, gloo or Ray's shm).

How a frame enters a channel depends on its size (`pack(channel=True)`): up to
1 MiB as `bytes`; above it as msgpack `bin` data (one memcpy instead of Ray's
6-thread copy, `RAY_PARALLEL_COPY_BYTES`); from `GATHER_MIN_BYTES` (2 MiB) as a
`_Gathered`, whose tensors Ray writes into the channel straight from their memory as
pickle-5 buffers and the reader joins into the same frame (`_ungather`). Whatever
the path, the reader gets a frame of its own.

Tensors rebuilt from a frame share memory with it. The frame belongs to the step that
received it, so writing to them in place is safe; it just must not be expected to
change what the sender holds. Not here: which edges use frames (dag.py decides).
"""

from __future__ import annotations

import ctypes
import io
import pickle
import struct
import sys
import threading
import warnings
from typing import Any

import cloudpickle
import torch

MAGIC = b"RXF2"  # the skeleton is the message pickled (see _dump)
MAGIC_FLAT = b"RXF3"  # the skeleton is the message flattened (see _flatten)
MAGIC_ONE = b"RXF4"  # the message is one host tensor; the skeleton its header (see _one)
TRAILER = struct.Struct("<Q4s")  # where the tensor data starts, magic
ALIGN = 64  # tensor data starts on cache-line boundaries
_ZEROS = bytes(ALIGN)  # padding

# torch.frombuffer warns that `bytes` is read-only; the frame is private to the step
# that received it (see the module docstring), so the warning says nothing useful.
warnings.filterwarnings("ignore", message="The given buffer is not writable",
                        category=UserWarning)

_DTYPES = {str(d): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
)}
_DTYPE_LIST = tuple(_DTYPES.values())  # a frame names a dtype by its index here
_DTYPE_CODES = {d: i for i, d in enumerate(_DTYPE_LIST)}


class _OnDevice(Exception):
    """A tensor that is not in host memory: the message keeps its transport."""


class _RayHandle(Exception):
    """An ObjectRef or actor handle: only Ray's own serializer may carry it."""


class _Pickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO, buffer_callback: Any = None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffer_callback)
        self.tensors: list[torch.Tensor] = []
        self.refs: list[tuple[int, str, tuple[int, ...]]] = []  # one per tensor, in order
        self.size = 0  # bytes of tensor data so far, padding included
        self.seen: dict[int, Any] = {}  # id -> reference: a tensor shared twice travels once
        self.refuse_handles = False

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not torch.Tensor:  # subclasses (Parameter, ...) pickle as usual
            if self.refuse_handles and type(obj).__name__ in _RAY_HANDLES:
                raise _RayHandle(type(obj).__name__)
            return None
        if obj.device.type != "cpu":
            raise _OnDevice(obj.device)
        if obj.requires_grad or str(obj.dtype) not in _DTYPES:
            return None
        if id(obj) in self.seen:
            return self.seen[id(obj)]
        offset = self.size + (-self.size % ALIGN)
        self.size = offset + obj.numel() * obj.element_size()
        self.tensors.append(obj)
        self.seen[id(obj)] = ref = (offset, str(obj.dtype), tuple(obj.shape))
        self.refs.append(ref)
        return ref


def _reduce_tensor(pickler: Any, obj: Any) -> Any:
    """A frame pickler's reducer_override: a plain host tensor becomes a call to
    `_frame_tensor` naming where its bytes lie in the frame's data; anything else
    pickles as usual. Pickle's memo makes a tensor shared twice travel once."""
    if type(obj) is not torch.Tensor:  # subclasses (Parameter, ...) pickle as usual
        return NotImplemented
    if not obj.is_cpu:
        raise _OnDevice(obj.device)
    code = _DTYPE_CODES.get(obj.dtype)
    if code is None or obj.requires_grad:
        return NotImplemented
    offset = pickler.size + (-pickler.size % ALIGN)
    pickler.size = offset + obj.nbytes
    pickler.tensors.append((obj, offset))
    return _frame_tensor, (offset, code, tuple(obj.shape))


class _FramePickler(pickle.Pickler):
    """Plain (C) pickle: what most messages need, at a fraction of cloudpickle's cost.
    `tensors` ((tensor, offset) pairs) and `size` (bytes of tensor data, padding
    included) are set by `_dump` (no __init__: this runs on every step)."""

    reducer_override = _reduce_tensor


class _FrameCloudPickler(cloudpickle.Pickler):
    """cloudpickle, for what plain pickle cannot send: classes and functions defined
    in `__main__` (the workers' `__main__` is Ray's), lambdas, local classes."""

    def reducer_override(self, obj: Any) -> Any:
        reduced = _reduce_tensor(self, obj)
        return super().reducer_override(obj) if reduced is NotImplemented else reduced


def _dump(message: Any) -> tuple[bytes, list[tuple[torch.Tensor, int]], int, bytes]:
    """(skeleton, (tensor, offset) pairs, bytes of tensor data, magic) of a message.

    The common messages are flattened without a pickler (`_flatten`). Others are
    pickled: plain pickle when it can do the message, else cloudpickle. Plain pickle
    refers to a class or function by module and name; one named in `__main__` (its
    name shows in the bytes) would not be found by the workers, so those go by
    cloudpickle too, as does everything while a module is registered with
    cloudpickle to go by value."""
    if type(message) is torch.Tensor:
        one = _one(message)
        if one is not None:
            return one
    flat = _flatten(message)
    if flat is not None:
        return flat
    if not _BY_VALUE_MODULES:
        buf = io.BytesIO()
        pickler: Any = _FramePickler(buf, pickle.HIGHEST_PROTOCOL)
        pickler.tensors, pickler.size = [], 0
        try:
            pickler.dump(message)
        except _OnDevice:
            raise
        except Exception:  # what plain pickle cannot do, cloudpickle may
            pass
        else:
            skeleton = buf.getvalue()
            if b"__main__" not in skeleton:
                return skeleton, pickler.tensors, pickler.size, MAGIC
    buf = io.BytesIO()
    pickler = _FrameCloudPickler(buf, pickle.HIGHEST_PROTOCOL)
    pickler.tensors, pickler.size = [], 0
    pickler.dump(message)
    return buf.getvalue(), pickler.tensors, pickler.size, MAGIC


_ONE_MAX_NDIM = 7  # the header then fits in the ALIGN bytes before the data
# The header of an n-dim tensor: dtype code, ndim (byte 1), then n int64 sizes.
_ONE_HEADS = [struct.Struct(f"<BB{n}q") for n in range(_ONE_MAX_NDIM + 1)]


def _one(t: torch.Tensor) -> tuple[bytes, list[tuple[torch.Tensor, int]], int, bytes] | None:
    """A message that is one plain host tensor, as `_dump` returns it, with a struct
    header instead of a pickle; None for what this form does not take (a dtype
    outside _DTYPES, requires_grad, over _ONE_MAX_NDIM dimensions)."""
    if not t.is_cpu:
        raise _OnDevice(t.device)
    code = _DTYPE_CODES.get(t.dtype)
    shape = t.shape
    ndim = len(shape)
    if code is None or t.requires_grad or ndim > _ONE_MAX_NDIM:
        return None
    return _ONE_HEADS[ndim].pack(code, ndim, *shape), [(t, 0)], t.nbytes, MAGIC_ONE


def _unpack_one(frame: bytes) -> torch.Tensor:
    """The tensor `_one` framed, as a view of `frame`."""
    head = _ONE_HEADS[frame[1]].unpack_from(frame)  # (code, ndim, *shape)
    return _view(frame, ALIGN, head[0], head[2:])


_PLAIN = frozenset({type(None), bool, int, float, str, bytes})


def _flatten(message: Any) -> tuple[bytes, list[tuple[torch.Tensor, int]], int, bytes] | None:
    """What a step's edges mostly carry -- `(step, batch)`, `(step, batch, {"hidden":
    tensor})`, an output tensor -- as `_dump` returns it, with one pickle of plain
    values (under half the cost of pickling the message with its tensors). Takes a
    tuple whose items (or a single value that) are each a plain value (None, bool,
    int, float, str, bytes), a host tensor, or a non-empty dict of host tensors with
    str keys; None for anything else. The skeleton is `(single, values, table)`:
    `table` holds one (offset, dtype code, shape) per distinct tensor; a tensor
    item's value is `(None, index)`, a dict's `(key, index, key, index, ...)` (plain
    values are never tuples, so a tuple is always one of these)."""
    single = type(message) is not tuple
    items = (message,) if single else message
    values: list[Any] = []
    table: list[tuple[int, int, tuple[int, ...]]] = []
    pairs: list[tuple[torch.Tensor, int]] = []
    seen: dict[int, int] = {}  # id(tensor) -> index: a tensor shared twice travels once
    size = 0
    for item in items:
        kind = type(item)
        if kind in _PLAIN:
            values.append(item)
            continue
        if kind is dict and item:  # an empty one is left to the pickler
            entries: Any = item.items()
        elif kind is torch.Tensor:
            entries = ((None, item),)
        else:
            return None
        ref: list[Any] = []
        for key, t in entries:
            if type(t) is not torch.Tensor or t.requires_grad or (
                    key is not None and type(key) is not str):
                return None
            index = seen.get(id(t))
            if index is None:
                if not t.is_cpu:
                    raise _OnDevice(t.device)
                code = _DTYPE_CODES.get(t.dtype)
                if code is None:
                    return None
                offset = size + (-size % ALIGN)
                size = offset + t.nbytes
                index = seen[id(t)] = len(table)
                table.append((offset, code, tuple(t.shape)))
                pairs.append((t, offset))
            ref.append(key)
            ref.append(index)
        values.append(tuple(ref))
    skeleton = pickle.dumps((single, values, table), pickle.HIGHEST_PROTOCOL)
    return skeleton, pairs, size, MAGIC_FLAT


def _unflatten(frame: bytes) -> Any:
    """The message `_flatten` took apart, its tensors views of `frame`."""
    single, values, table = pickle.loads(frame)
    if table:
        data_start = TRAILER.unpack_from(frame, len(frame) - TRAILER.size)[0]
        tensors = [_view(frame, data_start + offset, code, shape)
                   for offset, code, shape in table]
        for i, value in enumerate(values):
            if type(value) is tuple:
                if value[0] is None:
                    values[i] = tensors[value[1]]
                else:
                    entries = iter(value)
                    values[i] = {key: tensors[index] for key, index in zip(entries, entries)}
    return values[0] if single else tuple(values)


def _view(frame: bytes, at: int, code: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor whose bytes start at `at` in `frame`, as a view of them."""
    if len(shape) == 1:  # the common case, without the product below
        count = shape[0]
        if count:
            return torch.frombuffer(frame, dtype=_DTYPE_LIST[code], count=count, offset=at)
    count = 1
    for n in shape:
        count *= n
    if count == 0:
        return torch.empty(shape, dtype=_DTYPE_LIST[code])
    flat = torch.frombuffer(frame, dtype=_DTYPE_LIST[code], count=count, offset=at)
    # view(*shape) takes 0.9 us where view(shape) takes 1.5; a 0-dim shape needs the tuple
    return flat.view(*shape) if shape else flat.view(shape)


_BY_VALUE_MODULES = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", {"unknown"})

_LOADING = threading.local()  # the frame being unpacked in this thread


def _frame_tensor(offset: int, code: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of the frame being unpacked (see `unpack`), as a view of its bytes."""
    frame = _LOADING.frame
    data_start = TRAILER.unpack_from(frame, len(frame) - TRAILER.size)[0]
    return _view(frame, data_start + offset, code, shape)


def pack(message: Any, reuse: bool = False, channel: bool = False) -> Any:
    """`message` as one bytes frame; `message` itself when it holds a tensor that is
    not in host memory (it then needs the edge's tensor transport).

    `reuse=True` may return a frame object handed out before (see `_FramePool`): only
    for a caller that hands the frame straight to a channel write, which copies it
    and lets go of it before the caller packs again. `channel=True` (what a compiled
    graph's method returns) wraps a frame above `RAY_PARALLEL_COPY_BYTES` for a
    single-threaded copy into the channel (see `_single_copy`)."""
    try:
        skeleton, pairs, data_size, magic = _dump(message)
    except _OnDevice:
        return message
    head = len(skeleton)
    data_start = head + (-head % ALIGN) if pairs else head
    total = data_start + data_size + TRAILER.size
    if channel and pairs and total >= GATHER_MIN_BYTES:
        return _gathered(skeleton, pairs, data_start, magic)
    prefix = _MSGPACK_BIN32.pack(0xC6, total) if (
        channel and total > RAY_PARALLEL_COPY_BYTES) else b""
    size = len(prefix) + total
    frame = _POOL.take(size) if reuse and size >= REUSE_MIN_BYTES and _POOL.enabled else None
    if frame is not None:  # written in place (see _FramePool): the same bytes as below
        _write(id(frame) + _BYTES_DATA_OFFSET, prefix, skeleton, pairs, data_start, magic)
    else:
        parts, alive = _pieces([prefix, skeleton], head, pairs, data_start, magic)
        frame = b"".join(parts)
        del alive
    return _single_copy(frame) if prefix else frame


def _pieces(parts: list[Any], written: int, pairs: list[tuple[torch.Tensor, int]],
            data_start: int, magic: bytes) -> tuple[list[Any], list[torch.Tensor]]:
    """`parts` (the frame's first `written` bytes) followed by the rest of the frame
    as buffers, without a copy: zero padding and each tensor's memory in turn, then
    the trailer. Also the contiguous copies made on the way, which the buffers do not
    own: the caller keeps them until the buffers are used."""
    alive = []
    for t, offset in pairs:
        if not t.is_contiguous():
            t = t.contiguous()
            alive.append(t)
        parts.append(_ZEROS[:data_start + offset - written])
        parts.append(_host_bytes(t))
        written = data_start + offset + t.nbytes
    parts.append(TRAILER.pack(data_start, magic))
    return parts, alive


def _write(at: int, prefix: bytes, skeleton: bytes, pairs: list[tuple[torch.Tensor, int]],
           data_start: int, magic: bytes) -> None:
    """A frame's bytes at address `at`: the prefix, the skeleton, zeroed padding, each
    tensor's bytes straight from its memory, the trailer."""
    ctypes.memmove(at, prefix + skeleton if prefix else skeleton, len(prefix) + len(skeleton))
    at += len(prefix)
    written = len(skeleton)
    for t, offset in pairs:
        if not t.is_contiguous():
            t = t.contiguous()
        nbytes = t.nbytes
        ctypes.memset(at + written, 0, data_start + offset - written)
        if nbytes:
            ctypes.memmove(at + data_start + offset, t.data_ptr(), nbytes)
        written = data_start + offset + nbytes
    ctypes.memmove(at + written, TRAILER.pack(data_start, magic), TRAILER.size)


# Ray copies a `bytes` value above 1 MiB into a channel with parallel_memcopy, which
# starts 6 threads for every write (ray/includes/serialization.pxi: MEMCOPY_THREADS,
# kMemcopyDefaultThreshold). Measured here (2 cores, busy): a bare Ray graph of
# PP=2 x TP=1 passing 1 MiB + 1 KiB of bytes took 1253 us a step against 603 us for
# exactly 1 MiB. A frame above it travels as msgpack `bin` data instead, which Ray
# copies with one memcpy; the reader's msgpack decode returns the same frame as bytes.
RAY_PARALLEL_COPY_BYTES = 1 << 20
_MSGPACK_BIN32 = struct.Struct(">BI")  # msgpack's bin 32: 0xC6, big-endian length


def _single_copy(prefixed: bytes) -> Any:
    """A frame that starts with a msgpack bin 32 header as Ray's serialized form of
    that bin value (cross-language metadata: no pickle on either side)."""
    from ray._private import ray_constants
    from ray._raylet import MessagePackSerializedObject

    return MessagePackSerializedObject(ray_constants.OBJECT_METADATA_TYPE_CROSS_LANGUAGE,
                                       prefixed, [])


# From GATHER_MIN_BYTES up, a frame leaves a stage as a `_Gathered` instead: Ray
# pickles it (protocol 5) and writes each of its PickleBuffers into the channel
# straight from the tensor's memory (its out-of-band buffers), where a frame costs a
# copy of the tensors into it and then Ray's copy of the frame. The reader's
# `_ungather` copies the pieces out of the channel into a frame of its own: one copy,
# as for a frame. (The pieces are views of channel memory that Ray reuses once they
# are gone, so nothing may keep them: a reader holding them stalls the graph.)
# Below it the frame wins: Ray's pickle-5 path costs more per message than the copy
# saves (docs/benchmarks.md, 2026-12-01 and 2026-12-07, late).
GATHER_MIN_BYTES = 2 << 20
GATHER_CHUNK_BYTES = RAY_PARALLEL_COPY_BYTES  # larger buffers get Ray's 6-thread copy


class _Gathered:
    """A frame's pieces for Ray's pickle-5 writer: the skeleton, padding and trailer
    as bytes, each tensor's memory as out-of-band buffers of at most
    GATHER_CHUNK_BYTES. Holds the tensors until Ray has written them."""

    def __init__(self, parts: list[Any], tensors: list[torch.Tensor]) -> None:
        self.parts, self.tensors = parts, tensors

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _ungather, tuple(p if type(p) is bytes else pickle.PickleBuffer(p)
                                for p in self.parts)


def _gathered(skeleton: bytes, pairs: list[tuple[torch.Tensor, int]], data_start: int,
              magic: bytes) -> _Gathered:
    pieces, alive = _pieces([skeleton], len(skeleton), pairs, data_start, magic)
    parts: list[Any] = []
    small: list[Any] = []  # adjacent bytes and small tensors travel as one bytes part
    for piece in pieces:
        if type(piece) is bytes or len(piece) < REUSE_MIN_BYTES:
            small.append(piece)
            continue
        view = memoryview(piece).cast("B")
        parts.append(b"".join(small))
        small = []
        parts.extend(view[at:at + GATHER_CHUNK_BYTES]
                     for at in range(0, len(view), GATHER_CHUNK_BYTES))
    parts.append(b"".join(small))
    # The tensors whose memory the buffers are, until Ray has written them.
    return _Gathered([p for p in parts if len(p)], [t for t, _ in pairs] + alive)


def _ungather(*parts: Any) -> bytes:
    """The frame a `_Gathered` carried, copied out of Ray's channel into a `bytes` of
    this process's own. A fresh one: joining into a pooled frame (as `_FramePool`
    does for writes) measured 1.06-1.09x slower at 16 MiB (wire_ab, 2026-12-07)."""
    return b"".join(parts)


class _FramePool:
    """Frames reused across steps, so that a large frame is not a fresh allocation
    every step. A new 1 MiB `bytes` costs its page faults each time (146-232 us inside
    a Ray worker here, against 24 us to copy into memory already mapped), and a CPU
    edge packs one frame per step.

    A frame is a `bytes` object written in place (CPython keeps a bytes object's data
    at a fixed offset; checked once at import, and the pool is off if it does not
    hold). That is only sound while nobody else sees the object: `take` hands out a
    frame only when the pool holds the sole reference, i.e. the channel write that
    received it last time has finished and dropped it; otherwise it makes a new one.
    Frames are never hashed or kept by rayexec. Up to `per_size` frames per size, for
    `sizes` sizes (a decode loop repeats the same few)."""

    def __init__(self, sizes: int = 4, per_size: int = 2) -> None:
        self.sizes, self.per_size = sizes, per_size
        self._frames: dict[int, list[bytes]] = {}
        self._lock = threading.Lock()
        self.enabled = _bytes_writable_in_place()
        self.reused = 0  # frames handed out again (for tests and probes)

    def take(self, size: int) -> bytes | None:
        with self._lock:
            frames = self._frames.pop(size, [])
            self._frames[size] = frames  # most recently used last
            for frame in frames:
                # The list, `frame` and getrefcount's argument: nobody else holds it.
                if sys.getrefcount(frame) == 3:
                    self.reused += 1
                    return frame
            if len(frames) >= self.per_size:
                return None
            frame = _new_bytes(size)
            frames.append(frame)
            while len(self._frames) > self.sizes:
                self._frames.pop(next(iter(self._frames)))
            return frame


_BYTES_DATA_OFFSET = bytes.__basicsize__ - 1  # CPython's PyBytesObject.ob_sval
REUSE_MIN_BYTES = 64 << 10  # below this a fresh frame is cheap and sizes vary more


def _new_bytes(size: int) -> bytes:
    """An uninitialised bytes object of `size` (its pages are touched by the first
    write, once, instead of a zero fill and then the write)."""
    new = ctypes.pythonapi.PyBytes_FromStringAndSize
    new.restype, new.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
    return new(None, size)


def _bytes_writable_in_place() -> bool:
    try:
        probe = _new_bytes(8)
        ctypes.memmove(id(probe) + _BYTES_DATA_OFFSET, b"rayexec!", 8)
        return probe == b"rayexec!"
    except Exception:  # another Python implementation: fresh frames every step
        return False


_POOL = _FramePool()


def _host_bytes(t: torch.Tensor) -> Any:
    """A buffer over a contiguous host tensor's bytes, without a copy: two attribute
    reads instead of a chain of tensor ops (detach, reshape, view, numpy), which
    costs 0.3 us instead of 3 per tensor and step. The buffer does not own the memory:
    the caller keeps `t` alive until the bytes are joined."""
    nbytes = t.nbytes
    if nbytes == 0:
        return b""
    # A ctypes array is a buffer that bytes.join takes as it is (0.2 us; a
    # memoryview cast of it costs 0.4 more).
    return (ctypes.c_char * nbytes).from_address(t.data_ptr())


_RAY_HANDLES = ("ObjectRef", "ActorHandle")
CALL_FRAME_MIN_BYTES = 1 << 20


def pack_call(args: Any, kwargs: Any) -> tuple[bytes, list[Any], list[Any]] | None:
    """`(args, kwargs)` of a collective_rpc as (skeleton, one uint8 numpy view per host
    tensor, the out-of-band buffers of anything else pickle 5 can send that way, such
    as numpy arrays), when tensors and buffers hold at least CALL_FRAME_MIN_BYTES and
    nothing in the arguments only Ray may serialize (ObjectRefs, actor handles: Ray
    tracks who borrows them); else None. The caller puts it in Ray's object store
    once for every rank.

    Why: Ray pickles a CPU tensor through torch's storage reducer (a torch.save into
    bytes) once per receiving actor, and any argument once per call: 509 MiB of
    weights into two vLLM workers that way took 2.4x vLLM's own mp executor
    (benchmarks/vllm_weight_update.py). The views are written into the object store
    by Ray's pickle5 path straight from their memory and read back without a copy
    (`unpack_call`)."""
    if not args and not kwargs:  # most calls: nothing to measure, nothing to pickle twice
        return None
    buffers: list[Any] = []
    buf = io.BytesIO()
    pickler = _Pickler(buf, buffer_callback=buffers.append)  # out of band: no copy here
    pickler.refuse_handles = True
    try:
        pickler.dump((args, kwargs))
    except (_OnDevice, _RayHandle):
        return None
    if pickler.size + sum(b.raw().nbytes for b in buffers) < CALL_FRAME_MIN_BYTES:
        return None
    views = [(t if t.is_contiguous() else t.contiguous()).reshape(-1).view(torch.uint8).numpy()
             for t in pickler.tensors]
    return bytes(buf.getbuffer()), views, [_as_array(b) for b in buffers]


def _as_array(buffer: pickle.PickleBuffer) -> Any:
    import numpy as np

    return np.frombuffer(buffer.raw(), dtype=np.uint8)


def unpack_call(parts: tuple[bytes, list[Any], list[Any]]) -> Any:
    """The `(args, kwargs)` that `pack_call` split. Its tensors and arrays are views of
    the buffers as received: from Ray's object store these are read-only memory that
    the ranks on one node share, so a worker must copy one before writing to it (as
    with numpy arrays from Ray's object store)."""
    skeleton, views, buffers = parts
    return _PartsUnpickler(io.BytesIO(skeleton), views, buffers).load()


class _PartsUnpickler(pickle.Unpickler):
    """Tensors of a `pack_call` skeleton, each from its own buffer. A tensor's first
    reference comes in the order the buffers were made; a tensor referenced twice
    (tied weights) has the same offset both times and comes back as one tensor."""

    def __init__(self, file: io.BytesIO, views: list[Any], buffers: list[Any]) -> None:
        super().__init__(file, buffers=buffers)
        self.views = iter(views)
        self.loaded: dict[int, torch.Tensor] = {}  # offset -> tensor

    def persistent_load(self, pid: Any) -> torch.Tensor:
        offset, dtype_name, shape = pid
        if offset not in self.loaded:
            view, dtype = next(self.views), _DTYPES[dtype_name]
            self.loaded[offset] = (torch.empty(shape, dtype=dtype) if view.nbytes == 0 else
                                   torch.frombuffer(view, dtype=dtype).view(shape))
        return self.loaded[offset]


def is_frame(value: Any) -> bool:
    return type(value) is bytes and len(value) >= TRAILER.size and (
        value.endswith(MAGIC_ONE) or value.endswith(MAGIC_FLAT) or value.endswith(MAGIC))


def unpack(value: Any) -> Any:
    """The message inside a frame made by `pack`; any other value as it is. The
    skeleton comes first in a frame, and pickle stops at its end, so the frame
    itself is what pickle reads (no slice of it is made)."""
    if type(value) is not bytes:
        return value
    if value.endswith(MAGIC_ONE):
        return _unpack_one(value)
    if value.endswith(MAGIC_FLAT):
        return _unflatten(value)
    if not value.endswith(MAGIC):
        return value
    outer = getattr(_LOADING, "frame", None)  # a frame unpacked inside another's load
    _LOADING.frame = value
    try:
        return pickle.loads(value)
    finally:
        _LOADING.frame = outer
