"""ReferenceModel: the whole decoder in this process, with no Ray and no
torch.distributed: the function every PP x TP layout must reproduce, and the
`local` baseline of the benchmark.

It answers `execute_model(batch, non_block=False)` like RayDistributedExecutor, so
the engine loop (`engine.generate`) and `engine.make_decode_batch` drive it
unchanged. Not here: sharding (it is one shard holding everything).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from rayexec.models.batch import StepBatch, StepOutput
from rayexec.models.config import DecoderConfig
from rayexec.models.decoder import DecoderShard


class ReferenceModel:
    """All layers, TP=1, embedding and LM head, one KV cache."""

    def __init__(self, model: DecoderConfig | Mapping[str, Any] | str = "small", seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.model = DecoderConfig.from_any(model)
        self.seed = seed
        self.shard = DecoderShard(self.model, seed, range(self.model.num_layers), device=device)

    def execute_model(self, batch: StepBatch, non_block: bool = False
                      ) -> StepOutput | Future:
        """One step over the whole model; with `non_block` an already-done future."""
        out = self.decode_step(batch)
        if not non_block:
            return out
        future: Future = Future()
        future.set_result(out)
        return future

    def decode_step(self, batch: StepBatch) -> StepOutput:
        """One forward step (prefill, decode or mixed) and greedy sampling."""
        return self.shard.sample(batch, self.shard.forward(batch))

    def prefill(self, request_ids: Sequence[int], prompts: Sequence[Sequence[int]],
                return_logits: bool = False) -> StepOutput:
        return self.decode_step(StepBatch.prefill(request_ids, prompts,
                                                  return_logits=return_logits))

    def kv_cache_stats(self) -> dict[str, int]:
        return self.shard.cache.stats()
