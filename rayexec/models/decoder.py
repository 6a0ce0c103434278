"""The reference decoder's math: a Llama-style model in plain torch, computed by
`DecoderShard`, the part of it one rank holds.

    tokens -> embedding -> [RMSNorm -> rotary MHA (+KV cache) -> +residual
                            RMSNorm -> SwiGLU MLP            -> +residual] x layers
           -> final RMSNorm -> LM head -> greedy argmax

A shard holds one pipeline stage's layers (`layers`), and of each layer one TP
rank's heads and MLP columns. The attention output projection and the MLP down
projection are row-parallel: each TP rank computes a partial sum and
`all_reduce` (given by the caller: torch.distributed over the stage's TP group, or
the identity at TP=1) adds them, so after every layer all TP ranks of a stage hold
the same hidden states. One residual stream is kept (no separate residual tensor),
so the hidden states are all that crosses a stage boundary.

Tensor-parallel choice for the vocabulary: the embedding and LM head are
**replicated**, not vocab-parallel. At this size they are small (vocab x hidden),
replication needs no extra collective, and only tp_rank 0 of the last stage runs the
final norm, LM head and sampling (rayexec returns only its output; the other ranks
of that stage skip the head entirely).

Not here: weight generation (weights.py), the cache's bookkeeping (kv_cache.py),
process groups or Ray (worker.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayexec.models.batch import StepBatch, StepOutput
from rayexec.models.config import DecoderConfig
from rayexec.models.kv_cache import KVCache
from rayexec.models.weights import shard_tensor

AllReduce = Callable[[torch.Tensor], torch.Tensor]
LAYER_PARAMS = ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "mlp_norm",
                "gate_proj", "up_proj", "down_proj")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 whatever the model dtype, as Llama does.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32.to(x.dtype) * weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [tokens, 1, head_dim] (halves repeated, rotate-half style)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                            device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    mlp_norm: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor


class DecoderShard:
    """Layers `layers` of the model, TP rank `tp_rank` of `tp`, with its KV cache.

    `embed`: this shard turns token ids into hidden states (stage 0).
    `head`: this shard applies the final norm, LM head and sampling (last stage,
    tp_rank 0)."""

    def __init__(self, config: DecoderConfig, seed: int, layers: range, *, tp_rank: int = 0,
                 tp: int = 1, embed: bool = True, head: bool = True,
                 device: torch.device | str = "cpu", all_reduce: AllReduce | None = None
                 ) -> None:
        config.check_tp(tp)
        self.config, self.layers, self.device = config, layers, torch.device(device)
        self.dtype = getattr(torch, config.dtype)
        self.tp_rank, self.tp = tp_rank, tp
        self.local_heads = config.num_heads // tp
        self.all_reduce = all_reduce or _identity

        def load(name: str) -> torch.Tensor:
            return shard_tensor(config, seed, name, tp_rank, tp, self.device)

        self.embed = load("embed") if embed else None
        self.final_norm = load("final_norm") if head else None
        self.lm_head = load("lm_head") if head else None
        self.stack = [_Layer(**{p: load(f"layers.{i}.{p}") for p in LAYER_PARAMS})
                      for i in layers]
        self.cache = KVCache(len(layers), self.local_heads, config.head_dim, self.dtype,
                             self.device)

    @property
    def has_head(self) -> bool:
        return self.lm_head is not None

    # ---- named weights (weight sync) ---------------------------------------------------
    def named_weights(self) -> dict[str, torch.Tensor]:
        """This shard's tensors by full-model name (`layers.{i}.{param}` for layers)."""
        out = {} if self.embed is None else {"embed": self.embed}
        for i, layer in zip(self.layers, self.stack):
            out.update({f"layers.{i}.{p}": getattr(layer, p) for p in LAYER_PARAMS})
        if self.has_head:
            out.update(final_norm=self.final_norm, lm_head=self.lm_head)
        return out

    def load_named(self, named: dict[str, torch.Tensor]) -> None:
        """Copy `named` (this shard's parts, by name) into its tensors in place."""
        mine = self.named_weights()
        unknown = sorted(set(named) - set(mine))
        if unknown:
            raise KeyError(f"this shard (layers {list(self.layers)}, tp_rank {self.tp_rank}) has "
                           f"no weight(s) {unknown[:4]}; it holds {sorted(mine)[:4]} ...")
        for name, value in named.items():
            if value.shape != mine[name].shape:
                raise ValueError(f"weight {name!r}: got shape {list(value.shape)}, this shard "
                                 f"holds {list(mine[name].shape)}")
            mine[name].copy_(value)

    def drop_weights(self) -> None:
        """Free every weight's storage (sleep level 2); `restore_weights` re-allocates."""
        for t in self.named_weights().values():
            t.set_()

    def restore_weights(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Give dropped tensors storage of their shapes again (contents undefined)."""
        for name, t in self.named_weights().items():
            if t.numel() == 0 and shapes[name]:
                t.set_(torch.empty(shapes[name], dtype=t.dtype, device=t.device))

    @torch.inference_mode()
    def forward(self, batch: StepBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Free `batch.finished`, then run this shard's layers over the batch's tokens:
        hidden states [tokens, hidden_size] in, the same shape out. Stage 0 passes no
        `hidden` and embeds `batch.token_ids`."""
        self.cache.free(batch.finished)
        if self.embed is not None:
            ids = torch.tensor(batch.token_ids, dtype=torch.long, device=self.device)
            hidden = self.embed[ids]
        elif hidden is None:
            raise ValueError("this shard does not embed tokens (not stage 0) but received no "
                             "hidden states from the previous stage")
        else:
            hidden = hidden.to(device=self.device, dtype=self.dtype)
        if not batch.request_ids or not self.stack:
            return hidden
        for rid, start, n in zip(batch.request_ids, batch.start_positions, batch.num_tokens):
            self.cache.reserve(rid, start, n)
        cos, sin = rope_tables(batch.positions_tensor().to(self.device), self.config.head_dim,
                               self.config.rope_theta, self.dtype)
        eps = self.config.norm_eps
        for local, p in enumerate(self.stack):
            x = rms_norm(hidden, p.attn_norm, eps)
            q, k, v = (self._heads(x @ w.T) for w in (p.q_proj, p.k_proj, p.v_proj))
            attn = self._attention(batch, local, apply_rope(q, cos, sin),
                                   apply_rope(k, cos, sin), v)
            hidden = hidden + self.all_reduce(attn @ p.o_proj.T)
            x = rms_norm(hidden, p.mlp_norm, eps)
            mlp = F.silu(x @ p.gate_proj.T) * (x @ p.up_proj.T)
            hidden = hidden + self.all_reduce(mlp @ p.down_proj.T)
        return hidden

    @torch.inference_mode()
    def sample(self, batch: StepBatch, hidden: torch.Tensor) -> StepOutput:
        """Final norm, LM head and greedy choice at each request's last token."""
        assert self.has_head, "sample() on a shard without the LM head"
        if not batch.request_ids:
            return StepOutput((), (), None)
        last = torch.tensor(batch.num_tokens, device=self.device).cumsum(0) - 1
        h = rms_norm(hidden[last], self.final_norm, self.config.norm_eps)
        logits = (h @ self.lm_head.T).float()
        next_ids = logits.argmax(dim=-1).tolist()
        return StepOutput(batch.request_ids, tuple(next_ids),
                          logits.cpu() if batch.return_logits else None)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.local_heads, self.config.head_dim)

    def _attention(self, batch: StepBatch, local: int, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
        """Causal attention of each request's new tokens over its cached ones;
        [tokens, local_heads * head_dim]."""
        outs, offset = [], 0
        for rid, start, n in zip(batch.request_ids, batch.start_positions, batch.num_tokens):
            sl = slice(offset, offset + n)
            offset += n
            keys, values = self.cache.write(rid, local, k[sl].transpose(0, 1),
                                            v[sl].transpose(0, 1))
            mask = None
            if n > 1:  # query i (position start + i) sees keys 0 .. start + i
                key_pos = torch.arange(keys.shape[1], device=self.device)
                query_pos = torch.arange(start, start + n, device=self.device)
                mask = key_pos[None, :] <= query_pos[:, None]
            out = F.scaled_dot_product_attention(q[sl].transpose(0, 1), keys, values,
                                                 attn_mask=mask)
            outs.append(out.transpose(0, 1).reshape(n, -1))
        return torch.cat(outs)
