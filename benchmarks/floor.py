"""FloorChain: the PP x TP step chain of rayexec's DAG built from plain OS processes
and shared memory, without Ray: the limit a transport written in Python could reach.

    driver ─batch─┬─> [pp0,tp0] ─(batch, tensors)─> [pp1,tp0] ─┬─> driver
                  └─> [pp0,tp1] ─(batch, tensors)─> [pp1,tp1] ─┘

One process per rank hosts the engine's worker class with rayexec's worker contract
(rank kwargs, `init_device`, `load_model`, `execute_model(batch, intermediate)`),
pinned to cores the way rayexec pins CPU workers and run at the niceness rayexec's
workers get (0), so that priorities match the Ray modes'. Every edge is one
shared-memory slot with one writer; a message is the batch's pickled bytes (the
driver pickles it once, every stage forwards the bytes unchanged), a small pickle
of the value in which every torch tensor is replaced by an index, and the tensors'
raw bytes, copied once by the writer and read in place (zero-copy) by the reader.
The driver clones the tensors it returns, so a result outlives the next step.
Wake-ups are eventfds (measured here: 5.1 us per round trip between two processes,
pipes 5.6 us; spinning loses on a 2-core machine with more processes than cores).

Steps are synchronous: the driver waits for every last-stage worker before it
returns, so a slot is never rewritten while a reader still needs it (no acks).
Not here: Ray, pipelining several steps, GPUs (tensors travel through host memory).
"""

from __future__ import annotations

import ctypes
import io
import logging
import multiprocessing as mp
import os
import pickle
import select
import signal
import socket
import struct
import time
import traceback
from multiprocessing import reduction
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

from rayexec.config import ExecutorConfig
from rayexec.contract import import_worker_cls

logger = logging.getLogger(__name__)

# seq, flags, batch bytes, value pickle bytes, tensor-table pickle bytes
HEADER = struct.Struct("<QIIII")
ALIGN = 64
STOP = 1
START_TIMEOUT_S = 120.0
FORKSERVER_PRELOAD = ("torch", "ray", "rayexec.models")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class _TensorPickler(pickle.Pickler):
    """Pickles a value with its torch tensors left out (replaced by indices)."""

    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors

    def persistent_id(self, obj: Any) -> int | None:
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, tensors: list[torch.Tensor]) -> None:
        super().__init__(io.BytesIO(data))
        self.tensors = tensors

    def persistent_load(self, pid: int) -> torch.Tensor:
        return self.tensors[pid]


class Slot:
    """One shared-memory message buffer: one writer, readers woken by eventfds."""

    def __init__(self, size: int, name: str | None = None) -> None:
        self.shm = SharedMemory(name=name, create=name is None, size=size if name is None else 0)
        self.name = self.shm.name
        self.size = size
        self.seq = 0

    def write(self, batch: bytes, value: Any, flags: int = 0) -> None:
        tensors: list[torch.Tensor] = []
        out = io.BytesIO()
        _TensorPickler(out, tensors).dump(value)
        pickled = out.getvalue()
        table, size = [], 0  # tensor offsets relative to the data region
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            table.append((str(t.dtype).removeprefix("torch."), tuple(t.shape), size, nbytes))
            size = _align(size + nbytes)
        table_bytes = pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL)
        data = _align(HEADER.size + len(batch) + len(pickled) + len(table_bytes))
        if data + size > self.size:
            raise ValueError(f"a message of {data + size} bytes does not fit the floor's "
                             f"{self.size}-byte slots; pass a larger slot_bytes to FloorChain")
        buf = self.shm.buf
        for t, (_, _, start, nbytes) in zip(tensors, table):
            if nbytes:
                # One memcpy through numpy, never torch's copy_: with more than one
                # torch thread that fans out to OpenMP workers, and on an oversubscribed
                # CPU a 1 MiB copy then waited milliseconds for a helper thread.
                src = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
                buf[data + start:data + start + nbytes] = memoryview(src).cast("B")
        pos = HEADER.size
        for part in (batch, pickled, table_bytes):
            buf[pos:pos + len(part)] = part
            pos += len(part)
        self.seq += 1
        HEADER.pack_into(buf, 0, self.seq, flags, len(batch), len(pickled), len(table_bytes))

    def read(self, clone: bool = False) -> tuple[int, bytes, Any]:
        """(flags, batch bytes, value); tensors are views into the slot unless `clone`."""
        buf = self.shm.buf
        _, flags, nb, npk, ntb = HEADER.unpack_from(buf, 0)
        pos = HEADER.size
        batch = bytes(buf[pos:pos + nb])
        pickled = bytes(buf[pos + nb:pos + nb + npk])
        table = pickle.loads(buf[pos + nb + npk:pos + nb + npk + ntb])
        data = _align(pos + nb + npk + ntb)
        tensors = []
        for dtype, shape, start, nbytes in table:
            if not nbytes:  # an empty tensor: nothing to view
                tensors.append(torch.empty(shape, dtype=getattr(torch, dtype)))
                continue
            raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=data + start)
            t = torch.from_numpy(raw.copy() if clone else raw)  # numpy: a plain memcpy
            tensors.append(t.view(getattr(torch, dtype)).view(shape))
        return flags, batch, _TensorUnpickler(pickled, tensors).load()

    def close(self, unlink: bool = False) -> None:
        try:
            self.shm.close()
        except BufferError:  # a caller still holds a zero-copy view; the OS frees it at exit
            pass
        if unlink:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def _die_with_parent() -> None:
    # A worker blocked in eventfd_read would outlive a killed driver; PR_SET_PDEATHSIG
    # (1) makes the kernel kill it when its parent goes.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _worker_main(spec: dict[str, Any], in_name: str, in_fd: Any, out_name: str,
                 out_fd: Any, conn: Any) -> None:
    """One rank: build the worker, then read - execute_model - write until STOP."""
    _die_with_parent()
    in_fd, out_fd = in_fd.detach(), out_fd.detach()
    rank = spec["kwargs"]["rank"]
    try:
        if spec["cores"]:
            os.sched_setaffinity(0, spec["cores"])
        if spec["niceness"]:
            # Before torch makes its threads, which inherit it (Linux nice is per thread).
            os.setpriority(os.PRIO_PROCESS, 0, spec["niceness"])
        torch.set_num_threads(spec["threads"])
        worker = import_worker_cls(spec["worker_cls"])(**spec["kwargs"])
        for phase in ("init_device", "load_model"):
            if callable(getattr(worker, phase, None)):
                getattr(worker, phase)()
        inbox, outbox = Slot(spec["slot_bytes"], in_name), Slot(spec["slot_bytes"], out_name)
        conn.send(("ready", rank, None))
        first, last = spec["first"], spec["last"]
        while True:
            os.eventfd_read(in_fd)
            flags, batch_bytes, value = inbox.read()
            if flags & STOP:
                outbox.write(b"", None, STOP)
                os.eventfd_write(out_fd, 1)
                break
            batch = pickle.loads(batch_bytes)
            out = worker.execute_model(batch, None if first else value)
            del value  # drop the views into the inbox before it can be rewritten
            outbox.write(b"" if last else batch_bytes, out)
            os.eventfd_write(out_fd, 1)
    except BaseException:
        conn.send(("error", rank, traceback.format_exc()))
        conn.close()
        os._exit(1)
    # Skip interpreter finalization: with zero-copy views into shared memory alive it
    # spun in the garbage collector (seen with py-spy) instead of exiting.
    conn.close()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FloorChain:
    """`execute_model(batch)` through PP x TP plain processes; see the module docstring."""

    def __init__(self, worker_cls: type | str, worker_kwargs: dict[str, Any], pp: int, tp: int,
                 slot_bytes: int = 1 << 20, cpu_bind: bool = True, niceness: int = 0,
                 step_timeout_s: float = 300.0) -> None:
        self.pp, self.tp, self.world_size = pp, tp, pp * tp
        self.step_timeout_s = step_timeout_s
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._fds: list[int] = []
        self._slots: list[Slot] = []
        self._closed = False
        try:
            self._start(worker_cls, dict(worker_kwargs), _align(slot_bytes) + 4096, cpu_bind,
                        niceness)
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def from_config(cls, config: ExecutorConfig, **kwargs: Any) -> FloorChain:
        """The same worker class, kwargs and layout as a rayexec executor's."""
        return cls(config.worker_cls, dict(config.worker_kwargs), config.pipeline_parallel_size,
                   config.tensor_parallel_size, **kwargs)

    def _eventfd(self) -> int:
        fd = os.eventfd(0)
        self._fds.append(fd)
        return fd

    def _start(self, worker_cls: type | str, worker_kwargs: dict[str, Any], slot_bytes: int,
               cpu_bind: bool, niceness: int) -> None:
        pp, tp, ncpu = self.pp, self.tp, os.cpu_count() or 1
        threads = max(1, ncpu // self.world_size)  # as rayexec's layout does on one node
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        # Slots: the driver's input, then one per rank (its output).
        self._input = Slot(slot_bytes)
        self._slots.append(self._input)
        self._input_fds = [self._eventfd() for _ in range(tp)]
        outputs = [Slot(slot_bytes) for _ in range(self.world_size)]
        self._slots.extend(outputs)
        out_fds = [self._eventfd() for _ in range(self.world_size)]
        self._outputs = outputs[-tp:]
        self._result_fds = out_fds[-tp:]
        # forkserver: children fork from a clean server that imported torch once (spawn
        # re-imports it per rank: seconds each on 2 cores); plain fork would copy the
        # driver's Ray and torch threads' state. Preload only site-packages modules:
        # Python 3.11's server ignores the driver's sys.path while preloading, and each
        # child re-runs the driver's main module (which imports ray and rayexec).
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
        for rank in range(self.world_size):
            pp_rank, tp_rank = divmod(rank, tp)
            kwargs = {**worker_kwargs, "rank": rank, "local_rank": rank,
                      "world_size": self.world_size, "pp_rank": pp_rank, "tp_rank": tp_rank,
                      "distributed_init_method": init_method}
            spec = {"worker_cls": worker_cls, "kwargs": kwargs, "threads": threads,
                    "cores": (tuple(sorted({(rank * threads + j) % ncpu for j in range(threads)}))
                              if cpu_bind else None),
                    "niceness": niceness, "slot_bytes": slot_bytes, "first": pp_rank == 0,
                    "last": pp_rank == pp - 1}
            prev = rank - tp
            in_name = self._input.name if pp_rank == 0 else outputs[prev].name
            in_fd = self._input_fds[tp_rank] if pp_rank == 0 else out_fds[prev]
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker_main, name=f"floor-rank{rank}", daemon=True,
                args=(spec, in_name, reduction.DupFd(in_fd), outputs[rank].name,
                      reduction.DupFd(out_fds[rank]), child),
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        self._poll = select.poll()
        for fd in self._result_fds:
            self._poll.register(fd, select.POLLIN)
        for proc in self._procs:
            self._poll.register(proc.sentinel, select.POLLIN)
        self._wait_ready()

    def _wait_ready(self) -> None:
        waiting = set(range(self.world_size))
        deadline = time.monotonic() + START_TIMEOUT_S
        while waiting:
            left = deadline - time.monotonic()
            ready = mp.connection.wait([self._conns[r] for r in waiting]
                                       + [self._procs[r].sentinel for r in waiting], left)
            if not ready:
                raise TimeoutError(f"floor ranks {sorted(waiting)} not ready after "
                                   f"{START_TIMEOUT_S:g}s (worker construction or load_model)")
            for rank in list(waiting):
                if self._conns[rank] in ready or self._procs[rank].sentinel in ready:
                    self._check_message(rank)
                    waiting.discard(rank)

    def _check_message(self, rank: int) -> None:
        try:
            kind, _, detail = self._conns[rank].recv()
        except EOFError:
            raise RuntimeError(f"floor rank {rank} exited (code {self._procs[rank].exitcode}) "
                               f"without a word") from None
        if kind == "error":
            raise RuntimeError(f"floor rank {rank} failed:\n{detail}")

    def execute_model(self, batch: Any) -> Any:
        """One step; the last stage's tp_rank 0 output, tensors cloned."""
        if self._closed:
            raise RuntimeError("FloorChain.execute_model after shutdown(); build a new one")
        self._input.write(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL), None)
        for fd in self._input_fds:
            os.eventfd_write(fd, 1)
        self._wait_results()
        return self._outputs[0].read(clone=True)[2]

    def _wait_results(self) -> None:
        pending = set(self._result_fds)
        deadline = time.monotonic() + self.step_timeout_s
        while pending:
            events = self._poll.poll(max(0, int((deadline - time.monotonic()) * 1000)))
            if not events:
                late = sorted(self._result_fds.index(f) for f in pending)
                raise TimeoutError(f"floor step took more than {self.step_timeout_s:g}s; last-"
                                   f"stage tp ranks {late} did not answer")
            for fd, _ in events:
                if fd in pending:
                    os.eventfd_read(fd)
                    pending.discard(fd)
                elif fd not in self._result_fds:  # a process sentinel: a worker ended
                    rank = [p.sentinel for p in self._procs].index(fd)
                    if self._conns[rank].poll():
                        self._check_message(rank)
                    raise RuntimeError(f"floor rank {rank} exited with code "
                                       f"{self._procs[rank].exitcode} during a step")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (STOP message, then terminate stragglers), free the slots."""
        if self._closed:
            return
        self._closed = True
        if self._procs and all(p.is_alive() for p in self._procs):
            try:
                self._input.write(b"", None, STOP)
                for fd in self._input_fds:
                    os.eventfd_write(fd, 1)
            except Exception as e:
                logger.debug("floor: sending STOP failed: %s", e)
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                logger.warning("floor worker %s did not stop; terminating it", proc.name)
                proc.kill()
                proc.join(2.0)
        for conn in self._conns:
            conn.close()
        for slot in self._slots:
            slot.close(unlink=True)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> FloorChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
