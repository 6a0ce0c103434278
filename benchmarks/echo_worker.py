"""EchoWorker: an engine worker whose step does no compute, for measuring what the
executor itself costs per step and how fast it moves a tensor between stages.

The batch is the payload size in bytes (an int: nothing to pack). Stage 0 returns a
preallocated uint8 tensor of that many bytes (on the worker's GPU with
device="cuda") as its intermediate ``{"t": tensor}``; later stages pass the tensor
they received on unchanged; the last stage's tp_rank 0 returns it to the driver
(its other TP ranks return None, as the reference decoder's do). So one step moves
the payload over every stage-to-stage edge (TP of them per boundary) and once from
the last stage to the driver; the driver's input stays small, as a scheduler's
batch does.

Not here: timing (pp_tp_latency.py) or any transport (the executor's job).
"""

from __future__ import annotations

from typing import Any

import torch


class EchoWorker:
    """One rank of the echo chain; follows rayexec's worker contract (README, "The
    worker contract")."""

    def __init__(self, rank: int, local_rank: int, world_size: int, pp_rank: int, tp_rank: int,
                 distributed_init_method: str, *, pipeline_parallel_size: int = 1,
                 device: str = "cpu") -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"EchoWorker device={device!r}: expected 'cpu' or 'cuda'")
        self.rank, self.local_rank, self.pp_rank, self.tp_rank = rank, local_rank, pp_rank, tp_rank
        self.is_last_stage = pp_rank == pipeline_parallel_size - 1
        self.device = torch.device(device)
        self._payloads: dict[int, torch.Tensor] = {}

    def init_device(self) -> None:
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)

    def payload(self, nbytes: int) -> torch.Tensor:
        """The stage-0 tensor of `nbytes` bytes, made once per size (allocation and
        filling are not what the benchmark measures)."""
        t = self._payloads.get(nbytes)
        if t is None:
            if nbytes < 1:
                raise ValueError(f"EchoWorker: payload of {nbytes} bytes; expected >= 1")
            t = torch.arange(nbytes, dtype=torch.int64).to(torch.uint8).to(self.device)
            self._payloads[nbytes] = t
        return t

    def execute_model(self, batch: int, intermediate: dict[str, Any] | None = None) -> Any:
        t = self.payload(batch) if intermediate is None else intermediate["t"]
        if not self.is_last_stage:
            return {"t": t}
        if self.tp_rank != 0:
            return None
        return t.cpu() if t.is_cuda else t  # the driver may hold no GPU
