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
