"""DecoderWorker: the engine worker that rayexec hosts, one per rank (SPEC section 5).

Built with rayexec's rank kwargs plus `pipeline_parallel_size`,
`tensor_parallel_size`, `model` (a DecoderConfig, preset name or field mapping),
`seed` and `device` from `worker_kwargs`; `decoder_executor_config` fills those in.
Phases:
  init_device()  pick the device (cuda:local_rank, else cpu); when TP > 1 join one
                 torch.distributed world group through `distributed_init_method` and
                 build one group per stage (NCCL on GPUs, gloo on CPU);
  load_model()   build this rank's DecoderShard: its stage's layers, its TP slice;
  execute_model(batch, intermediate)  stage 0 embeds, the others take
                 intermediate["hidden"]; non-last stages return {"hidden": tensor}
                 (rayexec's DAG moves it over its tensor transport); the last stage's
                 tp_rank 0 returns the StepOutput, its other TP ranks return None.
Not here: scheduling (engine.py) or the math (decoder.py).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch

from rayexec.config import ExecutorConfig
from rayexec.models.batch import StepBatch, StepOutput
from rayexec.models.config import DecoderConfig
from rayexec.models.decoder import DecoderShard
from rayexec.models.weights import weight_spec
from rayexec.weights.plan import WeightSpec

logger = logging.getLogger(__name__)

WORKER_DEVICES = ("auto", "cuda", "cpu")
PROCESS_GROUP_TIMEOUT = timedelta(seconds=300)


class DecoderWorker:
    """One rank of the reference decoder."""

    def __init__(self, rank: int, local_rank: int, world_size: int, pp_rank: int, tp_rank: int,
                 distributed_init_method: str, *, pipeline_parallel_size: int,
                 tensor_parallel_size: int, model: DecoderConfig | Mapping[str, Any] | str
                 = "small", seed: int = 0, device: str = "auto") -> None:
        pp, tp = pipeline_parallel_size, tensor_parallel_size
        if pp * tp != world_size:
            raise ValueError(
                f"worker_kwargs pipeline_parallel_size={pp} x tensor_parallel_size={tp} != "
                f"world_size={world_size}; build the config with decoder_executor_config()"
            )
        if device not in WORKER_DEVICES:
            raise ValueError(f"DecoderWorker device={device!r}: expected one of "
                             f"{list(WORKER_DEVICES)}")
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.pp_rank, self.tp_rank, self.pp, self.tp = pp_rank, tp_rank, pp, tp
        self.init_method, self.seed, self.device_kind = distributed_init_method, seed, device
        self.model = DecoderConfig.from_any(model)
        self.model.check_layout(pp, tp)
        self.is_last_stage = pp_rank == pp - 1
        self.device = torch.device("cpu")
        self.tp_group: Any = None
        self.shard: DecoderShard | None = None
        self.weights_version: Any = None  # set by load_weights; None: the seeded weights
        self.asleep = 0  # 0 awake, else the sleep level
        self._shapes: dict[str, tuple[int, ...]] = {}

    # ---- phases ---------------------------------------------------------------------
    def init_device(self) -> None:
        kind = self.device_kind
        if kind == "auto":
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        if kind == "cuda":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        if self.tp > 1:
            self._init_tp_group("nccl" if kind == "cuda" else "gloo")
        logger.info("rank %d: device %s, stage %d/%d, tp %d/%d", self.rank, self.device,
                    self.pp_rank, self.pp, self.tp_rank, self.tp)

    def _init_tp_group(self, backend: str) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=self.init_method, rank=self.rank,
                                    world_size=self.world_size, timeout=PROCESS_GROUP_TIMEOUT)
        # new_group is collective over the world group: every rank creates every
        # stage's group, in the same order, and keeps its own.
        for stage in range(self.pp):
            group = dist.new_group(ranks=[stage * self.tp + t for t in range(self.tp)],
                                   backend=backend)
            if stage == self.pp_rank:
                self.tp_group = group

    def load_model(self) -> None:
        layers = self.model.stage_layers(self.pp)[self.pp_rank]
        self.shard = DecoderShard(
            self.model, self.seed, layers, tp_rank=self.tp_rank, tp=self.tp,
            embed=self.pp_rank == 0, head=self.is_last_stage and self.tp_rank == 0,
            device=self.device, all_reduce=self._all_reduce if self.tp > 1 else None,
        )

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, group=self.tp_group)
        return t

    # ---- the step ------------------------------------------------------------------------
    def execute_model(self, batch: StepBatch, intermediate: dict[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor] | StepOutput | None:
        if self.shard is None:
            raise RuntimeError(f"rank {self.rank}: execute_model before load_model()")
        if self.device.type == "cuda":
            # The current device is per thread, and Ray runs steps in its own thread.
            torch.cuda.set_device(self.device)
        hidden = None if intermediate is None else intermediate["hidden"]
        hidden = self.shard.forward(batch, hidden)
        if not self.is_last_stage:
            return {"hidden": hidden}
        return self.shard.sample(batch, hidden) if self.shard.has_head else None

    # ---- weight sync (rayexec.weights contract) ------------------------------------------------
    def weight_layout(self) -> dict[str, WeightSpec]:
        """What this rank needs: its stage's tensors, its TP part of each."""
        self._check_loaded("weight_layout")
        return {name: weight_spec(self.model, name, self.tp_rank, self.tp)
                for name in self.shard.named_weights()}

    def weight_shards(self) -> dict[str, tuple[torch.Tensor, WeightSpec]]:
        """What this rank holds (so an executor can also be a sync's source)."""
        layout = self.weight_layout()
        return {name: (t, layout[name]) for name, t in self.shard.named_weights().items()}

    def weight_buffers(self) -> dict[str, torch.Tensor]:
        """The live tensors, for an unstaged sync to fill in place."""
        self._check_loaded("weight_buffers")
        if self.asleep == 2:
            raise RuntimeError(f"rank {self.rank}: weight sync while asleep at level 2 "
                               f"(weights freed); call wake_up() first")
        return self.shard.named_weights()

    def load_weights(self, named_tensors: dict[str, torch.Tensor], version: Any) -> None:
        self._check_loaded("load_weights")
        if self.asleep == 2:
            raise RuntimeError(f"rank {self.rank}: load_weights while asleep at level 2 (weights "
                               f"freed); call wake_up() first")
        self.shard.load_named(named_tensors)
        self.weights_version = version

    def sleep(self, level: int = 1) -> dict[str, int | None]:
        """Level 1 frees the KV cache; level 2 also frees the weights (they must be
        synced again after wake_up). Returns the bytes freed ("cache_bytes",
        "weight_bytes") and this process's RSS before and after ("rss_before",
        "rss_after"; None where /proc is missing)."""
        self._check_loaded("sleep")
        if level not in (1, 2):
            raise ValueError(f"sleep(level={level!r}): expected 1 (caches) or 2 (caches and "
                             f"weights)")
        rss_before = rss_bytes()
        out: dict[str, int | None] = {"cache_bytes": self.shard.cache.stats()["bytes"],
                                      "weight_bytes": 0}
        self.shard.cache.clear()
        if level == 2 and self.asleep < 2:
            named = self.shard.named_weights()
            self._shapes = {n: tuple(t.shape) for n, t in named.items()}
            out["weight_bytes"] = sum(t.numel() * t.element_size() for t in named.values())
            self.shard.drop_weights()
        release_free_memory()
        self.asleep = max(self.asleep, level)
        return {**out, "rss_before": rss_before, "rss_after": rss_bytes()}

    def wake_up(self) -> None:
        if self.asleep == 2:
            self.shard.restore_weights(self._shapes)
        self.asleep = 0

    def _check_loaded(self, what: str) -> None:
        if self.shard is None:
            raise RuntimeError(f"rank {self.rank}: {what}() before load_model()")

    # ---- introspection (collective_rpc) ------------------------------------------------------
    def kv_cache_stats(self) -> dict[str, int]:
        """{"requests", "tokens", "bytes"} this rank's KV cache holds now."""
        return self.shard.cache.stats() if self.shard is not None else {}

    def shard_info(self) -> dict[str, Any]:
        """What this rank holds: stage layers, heads, device, embedding / head."""
        s = self.shard
        return {
            "rank": self.rank, "pp_rank": self.pp_rank, "tp_rank": self.tp_rank,
            "layers": list(s.layers) if s else None, "local_heads": s.local_heads if s else None,
            "embed": s is not None and s.embed is not None, "head": s is not None and s.has_head,
            "device": str(self.device),
        }


def rss_bytes() -> int | None:
    """This process's resident set size (Linux /proc), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def release_free_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps small frees in its arenas)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def decoder_executor_config(
    pp: int = 1, tp: int = 1, model: DecoderConfig | Mapping[str, Any] | str = "small",
    seed: int = 0, device: str = "auto", **executor_fields: Any,
) -> ExecutorConfig:
    """An ExecutorConfig (from RAYEXEC_* defaults) running DecoderWorker as PP x TP."""
    worker_device = {"auto": "auto", "cpu": "cpu", "cuda": "cuda", "rocm": "cuda"}.get(device)
    if worker_device is None:
        raise ValueError(f"device={device!r}: the reference decoder runs on auto, cuda, rocm or "
                         f"cpu")
    DecoderConfig.from_any(model).check_layout(pp, tp)
    return ExecutorConfig.from_env(
        pipeline_parallel_size=pp, tensor_parallel_size=tp, device=device,
        worker_cls=DecoderWorker,
        worker_kwargs={"pipeline_parallel_size": pp, "tensor_parallel_size": tp,
                       "model": model, "seed": seed, "device": worker_device},
        **executor_fields,
    )
