"""HfTrainerWorker: a data-parallel trainer over a Hugging Face causal LM, the
source side of rayexec's direct weight path into vLLM (direct.py).

Every rank holds the whole model (float32 master weights) and averages gradients
over a gloo process group (DDP); rank = dp_rank. `weight_shards()` offers every
parameter under its checkpoint name, replicated, in the serving dtype (`send_dtype`,
default bfloat16: what vLLM's CPU platform serves a float32 checkpoint in); the
planner then splits each piece among the replicas, so DP ranks share the sending.

    group = WorkerGroup.from_config(HfTrainerWorker, {"model": path, "dp": 2},
                                    ResourceConfig(num_workers=2))
    group.run("train_step", (sequences,))
    update_weights(llm, group)

Not here: serving (the vLLM side) or the sync itself (rayexec/weights/).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch

from rayexec.weights.plan import WeightSpec

logger = logging.getLogger(__name__)

PROCESS_GROUP_TIMEOUT = timedelta(seconds=300)


class HfTrainerWorker:
    """One DP rank (built by rayexec with its rank kwargs)."""

    def __init__(self, rank: int, local_rank: int, world_size: int, pp_rank: int, tp_rank: int,
                 distributed_init_method: str, *, model: str, dp: int = 1, lr: float = 1e-3,
                 send_dtype: str = "bfloat16", seed: int = 0) -> None:
        if dp != world_size:
            raise ValueError(f"HfTrainerWorker dp={dp} != world_size={world_size}; start dp "
                             f"workers")
        self.rank, self.dp, self.path, self.lr = rank, dp, model, lr
        self.send_dtype = getattr(torch, send_dtype)
        self.init_method, self.seed = distributed_init_method, seed
        self.model: Any = None
        self.optimizer: Any = None
        self.steps = 0

    def init_device(self) -> None:
        from transformers import AutoModelForCausalLM

        if self.dp > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", init_method=self.init_method, rank=self.rank,
                                        world_size=self.dp, timeout=PROCESS_GROUP_TIMEOUT)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, torch_dtype=torch.float32)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr)

    def train_step(self, sequences: Sequence[Sequence[int]]) -> float:
        """One optimizer step on this rank's share of `sequences` (round robin),
        gradients averaged over the DP ranks; returns this rank's loss."""
        if self.model is None:
            raise RuntimeError(f"trainer rank {self.rank}: train_step before init_device()")
        mine = [list(s) for s in sequences][self.rank::self.dp]
        if not mine or any(len(s) < 2 for s in mine) or len({len(s) for s in mine}) != 1:
            raise ValueError(f"train_step needs >= dp={self.dp} sequences of one length >= 2; "
                             f"got lengths {[len(s) for s in sequences]}")
        ids = torch.tensor(mine, dtype=torch.long)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        if self.dp > 1:
            import torch.distributed as dist

            for p in self.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.dp
        self.optimizer.step()
        self.steps += 1
        return float(loss.detach())

    # ---- weight sync (source side of the rayexec.weights contract) -----------------------
    def weight_shards(self) -> dict[str, tuple[torch.Tensor, WeightSpec]]:
        if self.model is None:
            raise RuntimeError(f"trainer rank {self.rank}: weight_shards before init_device()")
        dtype = str(self.send_dtype).removeprefix("torch.")
        return {name: (t.detach().to(self.send_dtype), WeightSpec(tuple(t.shape), dtype))
                for name, t in self.model.state_dict().items()}

    def save(self, path: str) -> None:
        """A checkpoint of the weights as sent (send_dtype): what a fresh engine
        started from it serves is what an update delivers."""
        import copy

        copy.deepcopy(self.model).to(self.send_dtype).save_pretrained(path)

    def sleep(self, level: int = 1) -> dict[str, int]:
        """Free the gradients while the rollout runs (the weights and the optimizer
        state are the source of truth and stay)."""
        freed = sum(p.grad.numel() * p.grad.element_size() for p in self.model.parameters()
                    if p.grad is not None)
        self.optimizer.zero_grad(set_to_none=True)
        return {"freed_bytes": freed}

    def wake_up(self) -> None:
        pass
