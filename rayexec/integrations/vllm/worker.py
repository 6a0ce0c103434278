"""VllmWorker: vLLM's own worker, hosted in a rayexec worker actor.

rayexec builds one `VllmWorker` per rank with its rank keyword arguments (rank,
local_rank, world_size, pp_rank, tp_rank, distributed_init_method) plus the
`vllm_config`, then calls `init_device()` and `load_model()`. Inside, vLLM's
`WorkerWrapperBase` builds the platform's worker class (CPUWorker, GPU Worker, ...)
exactly as vLLM's multiprocessing backend does. Every other method the engine
names through `collective_rpc` (`determine_available_memory`,
`initialize_from_config`, ...) is forwarded to that wrapper.

`execute_model(batch, intermediate)` is the step rayexec binds into its compiled
PP x TP DAG: `batch` is `(scheduler_output, grammar_output)` pickled once by the
executor (every stage then forwards the same bytes; Ray's channels move bytes
cheaper than Python objects); stages before the last return vLLM's
`IntermediateTensors`, which rayexec carries to the next stage over the DAG's tensor
transport (small CPU ones pickled into bytes, which Ray's channels carry more
cheaply: `edges.py`), and the last stage samples and returns the
`ModelRunnerOutput`, pickled (the other TP ranks return b""). This replaces
vLLM's torch.distributed send/recv between stages; tensor-parallel collectives
stay vLLM's own. (Unlike vLLM's Ray backend, later stages receive the multimodal
features too: the batch is not re-serialized.)

Once vLLM's groups are up, the worker unlinks the /dev/shm names of the shared
memory they set up (`shm.release_shm_names`): rayexec kills workers at
shutdown, and vLLM's own clean-up runs only at a clean process exit.

Weight sync destination (rayexec's direct path, `direct.py`): `weight_layout()`
says which slice of each checkpoint tensor this rank's loaders read (found by
replaying vLLM's loaders on shapes: `weight_layout.py`), and `load_weights` hands
the received slices, inside full-shaped tensors, to vLLM's
`model_runner.reload_weights` (which re-runs vLLM's post-load processing). Every
name and shape is checked before anything is loaded.

Imports vLLM at import time: only worker processes and the executor module import
this file. It does not place, order or start anything (rayexec does).
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.sequence import IntermediateTensors
from vllm.v1.outputs import AsyncModelRunnerOutput
from vllm.v1.worker.worker_base import WorkerWrapperBase

from rayexec.integrations.vllm.cpu_env import OMP_BIND_VAR, format_cpu_ids
from rayexec.integrations.vllm.edges import pack_for_next_stage, unpack_from_previous_stage
from rayexec.integrations.vllm.shm import release_shm_names
from rayexec.integrations.vllm.weight_layout import (
    checkpoint_shapes,
    full_shaped,
    needed_regions,
)
from rayexec.weights.plan import WeightSpec

logger = logging.getLogger(__name__)


class VllmWorker:
    """One rank of a vLLM engine inside a rayexec actor (see the module docstring)."""

    def __init__(
        self,
        rank: int,
        local_rank: int,
        world_size: int,
        pp_rank: int,
        tp_rank: int,
        distributed_init_method: str,
        vllm_config: VllmConfig,
        cpu_bind: bool = True,
    ) -> None:
        self.rank = rank
        self.tp_rank = tp_rank
        self.is_first_stage = pp_rank == 0
        self.is_last_stage = pp_rank == vllm_config.parallel_config.pipeline_parallel_size - 1
        self._step_threads: set[int] = set()
        self._weight_layout: dict[str, WeightSpec] | None = None
        self._unreceived_fill: float | None = None
        self.weights_version: Any = None
        self._cpu_threads = torch.get_num_threads()  # as rayexec set them for this worker
        if vllm_config.device_config.device_type == "cpu" and cpu_bind:
            self._publish_cpu_binding()
        self.wrapper = WorkerWrapperBase(rpc_rank=rank, global_rank=rank)
        # init_worker takes one kwargs dict per rank and picks its own by rpc_rank.
        all_kwargs: list[dict[str, Any]] = [{} for _ in range(world_size)]
        all_kwargs[rank] = {
            "vllm_config": vllm_config,
            "local_rank": local_rank,
            "rank": rank,
            "distributed_init_method": distributed_init_method,
            # vLLM's convention: the first worker of each TP group drives its group.
            "is_driver_worker": tp_rank == 0,
        }
        self.wrapper.init_worker(all_kwargs)

    def _publish_cpu_binding(self) -> None:
        # rayexec pinned this process to its cores before building us. vLLM's
        # multiprocessing backend turns VLLM_CPU_OMP_THREADS_BIND into OpenMP
        # placement at spawn; here the pinning is already done, so the variable
        # only tells vLLM code in this process which cores are ours.
        cores = format_cpu_ids(sorted(os.sched_getaffinity(0)))
        logger.debug("rank %d: %s=%s (the process affinity)", self.rank, OMP_BIND_VAR, cores)
        os.environ[OMP_BIND_VAR] = cores

    # ---- phases rayexec calls in order -----------------------------------------------
    def init_device(self) -> None:
        self.wrapper.init_device()
        release_shm_names()

    def load_model(self) -> None:
        from vllm import envs
        from vllm.platforms import current_platform

        self.wrapper.load_model()
        runner = self.wrapper.worker.model_runner
        if not self.is_first_stage and getattr(runner, "intermediate_tensors", False) is None:
            # A later stage's receive buffers are allocated by vLLM's warm-up run,
            # which vLLM 0.32's CPU worker skips in eager mode (its own PP then
            # fails with an AssertionError). Allocate them as that run would.
            runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
                batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype,
                device=runner.device)
        # As vLLM's multiprocessing worker does after loading: the attention
        # backend may change the block size, and environment lookups are cached
        # from here on (they are on the per-step path).
        current_platform.update_block_size_for_backend(self.wrapper.vllm_config)
        envs.enable_envs_cache()

    # ---- the forward step (bound into rayexec's compiled DAG) ----------------------
    def execute_model(self, batch: bytes, intermediate: Any = None) -> Any:
        """One step. `batch` is the pickled (scheduler_output, grammar_output).

        Returns vLLM's IntermediateTensors for the next stage, or on the last stage
        the pickled ModelRunnerOutput from TP rank 0 (b"" from the other TP ranks;
        None from earlier stages when nothing was scheduled)."""
        scheduler_output, grammar_output = pickle.loads(batch)
        worker = self.wrapper.worker
        if threading.get_ident() not in self._step_threads:
            self._prepare_step_thread(worker)
        runner = worker.model_runner
        output = runner.execute_model(scheduler_output, unpack_from_previous_stage(intermediate))
        if isinstance(output, IntermediateTensors):
            return pack_for_next_stage(output)
        if isinstance(output, AsyncModelRunnerOutput):
            output = output.get_output()
        if not self.is_last_stage:
            return None  # nothing was scheduled; the next stage still sees the batch
        if output is None:
            output = runner.sample_tokens(grammar_output)
            if isinstance(output, AsyncModelRunnerOutput):
                output = output.get_output()
        if self.tp_rank != 0:
            # Every TP rank samples (to keep its state); rank 0 reports. Empty bytes
            # rather than None: Ray's channels pass bytes through unserialized.
            return b""
        # Pickled here, unpickled by the executor: the driver then owns every
        # buffer (Ray's channel would hand it zero-copy numpy views into shared
        # memory that block the channel while the engine holds them).
        return pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL)

    def _prepare_step_thread(self, worker: Any) -> None:
        """Once per thread that runs steps (the DAG runs them on a thread of its own)."""
        if worker.device is not None and worker.device.type != "cpu":
            from vllm.platforms import current_platform

            current_platform.set_device(worker.device)  # the thread's current device
        else:
            # OpenMP's thread count is per thread: a thread Ray starts keeps the
            # process default, while torch keeps the count rayexec set. vLLM's CPU
            # attention checks that the two agree, so set it here too. (Through
            # torch._C because vLLM's CPU worker turns torch.set_num_threads into a
            # no-op once it has bound its threads.)
            torch._C.set_num_threads(self._cpu_threads)
        self._step_threads.add(threading.get_ident())

    # ---- weight sync destination (rayexec.weights contract; see direct.py) ----------
    def weight_layout(self) -> dict[str, WeightSpec]:
        """Checkpoint name -> the slice this rank needs (computed once: the layout
        never changes while the engine runs)."""
        if self._weight_layout is None:
            config = self.wrapper.vllm_config.model_config
            shapes = checkpoint_shapes(config.model, config.revision)
            model = self.wrapper.worker.model_runner.get_model()
            self._weight_layout = needed_regions(model, shapes, config.dtype)
            cut = sum(spec.dim is not None for spec in self._weight_layout.values())
            logger.info("rank %d: needs %d checkpoint tensors (%d of them a slice)",
                        self.rank, len(self._weight_layout), cut)
        return self._weight_layout

    def set_unreceived_fill(self, value: float | None) -> None:
        """Fill the part of each full-shaped tensor this rank did not receive with
        `value` instead of leaving it uninitialised (tests: NaN there would show in
        the tokens if a loader read it)."""
        self._unreceived_fill = value

    def load_weights(self, named_tensors: dict[str, torch.Tensor], version: Any) -> int:
        """Load received slices through vLLM's reload_weights, after checking every
        name and shape (nothing is loaded when one is wrong)."""
        layout = self.weight_layout()
        problems = []
        for name, tensor in named_tensors.items():
            spec = layout.get(name)
            if spec is None:
                problems.append(f"{name!r} is not a tensor this rank loads")
                continue
            want = tuple(b - a for a, b in spec.box)
            if tuple(tensor.shape) != want or str(tensor.dtype) != f"torch.{spec.dtype}":
                problems.append(f"{name!r} arrived as {tensor.dtype} {list(tensor.shape)}, "
                                f"expected torch.{spec.dtype} {list(want)} ({spec.describe()})")
        missing = sorted(set(layout) - set(named_tensors))
        if missing and named_tensors:
            problems.append(f"{len(missing)} needed tensor(s) missing, e.g. {missing[:3]}")
        if problems:
            raise ValueError(f"vLLM rank {self.rank}: weight update of version {version!r} "
                             f"refused, nothing loaded: " + "; ".join(problems[:4]))
        if not named_tensors:
            return 0
        runner = self.wrapper.worker.model_runner
        runner.reload_weights(weights_iterator=full_shaped(named_tensors, layout,
                                                           self._unreceived_fill))
        self.weights_version = version
        return len(named_tensors)

    # ---- everything else the engine names ------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class lacks: vLLM's wrapper methods
        # (initialize_from_config, ...) and, through it, the vLLM worker's.
        if name == "wrapper":  # not built yet (a failure in __init__)
            raise AttributeError(name)
        return getattr(self.wrapper, name)
