"""Per-request KV cache of one worker: keys and values of its own layers and heads.

A request's entry is created by its first step and lives until `free`. A step that
covers positions [start, start + n) first `reserve`s them: `start` may equal the
cached length (append) or lie inside it (rewind: the tail is dropped and recomputed,
which is how a benchmark repeats one decode step); a gap is an error. Buffers grow
by doubling so decode appends are amortised O(1).

Not here: attention math or any scheduling; the engine decides what to free, each
worker frees what the step batch tells it to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

MIN_CAPACITY = 16


@dataclass
class _Entry:
    length: int  # tokens cached, including those reserved by the current step
    keys: list[torch.Tensor]  # per local layer: [heads, capacity, head_dim]
    values: list[torch.Tensor]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1] if self.keys else 1 << 62


class KVCache:
    """Keys and values per request id for `num_layers` layers of `num_heads` heads."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                 ) -> None:
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self._entries: dict[int, _Entry] = {}
        self._start: dict[int, int] = {}  # request id -> start of the current step

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def length(self, request_id: int) -> int:
        entry = self._entries.get(request_id)
        return 0 if entry is None else entry.length

    def reserve(self, request_id: int, start: int, num_tokens: int) -> None:
        """Make room for positions [start, start + num_tokens) of `request_id`."""
        entry = self._entries.get(request_id)
        cached = 0 if entry is None else entry.length
        if not 0 <= start <= cached:
            raise ValueError(
                f"request {request_id}: step starts at position {start} but its KV cache "
                f"holds {cached} token(s); a step must continue the cache (start={cached}) "
                f"or rewind into it (start < {cached}). Was the request freed, or a step lost?"
            )
        if entry is None:
            entry = self._entries[request_id] = _Entry(0, [], [])
            entry.keys = [self._buffer(MIN_CAPACITY) for _ in range(self.num_layers)]
            entry.values = [self._buffer(MIN_CAPACITY) for _ in range(self.num_layers)]
        end = start + num_tokens
        if end > entry.capacity:
            capacity = max(end, 2 * entry.capacity)
            entry.keys = [self._grow(t, capacity, start) for t in entry.keys]
            entry.values = [self._grow(t, capacity, start) for t in entry.values]
        entry.length = end
        self._start[request_id] = start

    def write(self, request_id: int, layer: int, keys: torch.Tensor, values: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's [heads, n, head_dim] keys/values of local `layer`; returns
        every cached key and value of the request, [heads, length, head_dim]."""
        entry, start = self._entries[request_id], self._start[request_id]
        end = start + keys.shape[1]
        assert end == entry.length, (request_id, start, keys.shape, entry.length)
        entry.keys[layer][:, start:end] = keys
        entry.values[layer][:, start:end] = values
        return entry.keys[layer][:, :end], entry.values[layer][:, :end]

    def free(self, request_ids: Iterable[int]) -> int:
        """Drop the entries of `request_ids` (unknown ids are ignored: a stage that
        never saw a request has nothing to free). Returns how many were dropped."""
        dropped = 0
        for rid in request_ids:
            dropped += self._entries.pop(rid, None) is not None
            self._start.pop(rid, None)
        return dropped

    def clear(self) -> int:
        """Drop every entry (sleep); returns how many were dropped."""
        return self.free(list(self._entries))

    def stats(self) -> dict[str, int]:
        """{"requests", "tokens", "bytes"} held now (bytes of allocated buffers)."""
        nbytes = sum(t.numel() * t.element_size()
                     for e in self._entries.values() for t in (*e.keys, *e.values))
        tokens = sum(e.length for e in self._entries.values())
        return {"requests": len(self._entries), "tokens": tokens, "bytes": nbytes}

    def _buffer(self, capacity: int) -> torch.Tensor:
        return torch.empty(self.num_heads, capacity, self.head_dim, dtype=self.dtype,
                           device=self.device)

    def _grow(self, old: torch.Tensor, capacity: int, keep: int) -> torch.Tensor:
        new = self._buffer(capacity)
        new[:, :keep] = old[:, :keep]
        return new
