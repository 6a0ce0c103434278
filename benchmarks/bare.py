"""bare: the echo chain as a plain Ray compiled graph with no rayexec code, for the
`dag/bare` column of pp_tp_latency (what rayexec adds on top of Ray's own cost).

Same shape as rayexec's forward DAG: InputNode -> stage 0's TP actors -> ... -> the
last stage's actors -> MultiOutputNode; the driver sends the payload size (an int),
stage 0 makes the payload once per size, later stages pass on what they receive, and
the last stage's tp_rank 0 returns it (the others return None), as EchoWorker does.
Actors are `num_cpus=0` at niceness 0, like rayexec's workers. Variants:
  dict    what a user writes first: {"t": uint8 tensor} with Ray's default serialization;
  shm     the same with `with_tensor_transport("shm")` on the stage edges;
  bytes   the payload as `bytes` end to end (Ray's raw channel path, no serializer);
  numpy   a uint8 numpy array (Ray's pickle5 path: written once into the channel,
          read back without a copy);
  tensor  `bytes` on every edge, as `bytes`, but each stage hands its worker a tensor
          (`torch.frombuffer` of what it received) and sends the bytes of the tensor it
          returns (`.numpy().tobytes()`: a copy, as a worker's new output needs), and the
          driver gets a tensor back. The least Ray-only code that carries an engine's
          tensors: the work rayexec's CPU frames do, without the step, the batch and the
          output dict around the tensor.
Not here: timing (runners.py) or rayexec's own path (the dag mode).
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import ray
import torch

from rayexec.dag import await_proxy

VARIANTS = ("dict", "shm", "bytes", "numpy", "tensor")
TEARDOWN_S = 5.0  # Ray 2.60's teardown can hang after ~1 MiB payloads; then kill
PROXY_READY_S = 60.0  # the bound on waiting for the graph's proxy actor (dag.await_proxy)


def _quiet_frombuffer() -> None:
    """The tensor variant's frombuffer of received `bytes` (read-only) warns; a stage
    owns what it received, as with rayexec's frames (wire.py filters the same warning).
    Called in each process: Ray ships this module's classes by value (pp_tp_latency
    registers `benchmarks` with cloudpickle), so module code does not run in workers."""
    warnings.filterwarnings("ignore", message="The given buffer is not writable",
                            category=UserWarning)


def close_graph(compiled: Any, actors: list[Any]) -> None:
    """Tear a bare compiled graph down, waiting at most TEARDOWN_S, and kill its actors
    (which releases a teardown still blocked in Ray)."""
    worker = threading.Thread(target=compiled.teardown, daemon=True)
    worker.start()
    worker.join(TEARDOWN_S)
    for actor in actors:
        ray.kill(actor, no_restart=True)


class _BareActor:
    def __init__(self, first: bool, last: bool, tp_rank: int, variant: str) -> None:
        self.first, self.last, self.tp_rank, self.variant = first, last, tp_rank, variant
        self.payloads: dict[int, Any] = {}
        if variant == "tensor":
            _quiet_frombuffer()

    def _payload(self, nbytes: int) -> Any:
        if nbytes not in self.payloads:
            t = torch.arange(nbytes, dtype=torch.int64).to(torch.uint8)
            self.payloads[nbytes] = {"bytes": t.numpy().tobytes(), "numpy": t.numpy(),
                                     "tensor": t}.get(self.variant, {"t": t})
        return self.payloads[nbytes]

    def step(self, x: Any) -> Any:
        payload = self._payload(x) if self.first else x
        if not self.last:
            return payload
        if self.tp_rank != 0:
            return None
        return payload if self.variant in ("bytes", "numpy") else payload["t"]

    def step_tensor(self, x: Any) -> bytes | None:
        """`step` of the tensor variant."""
        t = self._payload(x) if self.first else torch.frombuffer(x, dtype=torch.uint8)
        if self.last and self.tp_rank != 0:
            return None
        return t.numpy().tobytes()


class BareChain:
    """A PP x TP echo chain compiled as a plain Ray graph; `execute_model(nbytes)`."""

    def __init__(self, pp: int, tp: int, variant: str, buffer_size_bytes: int | None = None
                 ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"bare variant {variant!r}: expected one of {VARIANTS}")
        self.variant = variant  # the driver's frombuffer is quiet: rayexec.wire filters it
        from ray.dag import InputNode, MultiOutputNode

        actor_cls = ray.remote(num_cpus=0, runtime_env={
            "env_vars": {"RAY_worker_niceness": "0"}})(_BareActor)
        self.actors = [[actor_cls.remote(s == 0, s == pp - 1, t, variant) for t in range(tp)]
                       for s in range(pp)]
        method = "step_tensor" if variant == "tensor" else "step"
        with InputNode() as inp:
            outs: list[Any] = [inp] * tp
            for s, stage in enumerate(self.actors):
                outs = [getattr(a, method).bind(x) for a, x in zip(stage, outs)]
                if variant == "shm" and s < pp - 1:
                    outs = [o.with_tensor_transport(transport="shm") for o in outs]
            graph = MultiOutputNode(outs)
        self.compiled = graph.experimental_compile(_buffer_size_bytes=buffer_size_bytes)
        # As rayexec's graph does (dag.await_proxy), so that neither is timed while
        # Ray starts the graph's proxy actor's process.
        await_proxy(self.compiled, PROXY_READY_S)

    def execute_model(self, nbytes: int) -> Any:
        outs = [ref.get() for ref in self.compiled.execute(nbytes)]  # read every result
        if self.variant == "tensor":
            return torch.frombuffer(outs[0], dtype=torch.uint8)
        return outs[0]

    def close(self) -> None:
        close_graph(self.compiled, [actor for stage in self.actors for actor in stage])

    def __enter__(self) -> BareChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
