"""The driver-side engine loop: greedy generation over anything that answers
`execute_model(batch, non_block)` (a RayDistributedExecutor or a ReferenceModel).

    result = generate(executor, prompts, max_new_tokens=32)

Requests are split into as many micro-batches as there are pipeline stages (round
robin). Each micro-batch's prompts are prefilled in one step, then decoded one
token per request per step; every micro-batch keeps one step in flight, so with PP
stages up to PP steps are in flight and every stage has work. rayexec's futures
resolve in submission order, which is the order this loop consumes them. A request
that reaches its token budget is put in the next step's `finished` list (any
micro-batch's: every worker sees every batch) so every worker frees its KV cache;
a final compute-free step frees the last ones.

Also: `make_prompts` (deterministic from a seed) and `make_decode_batch` (a decode
step that can be executed again and again, for benchmarks). Not here: the model or
Ray set-up.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rayexec.models.batch import StepBatch, StepOutput

logger = logging.getLogger(__name__)

_request_ids = itertools.count(1)


def new_request_ids(n: int) -> list[int]:
    """`n` request ids never used before in this process."""
    return [next(_request_ids) for _ in range(n)]


def make_prompts(num_prompts: int, max_len: int, vocab_size: int, seed: int = 0
                 ) -> list[list[int]]:
    """Random prompts with lengths between max(1, max_len // 2) and max_len, a pure
    function of the arguments."""
    if num_prompts < 1 or max_len < 1:
        raise ValueError(f"need num_prompts >= 1 and max_len >= 1, got {num_prompts}, {max_len}")
    gen = torch.Generator().manual_seed(seed)
    low = max(1, max_len // 2)
    lengths = torch.randint(low, max_len + 1, (num_prompts,), generator=gen).tolist()
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@dataclass
class _Request:
    id: int
    prompt: list[int]
    max_new: int
    out: list[int] = field(default_factory=list)
    first_token_s: float | None = None
    final_logits: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return len(self.out) >= self.max_new


@dataclass(frozen=True)
class GenerateResult:
    token_ids: list[list[int]]
    """Generated ids per prompt, in prompt order."""
    final_logits: list[torch.Tensor] | None
    """Per prompt, the logits that chose its last token (when asked for)."""
    elapsed_s: float
    """Wall time of the whole call, prefill included."""
    ttft_s: list[float]
    """Per prompt, seconds from the call to its first generated token."""
    step_s: list[float]
    """Latency of every decode step: its submission to its result."""
    prefill_s: list[float]
    """Latency of every prefill step."""

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Numbers for logs and JSON: tokens/s, median TTFT, decode step median/p90."""
        steps_ms = sorted(s * 1e3 for s in self.step_s)
        return {
            "tokens": self.num_tokens,
            "elapsed_s": self.elapsed_s,
            "tokens_per_s": self.tokens_per_s,
            "ttft_s": statistics.median(self.ttft_s) if self.ttft_s else None,
            "ttft_max_s": max(self.ttft_s, default=None),
            "step_ms_median": statistics.median(steps_ms) if steps_ms else None,
            "step_ms_p90": _percentile(steps_ms, 0.9),
            "decode_steps": len(steps_ms),
        }


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def pipeline_depth(target: Any) -> int:
    """PP of an executor; 1 for anything without an ExecutorConfig."""
    return getattr(getattr(target, "config", None), "pipeline_parallel_size", 1)


def generate(
    target: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    *,
    micro_batches: int | None = None,
    return_logits: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> GenerateResult:
    """Greedy-generate `max_new_tokens` (one count, or one per prompt) for each prompt.

    `micro_batches`: requests in flight are split into this many groups (default:
    the target's pipeline depth). `progress(done, total)` is called after each step
    with generated token counts."""
    budgets = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
               else list(max_new_tokens))
    if not prompts or len(budgets) != len(prompts) or min(budgets) < 1:
        raise ValueError(f"need >= 1 prompt and one max_new_tokens >= 1 per prompt; got "
                         f"{len(prompts)} prompt(s) and max_new_tokens={max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    requests = [_Request(rid, list(p), n)
                for rid, p, n in zip(new_request_ids(len(prompts)), prompts, budgets)]
    by_id = {r.id: r for r in requests}
    groups_n = max(1, min(micro_batches or pipeline_depth(target), len(requests)))
    groups = [requests[g::groups_n] for g in range(groups_n)]
    total = sum(budgets)
    to_free: list[int] = []
    freed: set[int] = set()
    inflight: deque[tuple[Any, list[_Request], float, bool]] = deque()

    def submit(group: list[_Request], prefill: bool) -> None:
        active = [r for r in group if not r.done]
        if not active:
            return
        logits = return_logits and any(len(r.out) + 1 == r.max_new for r in active)
        finished = tuple(to_free)
        if prefill:
            batch = StepBatch.prefill([r.id for r in active], [r.prompt for r in active],
                                      finished, logits)
        else:
            batch = StepBatch.decode([r.id for r in active], [r.out[-1] for r in active],
                                     [len(r.prompt) + len(r.out) - 1 for r in active],
                                     finished, logits)
        inflight.append((target.execute_model(batch, non_block=True), group,
                         time.perf_counter(), prefill))
        freed.update(finished)
        to_free.clear()

    start = time.perf_counter()
    prefill_s: list[float] = []
    step_s: list[float] = []
    done_tokens = 0
    try:
        for group in groups:
            submit(group, prefill=True)
        while inflight:
            future, group, submitted, prefill = inflight.popleft()
            out: StepOutput = future.result()
            now = time.perf_counter()
            (prefill_s if prefill else step_s).append(now - submitted)
            for i, (rid, token) in enumerate(zip(out.request_ids, out.next_token_ids)):
                r = by_id[rid]
                r.out.append(token)
                done_tokens += 1
                if r.first_token_s is None:
                    r.first_token_s = now - start
                if r.done:
                    to_free.append(rid)
                    if out.logits is not None:
                        r.final_logits = out.logits[i]
            if progress is not None:
                progress(done_tokens, total)
            submit(group, prefill=False)
        if to_free:
            target.execute_model(StepBatch.free_only(to_free))
            freed.update(to_free)
    except BaseException:
        _abandon(target, inflight, [r.id for r in requests if r.id not in freed])
        raise
    elapsed = time.perf_counter() - start
    return GenerateResult(
        token_ids=[r.out for r in requests],
        final_logits=[r.final_logits for r in requests] if return_logits else None,
        elapsed_s=elapsed, ttft_s=[r.first_token_s for r in requests],
        step_s=step_s, prefill_s=prefill_s,
    )


def _abandon(target: Any, inflight: deque, request_ids: list[int]) -> None:
    """After a failed step: consume what is still in flight and free every request
    that was not freed, best effort (the workers may be gone)."""
    for future, *_ in inflight:
        try:
            future.result()
        except Exception as e:
            logger.debug("in-flight step of an abandoned generate failed: %s", e)
    inflight.clear()
    try:
        target.execute_model(StepBatch.free_only(request_ids))
    except Exception as e:
        logger.warning("could not free the KV cache of %d abandoned request(s): %s",
                       len(request_ids), e)


def make_decode_batch(target: Any, num_requests: int = 8, context_len: int = 32,
                      vocab_size: int = 4096, seed: int = 0) -> StepBatch:
    """Prefill `num_requests` prompts of exactly `context_len` tokens on `target`, and
    return the decode step that follows them: one token per request at position
    `context_len`. Executing it again rewinds each cache to `context_len` and
    recomputes the same step, so a benchmark can time it any number of times.
    Free the requests afterwards with `target.execute_model(StepBatch.free_only(
    batch.request_ids))`."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab_size, (num_requests, context_len), generator=gen).tolist()
    ids = new_request_ids(num_requests)
    out = target.execute_model(StepBatch.prefill(ids, prompts))
    return StepBatch.decode(ids, out.next_token_ids, [context_len] * num_requests)
