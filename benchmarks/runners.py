"""What pp_tp_latency.py times: the workloads (echo, model), the four ways of running
a step (dag, rpc, floor, local) and the timing loop.

Every mode answers `execute_model(batch)` for the same worker class, kwargs and PP x
TP layout, so one loop times them all:
  dag    RayDistributedExecutor(forward="dag"), compiled graph, `channel` edges;
  bare   the same echo chain as a plain Ray compiled graph, no rayexec code
         (bare.py; `channel` names the variant: dict, shm, bytes or numpy);
  rpc    the same executor with forward="rpc" (plain actor calls);
  floor  FloorChain: plain processes + shared memory + eventfds, no Ray (floor.py);
  local  the stages' compute in this process: EchoWorkers called in a row, or the
         whole reference decoder (ReferenceModel) at TP=1: the compute-only time.
Not here: the grid, the table, the JSON (pp_tp_latency.py, report.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.bare import BareChain
from benchmarks.echo_worker import EchoWorker
from benchmarks.floor import FloorChain
from rayexec import ExecutorConfig, RayDistributedExecutor
from rayexec.models import (
    PRESETS,
    ReferenceModel,
    StepBatch,
    decoder_executor_config,
    make_decode_batch,
)

logger = logging.getLogger(__name__)

MODES = ("dag", "bare", "rpc", "floor", "local")
WORKLOADS = ("echo", "model")
MODEL_PRESET = "small"
MODEL_BATCH = 8
MODEL_CONTEXT = 32
# What each mode's records name as their channel (dag records name the DAG's).
MODE_CHANNELS = {"rpc": "ray-rpc", "floor": "shm-eventfd", "local": "none"}


@dataclass(frozen=True)
class Settings:
    """How each configuration is timed, and what the floor mimics of Ray's workers."""

    iters: int = 300
    warmup: int = 20
    max_seconds: float = 3.0
    floor_niceness: int = 0


@dataclass(frozen=True)
class Timing:
    """Per-step latencies of one configuration, in seconds."""

    samples: list[float]

    def summary(self) -> dict[str, float]:
        s = sorted(self.samples)
        median = statistics.median(s)
        return {
            "iters": len(s),
            "median_us": median * 1e6,
            "p90_us": _quantile(s, 0.90) * 1e6,
            "p99_us": _quantile(s, 0.99) * 1e6,
            "mean_us": statistics.fmean(s) * 1e6,
            "min_us": s[0] * 1e6,
            "steps_per_s": 1.0 / median if median > 0 else 0.0,
        }


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile (no interpolation: with 100 samples p99 is a real step)."""
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))]


def time_steps(step: Callable[[], Any], iters: int, warmup: int, max_seconds: float,
               min_iters: int = 5) -> Timing:
    """Run `step` `warmup` times untimed, then time up to `iters` calls; stop early
    after `max_seconds` of timed calls once `min_iters` are in."""
    for _ in range(warmup):
        step()
    samples: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for i in range(iters):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        samples.append(t1 - t0)
        if i + 1 >= min_iters and t1 > deadline:
            break
    return Timing(samples)


# ---- workloads -------------------------------------------------------------------------
class LocalChain:
    """EchoWorkers of every rank called stage after stage in this process."""

    def __init__(self, pp: int, tp: int) -> None:
        self.grid = [[EchoWorker(rank=s * tp + t, local_rank=0, world_size=pp * tp, pp_rank=s,
                                 tp_rank=t, distributed_init_method="", pipeline_parallel_size=pp)
                      for t in range(tp)] for s in range(pp)]

    def execute_model(self, batch: int) -> Any:
        outs: list[Any] = [None] * len(self.grid[0])
        for stage in self.grid:
            outs = [w.execute_model(batch, o) for w, o in zip(stage, outs)]
        return outs[0]


# The bounds of one cell's executor. A step here takes well under a second and setup
# well under a minute, so a cell stalled in one of rayexec's or Ray's bounded waits
# fails with rayexec's timeout error (naming the rank and what it waited for) and the
# run goes on to the next cell, instead of waiting out the executor's defaults (init
# 600 s, then 300 s a step). A thread blocked inside the kernel is beyond any timeout
# (docs/benchmarks.md, 2026-12-07).
CELL_BOUNDS = {"init_timeout_s": 120.0, "execute_timeout_s": 60.0}


@dataclass(frozen=True)
class Workload:
    """How to build a target for one workload and which batches to time on it."""

    name: str
    payloads: tuple[int, ...]  # echo: bytes per step; model: ignored
    device: str  # "cpu" or "cuda" (the workers')
    gpus_per_worker: float = 1.0  # cuda only; 0.5 puts two workers on one GPU

    def config(self, pp: int, tp: int, forward: str, channel: str) -> ExecutorConfig:
        executor_device = "cpu" if self.device == "cpu" else "auto"
        share = {} if self.device == "cpu" else {"num_devices_per_worker": self.gpus_per_worker}
        if self.name == "echo":
            return ExecutorConfig(
                worker_cls=EchoWorker, pipeline_parallel_size=pp, tensor_parallel_size=tp,
                worker_kwargs={"pipeline_parallel_size": pp, "device": self.device},
                device=executor_device, channel=channel, forward=forward, **share,
                **CELL_BOUNDS)
        return decoder_executor_config(pp, tp, model=MODEL_PRESET, seed=0,
                                       device=executor_device, channel=channel, forward=forward,
                                       **share, **CELL_BOUNDS)

    def local_target(self, pp: int, tp: int) -> Any:
        if self.name == "echo":
            return LocalChain(pp, tp)
        return ReferenceModel(MODEL_PRESET, seed=0)

    def slot_bytes(self) -> int:
        """Floor slot size: the largest payload plus room for the batch."""
        return max(self.payloads, default=0) + (1 << 20)

    @contextlib.contextmanager
    def batches(self, target: Any) -> Iterator[list[tuple[int, Any]]]:
        """[(payload bytes, batch)]; for the model, the decode step's requests are
        prefilled on entry and freed on exit."""
        if self.name == "echo":
            yield [(n, n) for n in self.payloads]
            return
        batch = make_decode_batch(target, num_requests=MODEL_BATCH, context_len=MODEL_CONTEXT)
        model = PRESETS[MODEL_PRESET]
        # What crosses each stage boundary: the hidden states of the batch's tokens.
        itemsize = torch.empty(0, dtype=getattr(torch, model.dtype)).element_size()
        payload = MODEL_BATCH * model.hidden_size * itemsize
        try:
            yield [(payload, batch)]
        finally:
            target.execute_model(StepBatch.free_only(batch.request_ids))

    def check(self, out: Any, payload: int) -> Any:
        """A digest of one step's output, compared across modes; raises when wrong."""
        if self.name == "echo":
            # A tensor, bytes (the bare bytes variant) or a numpy array (bare numpy).
            size = len(out) if isinstance(out, bytes) else (
                out.numel() if isinstance(out, torch.Tensor) else getattr(out, "nbytes", None))
            if size != payload:
                raise AssertionError(f"echo of {payload} bytes returned {type(out).__name__} "
                                     f"of size {size}")
            return None
        return list(out.next_token_ids)


# ---- modes ------------------------------------------------------------------------------
@contextlib.contextmanager
def open_target(mode: str, workload: Workload, pp: int, tp: int, channel: str,
                floor_niceness: int = 0) -> Iterator[Any]:
    """The object that runs steps in `mode`, shut down on exit."""
    if mode in ("dag", "rpc"):
        ex = RayDistributedExecutor(workload.config(pp, tp, mode, channel))
        try:
            ex.warmup()
            yield ex
        finally:
            ex.shutdown()
    elif mode == "bare":
        if workload.name != "echo":
            raise ValueError("the bare mode runs the echo workload only")
        with BareChain(pp, tp, channel, buffer_size_bytes=workload.slot_bytes()) as chain:
            yield chain
    elif mode == "floor":
        config = workload.config(pp, tp, "rpc", "auto")
        kwargs = dict(config.worker_kwargs)
        if "device" in kwargs:
            kwargs["device"] = "cpu"  # the floor is a host-memory chain
        with FloorChain(config.worker_cls, kwargs, pp, tp, slot_bytes=workload.slot_bytes(),
                        niceness=floor_niceness) as chain:
            yield chain
    elif mode == "local":
        # The per-worker thread count of the distributed runs (rayexec's layout gives
        # each of the node's workers cpus // workers), so compute is comparable.
        previous = torch.get_num_threads()
        torch.set_num_threads(local_threads(pp, tp))
        try:
            yield workload.local_target(pp, tp)
        finally:
            torch.set_num_threads(previous)
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(MODES)}")


def local_threads(pp: int, tp: int) -> int:
    return max(1, (os.cpu_count() or 1) // (pp * tp))


def run_configuration(mode: str, workload: Workload, pp: int, tp: int, channel: str,
                      settings: Settings) -> list[dict[str, Any]]:
    """Time every batch of `workload` in `mode` on one PP x TP layout; one record each."""
    records = []
    started = time.perf_counter()
    with open_target(mode, workload, pp, tp, channel, settings.floor_niceness) as target:
        setup_s = time.perf_counter() - started
        with workload.batches(target) as batches:
            for payload, batch in batches:
                digest = workload.check(target.execute_model(batch), payload)
                load = os.getloadavg()[0]
                timing = time_steps(lambda b=batch: target.execute_model(b), settings.iters,
                                    settings.warmup, settings.max_seconds)
                record = {
                    "mode": mode, "workload": workload.name,
                    "channel": MODE_CHANNELS.get(mode, channel), "pp": pp,
                    "tp": tp, "payload_bytes": payload, **timing.summary(),
                    "warmup": settings.warmup, "load_1m": round(load, 2),
                    "setup_s": round(setup_s, 2),
                }
                if mode == "floor":
                    record["niceness"] = settings.floor_niceness
                if mode == "local":
                    record["threads"] = local_threads(pp, tp)
                if workload.name == "echo":
                    record["mb_per_s"] = payload / (record["median_us"] * 1e-6) / 1e6
                if digest is not None:
                    record["output_digest"] = digest
                record["samples_s"] = timing.samples  # merged over rounds, then dropped
                records.append(record)
                setup_s = 0.0
    return records


def merge_rounds(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per configuration: the samples of every round pooled (a machine
    whose load drifts then weighs on every mode alike), with each round's median."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        key = (r["mode"], r["workload"], r["channel"], r["pp"], r["tp"], r["payload_bytes"])
        groups.setdefault(key, []).append(r)
    merged = []
    for rounds in groups.values():
        record = {k: v for k, v in rounds[0].items() if k != "samples_s"}
        samples = [s for r in rounds for s in r["samples_s"]]
        record.update(Timing(samples).summary())
        record["rounds"] = len(rounds)
        record["round_medians_us"] = [r["median_us"] for r in rounds]
        record["load_1m"] = [r["load_1m"] for r in rounds] if len(rounds) > 1 else \
            rounds[0]["load_1m"]
        record["setup_s"] = round(statistics.fmean(r["setup_s"] for r in rounds), 2)
        if "mb_per_s" in record:
            record["mb_per_s"] = record["payload_bytes"] / (record["median_us"] * 1e-6) / 1e6
        merged.append(record)
    return merged
