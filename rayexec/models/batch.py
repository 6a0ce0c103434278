"""What one forward step carries: `StepBatch` (driver -> every worker) and
`StepOutput` (last stage -> driver).

A batch is plain tuples of ints, cheap to pickle: rayexec sends it to stage 0 and
every stage passes it on, so every worker sees every batch (and every `finished`
list). Requests are packed back to back: request i contributes `num_tokens[i]`
tokens, at positions start_positions[i] ... start_positions[i] + num_tokens[i] - 1.
A prefill step gives a request its whole prompt from position 0; a decode step one
token at the next position. Prefill and decode requests may share a batch.

Not here: scheduling (engine.py) or the model (decoder.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepBatch:
    request_ids: tuple[int, ...]
    """Requests computed in this step, each at most once."""
    num_tokens: tuple[int, ...]
    """Tokens each request contributes (prompt length at prefill, 1 at decode)."""
    token_ids: tuple[int, ...]
    """All tokens, request after request (len = sum(num_tokens))."""
    start_positions: tuple[int, ...]
    """Position of each request's first token in this step (= tokens it has cached)."""
    finished: tuple[int, ...] = ()
    """Requests whose KV cache every worker frees before computing this step."""
    return_logits: bool = False
    """Also return each request's last-token logits (float32, on the CPU)."""

    def __post_init__(self) -> None:
        # Runs on the driver only (unpickling skips __init__), so workers pay nothing.
        n = len(self.request_ids)
        if len(self.num_tokens) != n or len(self.start_positions) != n:
            raise ValueError(
                f"StepBatch has {n} request_ids but {len(self.num_tokens)} num_tokens and "
                f"{len(self.start_positions)} start_positions; give one of each per request"
            )
        if len(set(self.request_ids)) != n:
            raise ValueError(f"StepBatch.request_ids={self.request_ids} repeats a request")
        if sum(self.num_tokens) != len(self.token_ids) or min(self.num_tokens, default=1) < 1:
            raise ValueError(
                f"StepBatch.token_ids has {len(self.token_ids)} tokens but num_tokens="
                f"{self.num_tokens} (each >= 1) sums to {sum(self.num_tokens)}"
            )
        if min(self.start_positions, default=0) < 0:
            raise ValueError(f"StepBatch.start_positions={self.start_positions} has a negative")
        both = sorted(set(self.finished) & set(self.request_ids))
        if both:
            raise ValueError(f"requests {both} are both computed and finished in one step")

    @classmethod
    def prefill(cls, request_ids: Sequence[int], prompts: Sequence[Sequence[int]],
                finished: Sequence[int] = (), return_logits: bool = False) -> StepBatch:
        """Whole prompts from position 0."""
        return cls(tuple(request_ids), tuple(len(p) for p in prompts),
                   tuple(t for p in prompts for t in p), (0,) * len(prompts),
                   tuple(finished), return_logits)

    @classmethod
    def decode(cls, request_ids: Sequence[int], token_ids: Sequence[int],
               positions: Sequence[int], finished: Sequence[int] = (),
               return_logits: bool = False) -> StepBatch:
        """One token per request, at `positions`."""
        return cls(tuple(request_ids), (1,) * len(request_ids), tuple(token_ids),
                   tuple(positions), tuple(finished), return_logits)

    @classmethod
    def free_only(cls, finished: Sequence[int]) -> StepBatch:
        """A step that computes nothing and frees `finished` everywhere."""
        return cls((), (), (), (), tuple(finished))

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    def positions_tensor(self) -> torch.Tensor:
        """Every token's position, [sum(num_tokens)] int64."""
        return torch.cat([torch.arange(s, s + n) for s, n in
                          zip(self.start_positions, self.num_tokens)]) if self.request_ids \
            else torch.empty(0, dtype=torch.long)


@dataclass(frozen=True)
class StepOutput:
    request_ids: tuple[int, ...]
    """The batch's requests, in batch order."""
    next_token_ids: tuple[int, ...]
    """Greedy next token of each request."""
    logits: torch.Tensor | None = None
    """[num_requests, vocab] float32 last-token logits when the batch asked for them."""
