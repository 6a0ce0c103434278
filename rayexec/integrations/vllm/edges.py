"""How a vLLM pipeline stage's output crosses to the next stage in rayexec's DAG.

`pack_for_next_stage` on the sending stage, `unpack_from_previous_stage` on the
receiving one. Small CPU outputs (a decode step's hidden states and residual, a
few KiB) travel as one pickled `bytes` object; everything else as vLLM's
`IntermediateTensors`. On CPU rayexec then frames either with the batch into one
bytes message (`rayexec.wire`), the cheapest thing Ray's channels carry; on GPUs
the tensors take the edge's tensor transport. This module does not build the DAG or choose the
transport (`rayexec.dag` does).
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from vllm.sequence import IntermediateTensors

# Below this size one pickled bytes message costs less than the shm tensor
# transport's per-message work; well above it (MiBs) the transport wins. The
# measurements behind the choice are in docs/benchmarks.md ("vLLM stage outputs").
SMALL_EDGE_BYTES = 64 << 10


def pack_for_next_stage(out: IntermediateTensors) -> IntermediateTensors | bytes:
    """`out` as the next stage receives it: pickled bytes when every tensor is on
    the CPU and all together are at most SMALL_EDGE_BYTES, else unchanged."""
    tensors = out.tensors
    if (any(t.device.type != "cpu" for t in tensors.values())
            or sum(t.numel() * t.element_size() for t in tensors.values()) > SMALL_EDGE_BYTES):
        return out
    return pickle.dumps({
        name: (str(t.dtype).removeprefix("torch."), tuple(t.shape),
               t.contiguous().view(-1).view(torch.uint8).numpy())
        for name, t in tensors.items()}, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_from_previous_stage(received: Any) -> Any:
    """The previous stage's output as vLLM's runner takes it (IntermediateTensors)."""
    if not isinstance(received, bytes):
        return received
    # Copied: arrays unpickled from bytes are read-only, and the runner may write.
    return IntermediateTensors({
        name: torch.from_numpy(array.copy()).view(getattr(torch, dtype)).view(shape)
        for name, (dtype, shape, array) in pickle.loads(received).items()})
