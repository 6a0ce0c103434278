"""The reference model rayexec serves: a small Llama-style decoder with real tensor
and pipeline parallelism, its worker class and a greedy engine loop.

    from rayexec import RayDistributedExecutor
    from rayexec.models import decoder_executor_config, generate, make_prompts

    cfg = decoder_executor_config(pp=2, tp=2, model="small", seed=0)
    with RayDistributedExecutor(cfg) as ex:
        result = generate(ex, make_prompts(8, 16, 4096, seed=0), max_new_tokens=32)

`ReferenceModel` is the same function in one process without Ray. Embedding and
LM head are replicated across TP ranks (see decoder.py for why).
"""

from rayexec.models.batch import StepBatch, StepOutput
from rayexec.models.config import PRESETS, DecoderConfig
from rayexec.models.decoder import DecoderShard
from rayexec.models.engine import (
    GenerateResult,
    generate,
    make_decode_batch,
    make_prompts,
    new_request_ids,
)
from rayexec.models.kv_cache import KVCache
from rayexec.models.reference import ReferenceModel
from rayexec.models.worker import DecoderWorker, decoder_executor_config

__all__ = [
    "PRESETS",
    "DecoderConfig",
    "DecoderShard",
    "DecoderWorker",
    "GenerateResult",
    "KVCache",
    "ReferenceModel",
    "StepBatch",
    "StepOutput",
    "decoder_executor_config",
    "generate",
    "make_decode_batch",
    "make_prompts",
    "new_request_ids",
]
