"""Trainer workers with faults and bad layouts, for the weight-sync tests (an
importable module, so Ray workers can load them by name)."""

from __future__ import annotations

import os

from rayexec.models.trainer import TrainerWorker
from rayexec.weights.plan import WeightSpec


class _DieOnAccess(dict):
    """weight_shards() of a rank that dies while the sync packs its `after`-th tensor."""

    def __init__(self, items, after):
        super().__init__(items)
        self.left = after

    def __getitem__(self, key):
        self.left -= 1
        if self.left < 0:
            os._exit(1)
        return super().__getitem__(key)


class BadTrainer(TrainerWorker):
    """`fault`: "extra_name" (holds a tensor the server lacks), "half" (rank 0 holds
    only part 0 of 2 of layers.0.q_proj, and nobody holds part 1), "die" (rank
    `die_rank` exits mid-sync)."""

    def __init__(self, *args, fault: str = "", die_rank: int = 1, die_after: int = 3, **kw):
        super().__init__(*args, **kw)
        self.fault, self.die_rank, self.die_after = fault, die_rank, die_after
        self.calls = 0

    def weight_shards(self):
        shards = super().weight_shards()
        if self.fault == "extra_name":
            t, _ = shards["final_norm"]
            shards["value_head"] = (t, WeightSpec(tuple(t.shape), "float32"))
        elif self.fault == "half":
            t, spec = shards["layers.0.q_proj"]
            rows = spec.shape[0] // 2
            shards["layers.0.q_proj"] = (t[:rows], WeightSpec(spec.shape, spec.dtype, 0, 2, 0))
        elif self.fault == "die" and self.rank == self.die_rank:
            self.calls += 1
            if self.calls >= 2:  # the first call only describes; the second sends
                return _DieOnAccess(shards, self.die_after)
        return shards


class CudaTrainer(TrainerWorker):
    """A trainer whose shards live on its GPU (the model trains on the CPU; each
    weight_shards() call copies the weights onto the device), so the sync between it
    and a CUDA executor takes the NCCL path. device="cpu" keeps them on the CPU."""

    def __init__(self, *args, device: str = "cuda", **kw):
        super().__init__(*args, **kw)
        self.device_kind = device

    def weight_shards(self):
        import torch

        device = (torch.device("cuda", torch.cuda.current_device())
                  if self.device_kind == "cuda" else torch.device("cpu"))
        self._on_device = {n: (t.to(device), spec)
                           for n, (t, spec) in super().weight_shards().items()}
        return self._on_device

    def cpu_shards(self):
        return {n: (t.cpu(), spec) for n, (t, spec) in self.weight_shards().items()}
