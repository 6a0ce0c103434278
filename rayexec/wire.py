"""What crosses a step's CPU edges: one `bytes` frame per message.

Ray's compiled-graph channels hand `bytes` over as they are (their RAW fast path: no
msgpack, no pickle, no tensor extraction), while any other value goes through Ray's
serializer, and torch tensors through its tensor transport, which costs several times
the bytes they hold on CPU (docs/benchmarks.md has the side-by-side numbers). So on
CPU edges rayexec sends every message -- the driver's `(step, batch)`, a stage's
`(step, batch, intermediate)`, the last stage's output -- as one frame:

    MAGIC | skeleton length | skeleton (pickle) | pad to 64 | tensor bytes | ...

The skeleton is the message pickled (cloudpickle, so classes defined in `__main__`
travel) with every plain CPU tensor replaced by a reference (offset, dtype, shape)
into the data that follows it. `unpack` rebuilds those tensors as views of the frame:
no copy on the receiving side. A message holding a tensor on another device (CUDA,
NPU, meta) is not framed: `pack` returns it unchanged, and it takes the edge's
tensor transport (NCCL, gloo or Ray's shm).

Tensors rebuilt from a frame share memory with it. The frame belongs to the step that
received it, so writing to them in place is safe; it just must not be expected to
change what the sender holds. Not here: which edges use frames (dag.py decides).
"""

from __future__ import annotations

import ctypes
import io
import pickle
import struct
import warnings
from typing import Any

import cloudpickle
import torch

MAGIC = b"RXF1"
HEADER = struct.Struct("<4sQ")  # magic, skeleton length
ALIGN = 64  # tensor data starts on cache-line boundaries

# torch.frombuffer warns that `bytes` is read-only; the frame is private to the step
# that received it (see the module docstring), so the warning says nothing useful.
warnings.filterwarnings("ignore", message="The given buffer is not writable",
                        category=UserWarning)

_DTYPES = {str(d): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
)}


class _OnDevice(Exception):
    """A tensor that is not in host memory: the message keeps its transport."""


class _Pickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []
        self.size = 0  # bytes of tensor data so far, padding included
        self.seen: dict[int, Any] = {}  # id -> reference: a tensor shared twice travels once

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not torch.Tensor:  # subclasses (Parameter, ...) pickle as usual
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
        return ref


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, frame: bytes, data_start: int) -> None:
        super().__init__(file)
        self.frame, self.data_start = frame, data_start

    def persistent_load(self, pid: Any) -> torch.Tensor:
        offset, dtype_name, shape = pid
        dtype = _DTYPES[dtype_name]
        count = 1
        for n in shape:
            count *= n
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self.frame, dtype=dtype, count=count,
                                offset=self.data_start + offset)
        return flat if len(shape) == 1 else flat.view(shape)


def pack(message: Any) -> Any:
    """`message` as one bytes frame; `message` itself when it holds a tensor that is
    not in host memory (it then needs the edge's tensor transport)."""
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    try:
        pickler.dump(message)
    except _OnDevice:
        return message
    skeleton = buf.getbuffer()
    head = HEADER.size + len(skeleton)
    parts: list[Any] = [HEADER.pack(MAGIC, len(skeleton)), skeleton]
    written = 0
    keep: list[torch.Tensor] = []
    pad_to_data = -head % ALIGN
    if pickler.tensors:
        parts.append(bytes(pad_to_data))
    for t in pickler.tensors:
        pad = -written % ALIGN
        if pad:
            parts.append(bytes(pad))
        if not t.is_contiguous():
            t = t.contiguous()
            keep.append(t)  # _host_bytes does not hold the copy's memory
        data = _host_bytes(t)
        parts.append(data)
        written += pad + len(data)
    return b"".join(parts)


def _host_bytes(t: torch.Tensor) -> Any:
    """A buffer over a contiguous host tensor's bytes, without a copy: two attribute
    reads instead of a chain of tensor ops (detach, reshape, view, numpy), which
    costs 1 us instead of 3 per tensor and step. The buffer does not own the memory:
    the caller keeps `t` alive until the bytes are joined."""
    nbytes = t.nbytes
    if nbytes == 0:
        return b""
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def is_frame(value: Any) -> bool:
    return isinstance(value, bytes) and value[:len(MAGIC)] == MAGIC


def unpack(value: Any) -> Any:
    """The message inside a frame made by `pack`; any other value as it is."""
    if not is_frame(value):
        return value
    _, skeleton_len = HEADER.unpack_from(value)
    start = HEADER.size
    head = start + skeleton_len
    data_start = head + (-head % ALIGN)
    skeleton = io.BytesIO(memoryview(value)[start:head])
    return _Unpickler(skeleton, value, data_start).load()
