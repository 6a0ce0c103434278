"""Two versions of rayexec/wire.py side by side: the frame code alone and in a graph.

    python benchmarks/wire_ab.py --base e70b026     # this tree's wire.py against e70b026's
    python benchmarks/wire_ab.py --sizes 4096 --rounds 8

`base` is wire.py at a git revision (`git show REV:rayexec/wire.py`), `tree` the one
in this checkout. Both are loaded into the same processes, so one run compares them
under the same load, in alternating order:

- alone: `timeit` of pack and unpack for a PP=2 echo step's three messages (the
  driver's `(step, nbytes)`, stage 0's `(step, nbytes, {"t": t})`, the last stage's
  tensor) and a 2-d tensor, at 4 KiB, base/tree/base/tree;
- graph: two bare PP=2 x TP=1 compiled graphs on one local Ray, each stage doing what
  `RankActor.run_step` does with frames (unpack, EchoWorker, pack) with one version,
  --rounds rounds in alternating order, --steps timed steps each after 30 untimed.
  `tree/base` is the median of the per-round ratios of the median step.

Prints a table, writes results/latest/wire_ab.json and ends with one JSON line.
Not here: the executor's own per-step work (pp_tp_latency.py's dag vs bare).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable as a package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import benchmarks  # noqa: E402
from benchmarks.bare import PROXY_READY_S, close_graph  # noqa: E402
from benchmarks.echo_worker import EchoWorker  # noqa: E402

RESULT = ROOT / "results" / "latest" / "wire_ab.json"
PP = 2
ALONE_BYTES = 4096
VERSIONS = ("base", "tree")
STEP_TIMEOUT_S = 60.0  # the bound on one step's result


def load_wire(source: str, name: str) -> types.ModuleType:
    """wire.py's `source` as module `name` (registered, so its pickles find it)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source, f"<wire {name}>", "exec"), module.__dict__)
    return module


def sources(base: str) -> dict[str, str]:
    try:
        old = subprocess.run(["git", "show", f"{base}:rayexec/wire.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise SystemExit(f"--base {base}: cannot read rayexec/wire.py at that revision ({e}); "
                         f"pass a commit of this repository") from None
    return {"base": old, "tree": (ROOT / "rayexec" / "wire.py").read_text()}


def alone(wires: dict[str, Any], number: int) -> list[dict[str, Any]]:
    t = torch.arange(ALONE_BYTES, dtype=torch.int64).to(torch.uint8)
    messages = {"driver (step, nbytes)": (7, ALONE_BYTES),
                "stage 0 (step, nbytes, {'t': t})": (7, ALONE_BYTES, {"t": t}),
                "last stage t": t, "t, 64x64": t.view(64, 64)}
    rows = []
    for label, message in messages.items():
        row: dict[str, Any] = {"message": label}
        for name in (*VERSIONS, *VERSIONS):
            w = wires[name]
            frame = w.pack(message)
            pack = timeit.timeit(lambda w=w, m=message: w.pack(m, reuse=True, channel=True),
                                 number=number) / number * 1e6
            unpack = timeit.timeit(lambda w=w, f=frame: w.unpack(f), number=number) / number * 1e6
            row.setdefault(f"{name}_pack_us", []).append(pack)
            row.setdefault(f"{name}_unpack_us", []).append(unpack)
        rows.append(row)
    return rows


class _Stage:
    """One PP stage of the bare chain, with one version of wire.py."""

    def __init__(self, pp_rank: int, source: str, module: str) -> None:
        # The driver's name for this version: what a frame pickles by reference
        # (wire._ungather) must resolve in every process of the chain.
        self.wire = load_wire(source, module)
        self.first, self.last = pp_rank == 0, pp_rank == PP - 1
        self.worker = EchoWorker(rank=pp_rank, local_rank=0, world_size=PP, pp_rank=pp_rank,
                                 tp_rank=0, distributed_init_method="", pipeline_parallel_size=PP)

    def step(self, frame: bytes) -> Any:
        message = self.wire.unpack(frame)
        step, batch, intermediate = (*message, None) if self.first else message
        out = self.worker.execute_model(batch, intermediate)
        return self.wire.pack(out if self.last else (step, batch, out), reuse=True, channel=True)


class Chain:
    """A bare PP=2 x TP=1 compiled graph of `_Stage`s, driven with one version of wire.py."""

    def __init__(self, wire: Any, source: str, buffer_size_bytes: int) -> None:
        import ray
        from ray.dag import InputNode

        from rayexec.dag import await_proxy

        self.wire, self.step = wire, 0
        stage = ray.remote(num_cpus=0, runtime_env={"env_vars": {"RAY_worker_niceness": "0"}}
                           )(_Stage)
        self.actors = [stage.remote(pp_rank, source, wire.__name__) for pp_rank in range(PP)]
        with InputNode() as inp:
            node = inp
            for actor in self.actors:
                node = actor.step.bind(node)
        # Room for the largest payload, as the executor sizes its channels (max_step_bytes).
        self.compiled = node.experimental_compile(_buffer_size_bytes=buffer_size_bytes)
        await_proxy(self.compiled, PROXY_READY_S)

    def execute(self, nbytes: int) -> Any:
        self.step += 1
        frame = self.wire.pack((self.step, nbytes), reuse=True, channel=True)
        return self.wire.unpack(self.compiled.execute(frame).get(timeout=STEP_TIMEOUT_S))

    def median_us(self, nbytes: int, steps: int) -> float:
        for _ in range(30):
            out = self.execute(nbytes)
        expected = torch.arange(nbytes, dtype=torch.int64).to(torch.uint8)  # EchoWorker's
        if not torch.equal(out, expected):
            raise RuntimeError(f"the {self.wire.__name__} chain returned {out!r} for a "
                               f"{nbytes}-byte echo; expected EchoWorker's payload back")
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.execute(nbytes)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6

    def close(self) -> None:
        close_graph(self.compiled, self.actors)


def graph(wires: dict[str, Any], srcs: dict[str, str], sizes: list[int], rounds: int,
          steps: int) -> list[dict[str, Any]]:
    room = max(sizes) + (1 << 20)  # the frame's header and trailer
    chains = {name: Chain(wires[name], srcs[name], room) for name in VERSIONS}
    try:
        by = {(name, n): [] for name in VERSIONS for n in sizes}
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", flush=True)
            for n in sizes:
                for name in (VERSIONS if r % 2 == 0 else VERSIONS[::-1]):
                    by[name, n].append(chains[name].median_us(n, steps))
    finally:
        for chain in chains.values():
            chain.close()
    rows = []
    for n in sizes:
        ratios = sorted(t / b for t, b in zip(by["tree", n], by["base", n]))
        rows.append({"payload_bytes": n, "base_us": by["base", n], "tree_us": by["tree", n],
                     "base_median_us": statistics.median(by["base", n]),
                     "tree_median_us": statistics.median(by["tree", n]),
                     "tree_over_base": statistics.median(ratios),
                     "tree_over_base_range": [ratios[0], ratios[-1]]})
    return rows


def table(alone_rows: list[dict[str, Any]], graph_rows: list[dict[str, Any]]) -> str:
    med = statistics.median
    lines = [f"alone, {ALONE_BYTES} B (us, median of 2)        pack base/tree  unpack base/tree"]
    for r in alone_rows:
        lines.append(f"  {r['message']:<34} {med(r['base_pack_us']):5.2f} /"
                     f"{med(r['tree_pack_us']):5.2f}   {med(r['base_unpack_us']):5.2f} /"
                     f"{med(r['tree_unpack_us']):5.2f}")
    lines.append(f"graph, PP={PP} x TP=1 bare chain   base us   tree us   tree/base (range)")
    for r in graph_rows:
        lo, hi = r["tree_over_base_range"]
        lines.append(f"  {r['payload_bytes']:>10} B {'':>20} {r['base_median_us']:7.0f} "
                     f"{r['tree_median_us']:9.0f}   {r['tree_over_base']:.3f} ({lo:.2f}-{hi:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the base wire.py")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 65536, 1 << 20])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--number", type=int, default=20000, help="timeit calls, alone")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    import ray
    import ray.cloudpickle

    srcs = sources(args.base)
    wires = {name: load_wire(src, f"rayexec_wire_ab_{name}") for name, src in srcs.items()}
    print("alone ...", flush=True)
    alone_rows = alone(wires, args.number)
    # EchoWorker goes to the workers by value: run from another directory, they
    # lack the repository root on sys.path.
    ray.cloudpickle.register_pickle_by_value(benchmarks)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        graph_rows = graph(wires, srcs, args.sizes, args.rounds, args.steps)
    finally:
        ray.shutdown()
    print(table(alone_rows, graph_rows))
    doc = {"command": " ".join(["python", "benchmarks/wire_ab.py", *(argv or sys.argv[1:])]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(), "ray": ray.__version__,
                       "load": os.getloadavg()[0]},
           "base": args.base, "rounds": args.rounds, "steps": args.steps,
           "alone": alone_rows, "graph": graph_rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps({"wire_ab": [{k: r[k] for k in ("payload_bytes", "tree_over_base")}
                                  for r in graph_rows], "result": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
