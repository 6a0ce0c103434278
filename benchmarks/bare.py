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
          read back without a copy).
Not here: timing (runners.py) or rayexec's own path (the dag mode).
"""

from __future__ import annotations

import threading
from typing import Any

import ray

from rayexec.dag import await_proxy

VARIANTS = ("dict", "shm", "bytes", "numpy")
TEARDOWN_S = 5.0  # Ray 2.60's teardown can hang after ~1 MiB payloads; then kill
PROXY_READY_S = 60.0  # the bound on waiting for the graph's proxy actor (dag.await_proxy)


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

    def _payload(self, nbytes: int) -> Any:
        if nbytes not in self.payloads:
            import torch

            t = torch.arange(nbytes, dtype=torch.int64).to(torch.uint8)
            self.payloads[nbytes] = {"bytes": t.numpy().tobytes(), "numpy": t.numpy()}.get(
                self.variant, {"t": t})
        return self.payloads[nbytes]

    def step(self, x: Any) -> Any:
        payload = self._payload(x) if self.first else x
        if not self.last:
            return payload
        if self.tp_rank != 0:
            return None
        return payload if self.variant in ("bytes", "numpy") else payload["t"]


class BareChain:
    """A PP x TP echo chain compiled as a plain Ray graph; `execute_model(nbytes)`."""

    def __init__(self, pp: int, tp: int, variant: str, buffer_size_bytes: int | None = None
                 ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"bare variant {variant!r}: expected one of {VARIANTS}")
        from ray.dag import InputNode, MultiOutputNode

        actor_cls = ray.remote(num_cpus=0, runtime_env={
            "env_vars": {"RAY_worker_niceness": "0"}})(_BareActor)
        self.actors = [[actor_cls.remote(s == 0, s == pp - 1, t, variant) for t in range(tp)]
                       for s in range(pp)]
        with InputNode() as inp:
            outs: list[Any] = [inp] * tp
            for s, stage in enumerate(self.actors):
                outs = [a.step.bind(x) for a, x in zip(stage, outs)]
                if variant == "shm" and s < pp - 1:
                    outs = [o.with_tensor_transport(transport="shm") for o in outs]
            graph = MultiOutputNode(outs)
        self.compiled = graph.experimental_compile(_buffer_size_bytes=buffer_size_bytes)
        # As rayexec's graph does (dag.await_proxy), so that neither is timed while
        # Ray starts the graph's proxy actor's process.
        await_proxy(self.compiled, PROXY_READY_S)

    def execute_model(self, nbytes: int) -> Any:
        outs = [ref.get() for ref in self.compiled.execute(nbytes)]  # read every result
        return outs[0]

    def close(self) -> None:
        close_graph(self.compiled, [actor for stage in self.actors for actor in stage])

    def __enter__(self) -> BareChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
