"""Deterministic weights for the reference decoder, generated for the full model and
sliced per shard.

Every tensor is drawn from its own generator, seeded from (seed, tensor name), always
on the CPU in float32. So a rank builds only the tensors of its own layers, yet each
is bit-identical to the same tensor in the single-process model, whatever the
device, layout or build order. Slicing follows Megatron-style tensor parallelism:
q/k/v, gate and up projections are split by output rows (whole heads, whole MLP
columns per TP rank); o_proj and down_proj by input columns (row-parallel, summed
by an all-reduce). Embedding, norms and LM head are replicated.

Not here: the forward math (decoder.py) and anything distributed.
"""

from __future__ import annotations

import math
import zlib

import torch

from rayexec.models.config import DecoderConfig
from rayexec.weights.plan import WeightSpec

# name suffix -> how a TP rank takes its part of the full tensor
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split dim 0
ROW_PARALLEL = ("o_proj", "down_proj")  # split dim 1, outputs all-reduced


def full_shape(config: DecoderConfig, name: str) -> tuple[int, ...]:
    """The unsharded shape of parameter `name` (nn.Linear layout: out x in)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    leaf = name.rsplit(".", 1)[-1]
    shapes = {
        "embed": (v, h), "lm_head": (v, h), "final_norm": (h,),
        "attn_norm": (h,), "mlp_norm": (h,),
        "q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
        "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
    }
    if leaf not in shapes:
        raise KeyError(f"unknown decoder parameter {name!r}")
    return shapes[leaf]


def full_tensor(config: DecoderConfig, seed: int, name: str) -> torch.Tensor:
    """Parameter `name` of the full model, float32 on the CPU, a pure function of
    (config shapes, seed, name)."""
    shape = full_shape(config, name)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62)
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if len(shape) == 1:  # norm weights: near 1, but not 1, so that using them is tested
        return 1.0 + 0.1 * x
    if name == "embed":
        return x  # unit-scale residual stream from the start
    # 1/sqrt(fan_in): every layer contributes at unit scale, so each one matters to
    # the output and greedy choices are not near-ties between layouts.
    return x / math.sqrt(shape[1])


def weight_spec(config: DecoderConfig, name: str, tp_rank: int, tp: int) -> WeightSpec:
    """Which part of `name` TP rank `tp_rank` of `tp` holds, for weight sync."""
    leaf = name.rsplit(".", 1)[-1]
    shape = full_shape(config, name)
    if tp == 1 or leaf not in COLUMN_PARALLEL + ROW_PARALLEL:
        return WeightSpec(shape, config.dtype)
    return WeightSpec(shape, config.dtype, 0 if leaf in COLUMN_PARALLEL else 1, tp, tp_rank)


def tp_slice(name: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """The part of `full` that TP rank `tp_rank` of `tp` holds (a contiguous copy)."""
    leaf = name.rsplit(".", 1)[-1]
    if tp == 1 or leaf not in COLUMN_PARALLEL + ROW_PARALLEL:
        return full
    dim = 0 if leaf in COLUMN_PARALLEL else 1
    size = full.shape[dim]
    assert size % tp == 0, (name, size, tp)  # DecoderConfig.check_layout guarantees it
    return full.narrow(dim, tp_rank * (size // tp), size // tp).contiguous()


def shard_tensor(
    config: DecoderConfig, seed: int, name: str, tp_rank: int, tp: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """TP rank `tp_rank`'s slice of parameter `name`, cast to the model dtype, on `device`."""
    part = tp_slice(name, full_tensor(config, seed, name), tp_rank, tp)
    return part.to(device=device, dtype=getattr(torch, config.dtype))
