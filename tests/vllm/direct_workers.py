"""HfTrainerWorker with switchable faults, for the direct-path error tests (an
importable module, so Ray workers load it by name)."""

from __future__ import annotations

from rayexec.integrations.vllm.trainer import HfTrainerWorker
from rayexec.weights.plan import WeightSpec
from tests.weight_workers import _DieOnAccess

RENAMED = "model.layers.0.self_attn.q_proj.weight"
RESHAPED = "model.layers.1.mlp.down_proj.weight"


class FaultyHfTrainer(HfTrainerWorker):
    """set_fault("rename"): one tensor under a name vLLM lacks; "reshape": one tensor
    one row short; "die": rank 1 exits midway through sending."""

    fault = ""
    calls = 0

    def set_fault(self, fault: str) -> None:
        self.fault, self.calls = fault, 0

    def weight_shards(self):
        shards = super().weight_shards()
        if self.fault == "rename":
            shards[RENAMED.replace("q_proj", "query")] = shards.pop(RENAMED)
        elif self.fault == "reshape":
            t, spec = shards[RESHAPED]
            shards[RESHAPED] = (t[:-1], WeightSpec((spec.shape[0] - 1, *spec.shape[1:]),
                                                   spec.dtype))
        elif self.fault == "die" and self.rank == 1:
            self.calls += 1
            if self.calls >= 2:  # the first call only describes; the second sends
                return _DieOnAccess(shards, 5)
        return shards
