"""wire frames: every message round-trips exactly, tensors come back as views of the
frame, device tensors are left to the edge's transport, and a frame takes Ray's raw
bytes path (no msgpack, no pickle) in its channels."""

from __future__ import annotations

import ctypes
import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from rayexec import wire
from rayexec.park import Park


@dataclass
class Batch:
    ids: torch.Tensor
    note: str


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, Batch):
        assert_same(a.ids, b.ids)
        assert a.note == b.note
    else:
        assert a == b


MESSAGES = [
    (0, None),
    (2**40 + 3, b"\x80\x05pickled batch"),
    (7, {"ids": [1, 2]}, {"t": torch.arange(4096, dtype=torch.uint8)}),
    (1, Batch(torch.arange(6).view(2, 3), "b"), {"h": torch.randn(5, 7).t()}),  # not contiguous
    (2, 3, {"bf16": torch.randn(9).bfloat16(), "bool": torch.tensor([True, False]),
            "scalar": torch.tensor(2.5), "empty": torch.empty(0, 4), "i64": torch.arange(3)}),
    (3, Park(4, 1), None),
    torch.zeros(1 << 20, dtype=torch.float16),
]


@pytest.mark.parametrize("message", MESSAGES, ids=range(len(MESSAGES)))
def test_every_message_round_trips_exactly(message):
    frame = wire.pack(message)
    assert wire.is_frame(frame)
    assert_same(message, wire.unpack(frame))


@pytest.mark.parametrize("tensor", [
    torch.arange(4096, dtype=torch.uint8), torch.tensor(2.5), torch.empty(0, 3),
    torch.randn(4, 6).t(), torch.randn(9).bfloat16().view(3, 3), torch.tensor([True, False]),
    torch.arange(2 ** 7).view((2,) * 7), torch.arange(2 ** 8).view((2,) * 8),
], ids=["uint8", "0-dim", "empty", "not-contiguous", "bf16-2d", "bool", "7-dim", "8-dim"])
def test_a_message_that_is_one_tensor_takes_the_struct_header_form(tensor):
    """One host tensor (what a last stage returns) travels with a struct header and
    no pickle, up to _ONE_MAX_NDIM dimensions (the header must fit before the data);
    more dimensions take the flat form. Either way it comes back exactly, as a view
    of the frame."""
    frame = wire.pack(tensor)
    one = tensor.dim() <= wire._ONE_MAX_NDIM
    assert frame.endswith(wire.MAGIC_ONE if one else wire.MAGIC_FLAT) and wire.is_frame(frame)
    got = wire.unpack(frame)
    assert_same(tensor, got)
    if tensor.numel():
        start = ctypes.cast(ctypes.c_char_p(frame), ctypes.c_void_p).value
        offset = got.data_ptr() - start
        assert 0 <= offset < len(frame) and offset % wire.ALIGN == 0


def test_tensors_the_struct_header_form_cannot_describe_take_the_others():
    grad = torch.ones(2, requires_grad=True)
    assert wire.pack(grad).endswith(wire.MAGIC) and wire.unpack(wire.pack(grad)).requires_grad
    p = torch.nn.Parameter(torch.ones(2))
    assert isinstance(wire.unpack(wire.pack(p)), torch.nn.Parameter)
    meta = torch.empty(3, device="meta")
    assert wire.pack(meta) is meta


def test_tensor_data_is_aligned_and_received_as_views_of_the_frame():
    x = {"a": torch.arange(3, dtype=torch.int8), "b": torch.arange(5, dtype=torch.float64)}
    frame = wire.pack(x)
    got = wire.unpack(frame)
    # Both tensors point into the frame's own memory (no copy on the receiving side),
    # the second one starting on the next ALIGN boundary after the 3-byte first one.
    assert got["b"].data_ptr() - got["a"].data_ptr() == wire.ALIGN
    got["a"].add_(1)  # writable: the frame belongs to the receiving step
    assert got["a"].tolist() == [1, 2, 3]


def test_a_tensor_shared_twice_travels_once_and_stays_shared():
    t = torch.randn(1000)
    frame = wire.pack((t, t))
    assert len(frame) < 2 * t.numel() * 4
    a, b = wire.unpack(frame)
    assert a.data_ptr() == b.data_ptr() and torch.equal(a, t)


def test_device_tensors_are_left_to_the_edge_transport():
    on_device = {"t": torch.empty(3, device="meta")}
    assert wire.pack(on_device) is on_device
    assert wire.unpack(on_device) is on_device


def test_tensors_needing_grad_and_subclasses_pickle_as_usual():
    p = torch.nn.Parameter(torch.ones(2))
    g = torch.ones(2, requires_grad=True)
    got = wire.unpack(wire.pack({"p": p, "g": g}))
    assert isinstance(got["p"], torch.nn.Parameter) and got["g"].requires_grad


def test_values_that_are_not_frames_pass_through_unpack():
    for value in (b"plain bytes", b"", None, (1, 2), "RXF1"):
        assert wire.unpack(value) == value


def test_a_frame_takes_rays_raw_bytes_path():
    import ray
    from ray._private.serialization import RawSerializedObject

    context = ray._private.worker.global_worker.get_serialization_context()
    frame = wire.pack((5, {"t": torch.ones(16)}))
    assert isinstance(context.serialize(frame), RawSerializedObject)


def big_message(fill: int, mib: int = 1):
    t = torch.full((mib << 18,), fill, dtype=torch.float32)  # `mib` MiB
    return (7, "batch", {"t": t, "every_other": t.view(512, -1)[:, ::2], "small": t[:3]})


def test_a_reused_frame_holds_the_same_bytes_as_a_fresh_one():
    message = big_message(1)
    if wire._POOL.enabled:  # frames start as uninitialised memory: dirty it first
        dirty = wire._POOL.take(len(wire.pack(message)))
        ctypes.memset(id(dirty) + wire._BYTES_DATA_OFFSET, 0xAB, len(dirty))
        del dirty
    assert wire.pack(message, reuse=True) == wire.pack(message)
    assert_same(message, wire.unpack(wire.pack(message, reuse=True)))


def test_a_frame_is_rewritten_only_once_nobody_holds_it():
    if not wire._POOL.enabled:
        pytest.skip("this Python cannot write bytes in place; every frame is fresh")
    first = wire.pack(big_message(1), reuse=True)
    held = wire.unpack(first)  # views of `first` keep it alive
    second = wire.pack(big_message(2), reuse=True)
    assert second is not first
    assert torch.equal(held[2]["t"], torch.full((1 << 18,), 1.0))  # untouched
    assert torch.equal(wire.unpack(second)[2]["t"], torch.full((1 << 18,), 2.0))
    del held, first, second
    reused = wire._POOL.reused
    third = wire.pack(big_message(3), reuse=True)
    assert wire._POOL.reused == reused + 1  # a released frame came back
    assert torch.equal(wire.unpack(third)[2]["t"], torch.full((1 << 18,), 3.0))


@pytest.mark.parametrize("mib", [1, 4])
def test_a_large_frame_reaches_the_reader_whole_and_owned(local_ray, mib):
    """Above 1 MiB a stage's frame is handed to Ray as msgpack bin data (one memcpy,
    not Ray's six-thread copy); from GATHER_MIN_BYTES up as pickle-5 buffers that Ray
    writes from the tensors' memory and the reader joins into a frame. Either way
    the reader gets the very frame as bytes of its own: holding more outputs than Ray
    has channel buffers (max_inflight_executions, 10) does not stall the graph, as
    holding Ray's zero-copy numpy outputs does, and a held frame is never reused."""
    import ray
    from ray.dag import InputNode

    @ray.remote(num_cpus=0)
    class Stage:
        def step(self, fill):
            return wire.pack(big_message(fill, mib), reuse=True, channel=True)

    sent = wire.pack(big_message(1, mib), channel=True)
    assert not isinstance(sent, bytes)  # Ray's msgpack form, not its raw bytes path
    assert isinstance(sent, wire._Gathered) == (mib == 4)
    stage = Stage.remote()
    with InputNode() as inp:
        graph = stage.step.bind(inp)
    compiled = graph.experimental_compile(_buffer_size_bytes=8 << 20)
    try:
        held = [compiled.execute(fill).get(timeout=60) for fill in range(1, 13)]
        for fill, frame in enumerate(held, 1):  # frames reused by the sender, too
            assert isinstance(frame, bytes) and frame == wire.pack(big_message(fill, mib))
    finally:
        compiled.teardown()
        ray.kill(stage)
    small = wire.pack((1, torch.ones(4)), channel=True)
    assert isinstance(small, bytes)  # below the size: Ray's raw bytes path as before


def test_a_gathered_frame_sends_tensor_memory_out_of_band_and_joins_back():
    """What Ray's pickle-5 writer does with a `_Gathered`: the tensors' bytes go out
    of band, in pieces of at most GATHER_CHUNK_BYTES (Ray copies larger ones with six
    threads) and without a copy of them made first, and loading joins them into the
    frame `pack` makes."""
    message = big_message(5, 4)  # 4 MiB + 2 MiB (a strided view, made contiguous) + 12 B
    gathered = wire.pack(message, channel=True)
    t = message[2]["t"]
    buffers = []
    inband = pickle.dumps(gathered, protocol=5, buffer_callback=buffers.append)
    assert len(inband) < 4096 and len(buffers) == 6  # 4 + 2 pieces of 1 MiB; 12 B in band
    assert all(b.raw().nbytes <= wire.GATHER_CHUNK_BYTES for b in buffers)
    first = np.frombuffer(buffers[0].raw(), dtype=np.uint8)
    assert first.ctypes.data == t.data_ptr()  # the tensor's own memory, not a copy
    views = [b.raw().toreadonly() for b in buffers]  # as Ray hands channel memory back
    frame = pickle.loads(inband, buffers=views)
    assert frame == wire.pack(message)
    assert_same(message, wire.unpack(frame))


def test_call_arguments_split_into_buffers_come_back_whole_and_shared_stays_shared():
    import numpy as np

    tied = torch.randn(1 << 18)
    weights = {"embed": tied, "lm_head": tied, "other": torch.arange(10.0).view(2, 5)[:, ::2],
               "array": np.arange(1 << 17, dtype=np.float64)}
    parts = wire.pack_call((weights,), {"version": 3})
    assert parts is not None and len(parts[1]) == 2 and len(parts[2]) == 1  # tied: once
    (got,), kwargs = wire.unpack_call(parts)
    assert kwargs == {"version": 3} and got["embed"] is got["lm_head"]
    for name in ("embed", "other"):
        assert torch.equal(got[name], weights[name])
    assert np.array_equal(got["array"], weights["array"])
    assert wire.pack_call(({"small": torch.ones(4)},), {}) is None  # below the size


@pytest.mark.parametrize("message", [
    (3, None, {}), {"a": torch.ones(2), 1: torch.ones(1)}, (1, [torch.ones(2)]), 2.5,
    (True, "s", b"b", {"x": torch.ones(3, requires_grad=True)}), (torch.ones(2), torch.ones(2)),
], ids=range(6))
def test_messages_beside_the_common_shapes_round_trip_too(message):
    """Empty dicts, non-str keys, tensors in lists, tensors needing grad take the
    pickled form; plain values and tensors the flat one: both come back exactly."""
    got = wire.unpack(wire.pack(message))
    if isinstance(message, dict) and 1 in message:
        assert got.keys() == message.keys() and all(torch.equal(got[k], message[k]) for k in got)
    else:
        assert_same(message, got)


def test_what_plain_pickle_would_send_by_a_name_the_workers_lack_goes_by_value():
    """A class named in the driver's `__main__` is not in a worker's (Ray's) `__main__`:
    plain pickle would send only its name, so the frame carries it by value
    (cloudpickle); so does a lambda, which plain pickle cannot send at all."""
    import sys

    main = sys.modules["__main__"]
    cls = type("DriverScriptBatch", (), {"__module__": "__main__"})
    main.DriverScriptBatch = cls  # plain pickle can find it here, by name
    try:
        frame = wire.pack((1, cls(), {"t": torch.ones(2)}))
    finally:
        delattr(main, "DriverScriptBatch")  # as on a worker
    got = wire.unpack(frame)
    assert type(got[1]).__name__ == "DriverScriptBatch" and torch.equal(got[2]["t"], torch.ones(2))
    scale = 3
    assert wire.unpack(wire.pack((2, lambda x: x * scale)))[1](2) == 6
