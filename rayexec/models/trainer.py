"""TrainerWorker: a trainer for the reference decoder, the source side of a weight
sync. Data parallel (DDP over gloo/NCCL) times tensor parallel (Megatron-style, with
autograd through the TP collectives); rank = dp_rank * tp + tp_rank.

The model is the same function as decoder.py's (same names, same seeded initial
weights, same TP split), written for training: whole sequences, causal attention,
no KV cache, next-token cross-entropy. Tensor parallelism uses Megatron's two
operators: `_CopyToTP` (identity forward, all-reduce of the gradient backward) in
front of every column-parallel projection, `_ReduceFromTP` (all-reduce forward,
identity backward) after every row-parallel one, so replicated tensors (embedding,
norms, LM head) get identical gradients on every TP rank. Plain SGD.

Run it with `WorkerGroup.from_config(TrainerWorker, {"dp": D, "tp": T, ...},
ResourceConfig(num_workers=D * T, ...))`. Not here: serving (worker.py), the sync.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rayexec.models.config import DecoderConfig
from rayexec.models.decoder import LAYER_PARAMS, apply_rope, rms_norm, rope_tables
from rayexec.models.weights import full_tensor, tp_slice, weight_spec
from rayexec.weights.plan import WeightSpec

logger = logging.getLogger(__name__)

PROCESS_GROUP_TIMEOUT = timedelta(seconds=300)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def weight_names(config: DecoderConfig) -> list[str]:
    return ["embed", *(f"layers.{i}.{p}" for i in range(config.num_layers)
                       for p in LAYER_PARAMS), "final_norm", "lm_head"]


class TrainModel(nn.Module):
    """One TP rank's part of the whole decoder, as trainable parameters."""

    def __init__(self, config: DecoderConfig, seed: int, tp_rank: int, tp: int,
                 tp_group: Any = None) -> None:
        super().__init__()
        self.config, self.tp_rank, self.tp, self.tp_group = config, tp_rank, tp, tp_group
        dtype = getattr(torch, config.dtype)
        # ParameterDict keys cannot hold dots.
        self.weights = nn.ParameterDict({
            n.replace(".", "__"): nn.Parameter(
                tp_slice(n, full_tensor(config, seed, n), tp_rank, tp).to(dtype))
            for n in weight_names(config)})

    def named_weights(self) -> dict[str, torch.Tensor]:
        return {k.replace("__", "."): v for k, v in self.weights.items()}

    def _p(self, name: str) -> torch.Tensor:
        return self.weights[name.replace(".", "__")]

    def _copy(self, x: torch.Tensor) -> torch.Tensor:
        return _CopyToTP.apply(x, self.tp_group) if self.tp > 1 else x

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return _ReduceFromTP.apply(x, self.tp_group) if self.tp > 1 else x

    def forward(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean next-token cross-entropy over `sequences` (each of >= 2 tokens)."""
        losses = [self._sequence_loss(torch.tensor(list(s), dtype=torch.long))
                  for s in sequences]
        return torch.stack(losses).mean()

    def _sequence_loss(self, ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(ids)[:-1].float(), ids[1:])

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[tokens, vocab] next-token logits of one sequence."""
        c = self.config
        n, heads = ids.shape[0], c.num_heads // self.tp
        h = self._p("embed")[ids]
        cos, sin = rope_tables(torch.arange(n), c.head_dim, c.rope_theta, h.dtype)
        for i in range(c.num_layers):
            def p(name: str, i: int = i) -> torch.Tensor:
                return self._p(f"layers.{i}.{name}")

            x = self._copy(rms_norm(h, p("attn_norm"), c.norm_eps))
            q, k, v = ((x @ p(w).T).view(n, heads, c.head_dim)
                       for w in ("q_proj", "k_proj", "v_proj"))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [tokens, heads, dim]
            attn = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                                  v.transpose(0, 1), is_causal=True)
            h = h + self._reduce(attn.transpose(0, 1).reshape(n, -1) @ p("o_proj").T)
            x = self._copy(rms_norm(h, p("mlp_norm"), c.norm_eps))
            mlp = F.silu(x @ p("gate_proj").T) * (x @ p("up_proj").T)
            h = h + self._reduce(mlp @ p("down_proj").T)
        return rms_norm(h, self._p("final_norm"), c.norm_eps) @ self._p("lm_head").T


class TrainerWorker:
    """One trainer rank (built by rayexec with its rank kwargs)."""

    def __init__(self, rank: int, local_rank: int, world_size: int, pp_rank: int, tp_rank: int,
                 distributed_init_method: str, *, dp: int = 1, tp: int = 1,
                 model: DecoderConfig | Mapping[str, Any] | str = "small", seed: int = 0,
                 lr: float = 0.05) -> None:
        if dp * tp != world_size:
            raise ValueError(f"TrainerWorker dp={dp} x tp={tp} != world_size={world_size}; "
                             f"start dp * tp workers")
        self.rank, self.world_size, self.dp, self.tp = rank, world_size, dp, tp
        self.dp_rank, self.tp_rank = divmod(rank, tp)
        self.init_method, self.seed, self.lr = distributed_init_method, seed, lr
        self.config = DecoderConfig.from_any(model)
        self.config.check_tp(tp)
        self.model: TrainModel | None = None
        self.ddp: Any = None
        self.steps = 0

    def init_device(self) -> None:
        tp_group = dp_group = None
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", init_method=self.init_method, rank=self.rank,
                                        world_size=self.world_size,
                                        timeout=PROCESS_GROUP_TIMEOUT)
            # new_group is collective: every rank creates every group, same order.
            for d in range(self.dp):
                g = dist.new_group([d * self.tp + t for t in range(self.tp)])
                tp_group = g if d == self.dp_rank else tp_group
            for t in range(self.tp):
                g = dist.new_group([d * self.tp + t for d in range(self.dp)])
                dp_group = g if t == self.tp_rank else dp_group
        self.model = TrainModel(self.config, self.seed, self.tp_rank, self.tp, tp_group)
        self.dp_group = dp_group
        if self.dp > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.model, process_group=dp_group)

    def train_step(self, sequences: Sequence[Sequence[int]], lr: float | None = None
                   ) -> float:
        """One SGD step on this DP rank's share of `sequences` (round robin); returns
        the loss averaged over DP ranks."""
        if self.model is None:
            raise RuntimeError(f"trainer rank {self.rank}: train_step before init_device()")
        mine = list(sequences)[self.dp_rank::self.dp]
        if not mine or any(len(s) < 2 for s in mine):
            raise ValueError(f"train_step needs >= dp={self.dp} sequences of >= 2 tokens; got "
                             f"{len(sequences)} with lengths {[len(s) for s in sequences]}")
        self.model.zero_grad(set_to_none=True)
        loss = (self.ddp or self.model)(mine)
        loss.backward()  # DDP averages gradients over the DP group here
        with torch.no_grad():
            for p in self.model.parameters():
                p -= (self.lr if lr is None else lr) * p.grad
        self.steps += 1
        value = loss.detach().clone()
        if self.dp > 1:
            import torch.distributed as dist

            dist.all_reduce(value, group=self.dp_group)
            value /= self.dp
        return float(value)

    # ---- weight sync (source side of the rayexec.weights contract) ----------------------------
    def weight_shards(self) -> dict[str, tuple[torch.Tensor, WeightSpec]]:
        if self.model is None:
            raise RuntimeError(f"trainer rank {self.rank}: weight_shards before init_device()")
        return {n: (t.detach(), weight_spec(self.config, n, self.tp_rank, self.tp))
                for n, t in self.model.named_weights().items()}

    def sleep(self, level: int = 1) -> dict[str, int]:
        """Free the gradients. The trainer's weights are the source of truth, so level 2
        frees the same as level 1."""
        if level not in (1, 2):
            raise ValueError(f"sleep(level={level!r}): expected 1 or 2")
        freed = sum(p.grad.numel() * p.grad.element_size() for p in self.model.parameters()
                    if p.grad is not None)
        self.model.zero_grad(set_to_none=True)
        return {"freed_bytes": freed}

    def wake_up(self) -> None:
        pass


def full_weights(shards: Sequence[Mapping[str, tuple[torch.Tensor, WeightSpec]]]
                 ) -> dict[str, torch.Tensor]:
    """The full tensors from every rank's weight_shards() (for checking, on the
    driver; the sync never does this)."""
    out: dict[str, torch.Tensor] = {}
    for rank_shards in shards:
        for name, (tensor, spec) in rank_shards.items():
            if name not in out:
                out[name] = torch.empty(spec.shape, dtype=tensor.dtype)
            out[name][tuple(slice(a, b) for a, b in spec.box)] = tensor
    return out
