"""rayexec's direct weight path into a vLLM engine: trainer actors send each vLLM
worker actor exactly the slices its TP shard / PP stage loads, actor to actor.

    from rayexec.integrations.vllm import update_weights
    report = update_weights(llm, trainer_group, version=step)

`llm` is a `vllm.LLM` built with `distributed_executor_backend=RayexecExecutor`
and the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0);
`trainer_group` a rayexec `WorkerGroup` whose workers implement
`weight_shards() -> {checkpoint name: (tensor, WeightSpec)}` in the engine's dtype
(e.g. `HfTrainerWorker`, trainer.py). The sync is rayexec's (rayexec/weights/:
the resharding plan, then the bytes between the actors, never through this
process: on one node with CPU weights through Ray's object store, each tensor put
once by the trainer and mapped by the vLLM workers without a copy, which hand it
to vLLM's loader as is; else gloo/NCCL point-to-point in rounds of at most
`bucket_bytes` per pair; `via=` picks one). It runs staged:
each vLLM worker collects all of its slices, the driver checks every rank
finished, and only then does every rank load them (VllmWorker.load_weights ->
vLLM's reload_weights). So a wrong name or shape (refused while planning, before
any byte moves), a dead or stuck trainer, or a refused load leaves the engine
serving the weights it had.

Not here: what a worker needs (weight_layout.py), moving bytes (rayexec/weights/).
"""

from __future__ import annotations

import logging
from typing import Any

from rayexec.errors import WeightSyncError
from rayexec.group import WorkerGroup
from rayexec.weights.sync import DEFAULT_BUCKET_BYTES, DEFAULT_SYNC_TIMEOUT_S, SyncReport

logger = logging.getLogger(__name__)


def rayexec_executor(llm: Any) -> Any:
    """The RayexecExecutor behind `llm` (a vllm.LLM), or a TypeError saying why not."""
    from rayexec.integrations.vllm.executor import RayexecExecutor

    engine = getattr(llm, "llm_engine", llm)
    client = getattr(engine, "engine_core", None)
    core = getattr(client, "engine_core", None)  # InprocClient's EngineCore
    if core is None:
        raise TypeError(
            f"update_weights(llm=...): the engine core of {type(llm).__name__} runs in its own "
            f"process ({type(client).__name__}), where this process cannot reach its worker "
            f"actors. Start the engine with VLLM_ENABLE_V1_MULTIPROCESSING=0 (engine core "
            f"in this process), or use vLLM's collective_rpc path (docs/vllm-rl-direct.md)")
    executor = core.model_executor
    if not isinstance(executor, RayexecExecutor):
        raise TypeError(f"update_weights(llm=...): the engine runs on "
                        f"{type(executor).__name__}; build it with "
                        f"distributed_executor_backend=RayexecExecutor")
    return executor


def update_weights(llm: Any, source: WorkerGroup, *, version: Any = None,
                   bucket_bytes: int | None = None, timeout: float | None = None,
                   via: str = "auto") -> SyncReport:
    """Move `source`'s weights into `llm`'s vLLM workers (see the module docstring)
    and return rayexec's SyncReport (bytes per rank, seconds, rounds). `version`
    defaults to the previous one + 1; `bucket_bytes` bounds each message buffer
    (default 32 MiB); `timeout` bounds the whole sync (default
    ExecutorConfig.rpc_timeout_s, else DEFAULT_SYNC_TIMEOUT_S); `via` the route
    ("auto", "object_store", "process_group"; rayexec/weights/sync.py). Raises
    ValueError (names or shapes disagree: nothing moved) or WeightSyncError
    (a rank failed or died: nothing loaded); the engine keeps its weights."""
    executor = rayexec_executor(llm).rayexec
    if not isinstance(source, WorkerGroup):
        raise TypeError(f"update_weights(source=...) takes a rayexec WorkerGroup of trainer "
                        f"workers, got {type(source).__name__}")
    bound = timeout or executor.config.rpc_timeout_s or DEFAULT_SYNC_TIMEOUT_S
    try:
        report = executor.update_weights(
            source, version=version, bucket_bytes=bucket_bytes or DEFAULT_BUCKET_BYTES,
            stage=True, timeout=bound, via=via)
    except WeightSyncError as e:
        raise WeightSyncError(f"{e} (the wait was bounded by update_weights(timeout="
                              f"{bound:g}s), default ExecutorConfig.rpc_timeout_s or "
                              f"DEFAULT_SYNC_TIMEOUT_S)") from e
    logger.info("vLLM weights now at version %r: %.1f MiB in %.3fs", report.version,
                report.bytes / 2**20, report.seconds)
    return report
