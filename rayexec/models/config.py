"""DecoderConfig: the size and numerics of the reference decoder, and how its layers
split into pipeline stages.

Pure data and validation (no torch import). The layout itself (PP, TP) belongs to
the executor; `check_layout` says whether this model can be split that way, with an
error that names the value and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    vocab_size: int = 4096
    """Tokens in the vocabulary (embedding rows, LM head outputs)."""
    hidden_size: int = 256
    """Width of the residual stream."""
    intermediate_size: int = 768
    """Width of the SwiGLU MLP (gate and up projections); split across TP ranks."""
    num_layers: int = 8
    """Decoder layers; split across pipeline stages."""
    num_heads: int = 8
    """Attention heads (query = key = value heads); split across TP ranks."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    dtype: str = "float32"
    """Parameter and activation dtype: float32 | bfloat16 | float16. Exactness across
    layouts is checked in float32."""
    layer_split: tuple[int, ...] | None = None
    """Layers per pipeline stage, e.g. (3, 5); None splits evenly (earlier stages
    take the remainder). Its length must equal pipeline_parallel_size."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "expected an integer >= 1")
        if self.hidden_size % self.num_heads:
            _fail("num_heads", self.num_heads,
                  f"must divide hidden_size={self.hidden_size} (head_dim = hidden / heads)")
        if self.head_dim % 2:
            _fail("hidden_size", self.hidden_size,
                  f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"expected one of {list(DTYPES)}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            _fail("norm_eps" if not self.norm_eps > 0 else "rope_theta",
                  self.norm_eps if not self.norm_eps > 0 else self.rope_theta,
                  "expected a number > 0")
        if self.layer_split is not None:
            split = tuple(self.layer_split)
            if any(not isinstance(n, int) or n < 0 for n in split) or sum(split) != self.num_layers:
                _fail("layer_split", self.layer_split,
                      f"expected non-negative layer counts summing to num_layers="
                      f"{self.num_layers}")
            object.__setattr__(self, "layer_split", split)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_any(cls, value: DecoderConfig | Mapping[str, Any] | str) -> DecoderConfig:
        """A config from itself, a preset name or a mapping of fields (unknown keys
        rejected)."""
        if isinstance(value, DecoderConfig):
            return value
        if isinstance(value, str):
            if value not in PRESETS:
                raise ValueError(f"unknown decoder preset {value!r}; presets are "
                                 f"{sorted(PRESETS)}")
            return PRESETS[value]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown DecoderConfig field(s) {unknown}; valid fields are "
                             f"{sorted(known)}")
        return cls(**value)

    def stage_layers(self, pp: int) -> list[range]:
        """The layer indices each of `pp` stages holds."""
        if self.layer_split is not None:
            counts = list(self.layer_split)
        else:
            base, extra = divmod(self.num_layers, pp)
            counts = [base + (1 if s < extra else 0) for s in range(pp)]
        starts = [sum(counts[:s]) for s in range(pp)]
        return [range(start, start + n) for start, n in zip(starts, counts)]

    def check_tp(self, tp: int) -> None:
        """ValueError unless heads and MLP columns split evenly over `tp` ranks."""
        if self.num_heads % tp or self.intermediate_size % tp:
            raise ValueError(
                f"tensor_parallel_size={tp} must divide num_heads={self.num_heads} and "
                f"intermediate_size={self.intermediate_size}; choose a TP size that divides both"
            )

    def check_layout(self, pp: int, tp: int) -> None:
        """ValueError unless this model splits into `pp` stages of `tp` ranks."""
        self.check_tp(tp)
        if self.layer_split is not None and len(self.layer_split) != pp:
            raise ValueError(
                f"DecoderConfig.layer_split={self.layer_split} has {len(self.layer_split)} "
                f"entries but pipeline_parallel_size={pp}; give one layer count per stage"
            )
        if self.layer_split is None and self.num_layers < pp:
            raise ValueError(
                f"pipeline_parallel_size={pp} exceeds num_layers={self.num_layers}; use at "
                f"most {self.num_layers} stages"
            )


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"DecoderConfig.{name}={value!r} is invalid: {allowed}")


PRESETS: dict[str, DecoderConfig] = {
    # Runs comfortably on 2 CPU cores: ~8.9M parameters (36 MB in float32).
    "small": DecoderConfig(),
    # For GPUs: ~1.3B parameters in bfloat16 (Llama-1B-like shapes).
    "large": DecoderConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_layers=22, num_heads=16, dtype="bfloat16"),
}
