"""Worker classes the integration tests run inside rayexec's actors.

They live in an importable module (tests.workers) so that Ray workers, which get
the driver's working directory on sys.path, can import them by name.
"""

from __future__ import annotations

import os
import time


class RecordingWorker:
    """Records how it was built and called; execute_model does small, checkable
    arithmetic so that every PP x TP layout has a known answer.

    A batch is a dict: {"x": [floats]} plus optional controls:
    "fail_rank" (raise there), "sleep" (seconds per stage), "tensor_elems"
    (stage 0 makes a float32 arange of that size; later stages check and pass it on).
    """

    def __init__(self, rank, local_rank, world_size, pp_rank, tp_rank,
                 distributed_init_method, **extra):
        self.init_kwargs = dict(rank=rank, local_rank=local_rank, world_size=world_size,
                                pp_rank=pp_rank, tp_rank=tp_rank,
                                distributed_init_method=distributed_init_method, **extra)
        self.rank, self.pp_rank = rank, pp_rank
        self.phases = ["__init__"]
        self.timeline = []  # (step marker, start, end)

    def init_device(self):
        self.phases.append("init_device")

    def load_model(self):
        self.phases.append("load_model")

    def get_init_kwargs(self):
        return self.init_kwargs

    def get_phases(self):
        return list(self.phases)

    def get_env(self, names):
        return {n: os.environ.get(n) for n in names}

    def get_timeline(self):
        return list(self.timeline)

    def echo(self, value):
        return value

    def fail(self, message):
        raise ValueError(message)

    def sleep(self, seconds):
        time.sleep(seconds)
        return self.rank

    def execute_model(self, batch, intermediate=None):
        import torch

        start = time.time()
        if batch.get("fail_rank") == self.rank:
            raise RuntimeError(f"planned failure on rank {self.rank}")
        if batch.get("sleep"):
            time.sleep(batch["sleep"])
        if intermediate is None:
            h = torch.tensor(batch["x"], dtype=torch.float32)
            path = []
            big = None
            if batch.get("tensor_elems"):
                big = torch.arange(batch["tensor_elems"], dtype=torch.float32)
        else:
            h, path, big = intermediate["h"], intermediate["path"], intermediate["big"]
            if big is not None:
                expected = torch.arange(big.numel(), dtype=torch.float32)
                assert torch.equal(big, expected), f"rank {self.rank}: big tensor corrupted"
        h = h * (self.pp_rank + 2) + 1
        self.timeline.append((batch.get("marker"), start, time.time()))
        return {"h": h, "path": [*path, self.rank], "big": big}


def expected(x, pp=2):
    """RecordingWorker's output "h" for input x after `pp` stages."""
    import torch

    h = torch.tensor(x, dtype=torch.float32)
    for pp_rank in range(pp):
        h = h * (pp_rank + 2) + 1
    return h


class RankOnlyWorker:
    """A constructor that takes only `rank`: rayexec refuses it on the driver."""

    def __init__(self, rank):
        self.rank = rank


class BrokenInitWorker(RecordingWorker):
    """Raises in __init__ on rank 1."""

    def __init__(self, rank, **kwargs):
        if rank == 1:
            raise RuntimeError("cannot build the worker on rank 1")
        super().__init__(rank=rank, **kwargs)


class IdentityWorker:
    """Reports where it runs; never touches a device (for fake-GPU clusters)."""

    def __init__(self, rank, local_rank, world_size, pp_rank, tp_rank,
                 distributed_init_method):
        self.info = dict(rank=rank, local_rank=local_rank, pp_rank=pp_rank, tp_rank=tp_rank)

    def report(self):
        import ray

        return {
            **self.info,
            "node_ip": ray.util.get_node_ip_address(),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "RAYEXEC_HOST_IP": os.environ.get("RAYEXEC_HOST_IP"),
            "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        }

    def execute_model(self, batch, intermediate=None):
        return (intermediate or []) + [self.info["rank"]]


class CudaWorker:
    """Uses its GPU for real: for the gpu-marked tests."""

    def __init__(self, rank, local_rank, world_size, pp_rank, tp_rank,
                 distributed_init_method):
        self.rank, self.local_rank, self.pp_rank = rank, local_rank, pp_rank
        self.init_method, self.world_size = distributed_init_method, world_size

    def init_device(self):
        import torch

        torch.cuda.set_device(self.local_rank)
        self.device = torch.device("cuda", self.local_rank)

    def report(self):
        import ray
        import torch

        return {
            "rank": self.rank, "local_rank": self.local_rank,
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device_count": torch.cuda.device_count(),
            "current_device": torch.cuda.current_device(),
            "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        }

    def all_reduce_rank(self):
        """torch.distributed over NCCL across every rank: returns sum of ranks."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl", init_method=self.init_method,
                                    rank=self.rank, world_size=self.world_size)
        t = torch.tensor([float(self.rank)], device=self.device)
        dist.all_reduce(t)
        return t.item()

    def execute_model(self, batch, intermediate=None):
        import torch

        if intermediate is None:
            t = torch.arange(batch["n"], dtype=torch.float32, device=self.device) + batch["offset"]
        else:
            t = intermediate["t"]
            assert t.is_cuda and t.device.index == self.local_rank, t.device
            t = t * 2
        return {"t": t.cpu()} if batch["last_stage"] == self.pp_rank else {"t": t}


class StuckWorker(RecordingWorker):
    """Sleeps (practically) forever in execute_model on the rank named by the batch."""

    def execute_model(self, batch, intermediate=None):
        if batch.get("stuck_rank") == self.rank:
            time.sleep(3600)
        return super().execute_model(batch, intermediate)


class DeviceWorker:
    """Has no init_device: relies on rayexec for its device (fake-GPU tests with
    tests.fakes.RecordingPlatform). Records, for every call, the thread it ran on
    and that thread's current device."""

    def __init__(self, rank, local_rank, world_size, pp_rank, tp_rank,
                 distributed_init_method):
        self.rank, self.local_rank = rank, local_rank
        self.seen = []
        self._record("__init__")

    def _record(self, what):
        import threading

        from tests.fakes import current_device

        self.seen.append((what, threading.current_thread().name, current_device()))

    def touch(self):
        self._record("collective_rpc")
        return self.rank

    def get_seen(self):
        return list(self.seen)

    def execute_model(self, batch, intermediate=None):
        self._record(f"execute_model:{batch}")
        return (intermediate or []) + [self.rank]


class CudaDeviceWorker(DeviceWorker):
    """DeviceWorker on real GPUs: records torch.cuda.current_device() per call, and its
    steps pass a CUDA tensor made on the current device, which the next stage checks
    arrived on its own current device."""

    def _record(self, what):
        import threading

        import torch

        self.seen.append((what, threading.current_thread().name, torch.cuda.current_device()))

    def execute_model(self, batch, intermediate=None):
        import torch

        self._record(f"execute_model:{batch}")
        if intermediate is not None:
            t = intermediate["t"]
            assert t.device.index == torch.cuda.current_device() == self.local_rank, \
                (t.device, torch.cuda.current_device(), self.local_rank)
            ranks = intermediate["ranks"]
        else:
            ranks = []
        # Made on the current device: wrong when rayexec did not set it.
        t = torch.full((1024,), float(batch), device="cuda")
        return {"t": t, "ranks": [*ranks, self.rank]}


class HangingLoadWorker(RecordingWorker):
    """load_model never returns on rank 1 (a stuck download, a deadlocked init)."""

    def load_model(self):
        if self.rank == 1:
            time.sleep(3600)
        super().load_model()
