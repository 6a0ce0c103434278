"""What an idle executor costs, with and without idle parking (rayexec/park.py).

    python benchmarks/idle_park.py                  # PP x TP = 1x2, 2x1, 2x2; 4 s idle
    python benchmarks/idle_park.py --idle-s 10 --layouts 2x2

For each layout, two executors of EchoWorker (no compute; 4 KiB steps) on a local
Ray, one with idle_park_s=None (workers poll Ray's channels while idle) and one
with idle_park_s=0.5 (they sleep after 0.5 s), one after the other. Each runs warm
steps, then sits idle for --idle-s while the CPU time of its worker processes is
read, then runs one step (the "first step after idle", which for a parked
executor includes waking the workers); that is repeated --rounds times. Reported:
cores the workers used while idle (summed over workers; "settled" leaves out the
first SETTLE_S, in which a parking executor still polls), the median warm step
and the median first step after idle.

Prints a table, writes results/latest/idle_park.json and ends with one JSON line. Needs
psutil (in the test extra: pip install -e '.[test]').
Not here: per-step overhead under load (pp_tp_latency.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable as a package
    sys.path.insert(0, str(ROOT))

import benchmarks  # noqa: E402
from benchmarks.echo_worker import EchoWorker  # noqa: E402
from rayexec import ExecutorConfig, RayDistributedExecutor  # noqa: E402

RESULT = ROOT / "results" / "latest" / "idle_park.json"
PAYLOAD = 4096
PARK_AFTER_S = 0.5
SETTLE_S = 1.0


def cpu_seconds(pids: list[int]) -> list[float]:
    """CPU time (user + system) each process has used so far (the tests use it too)."""
    return [sum(psutil.Process(p).cpu_times()[:2]) for p in pids]


def worker_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(pids))


def timed_step(ex: RayDistributedExecutor) -> float:
    t0 = time.perf_counter()
    ex.execute_model(PAYLOAD)
    return time.perf_counter() - t0


def measure(pp: int, tp: int, idle_park_s: float | None, args: argparse.Namespace
            ) -> dict[str, Any]:
    config = ExecutorConfig(worker_cls=EchoWorker,
                            worker_kwargs={"pipeline_parallel_size": pp},
                            pipeline_parallel_size=pp, tensor_parallel_size=tp, device="cpu",
                            num_devices_per_worker=0.5, idle_park_s=idle_park_s)
    with RayDistributedExecutor(config) as ex:
        pids = ex.collective_rpc(lambda w: os.getpid())
        warm, after_idle, idle_cores, settled_cores = [], [], [], []
        for _ in range(args.rounds):
            warm += [timed_step(ex) for _ in range(args.warm_steps)]
            start, t0 = worker_cpu_seconds(pids), time.perf_counter()
            time.sleep(SETTLE_S)
            settled, t1 = worker_cpu_seconds(pids), time.perf_counter()
            time.sleep(args.idle_s - SETTLE_S)
            end, t2 = worker_cpu_seconds(pids), time.perf_counter()
            idle_cores.append((end - start) / (t2 - t0))
            settled_cores.append((end - settled) / (t2 - t1))
            after_idle.append(timed_step(ex))
    return {"pp": pp, "tp": tp, "idle_park_s": idle_park_s,
            "idle_cores": statistics.median(idle_cores), "idle_cores_by_round": idle_cores,
            "idle_cores_settled": statistics.median(settled_cores),
            "warm_step_ms": statistics.median(warm) * 1e3,
            "first_step_after_idle_ms": statistics.median(after_idle) * 1e3,
            "first_step_after_idle_ms_by_round": [x * 1e3 for x in after_idle]}


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'PP x TP':<8} {'idle_park_s':>11} {'idle cores':>10} {'settled':>8} "
            f"{'warm step ms':>12} {'1st after idle ms':>17}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['pp']}x{r['tp']:<6} {r['idle_park_s']!s:>11} {r['idle_cores']:>10.2f} "
                     f"{r['idle_cores_settled']:>8.2f} {r['warm_step_ms']:>12.2f} "
                     f"{r['first_step_after_idle_ms']:>17.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="1x2,2x1,2x2", help="PPxTP, comma-separated")
    parser.add_argument("--idle-s", type=float, default=4.0, help="seconds idle per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    if args.idle_s <= 2 * SETTLE_S:
        parser.error(f"--idle-s={args.idle_s} must be more than {2 * SETTLE_S}s")
    import ray
    import ray.cloudpickle

    # EchoWorker goes to the workers by value: run from another directory, they
    # lack the repository root on sys.path.
    ray.cloudpickle.register_pickle_by_value(benchmarks)
    # Logical CPUs for two layouts at once: an executor's actors may still be
    # leaving when the next one asks for its placement group.
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    rows = []
    try:
        for layout in args.layouts.split(","):
            pp, tp = (int(x) for x in layout.lower().split("x"))
            for idle_park_s in (None, PARK_AFTER_S):
                print(f"[{pp}x{tp}] idle_park_s={idle_park_s} ...", flush=True)
                rows.append(measure(pp, tp, idle_park_s, args))
    finally:
        ray.shutdown()
    print(table(rows))
    doc = {"command": " ".join(["python", "benchmarks/idle_park.py", *(argv or sys.argv[1:])]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(), "ray": ray.__version__},
           "idle_s": args.idle_s, "rounds": args.rounds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps({"idle_park": [{k: r[k] for k in ("pp", "tp", "idle_park_s",
                                                       "idle_cores_settled",
                                                       "first_step_after_idle_ms")}
                                    for r in rows], "result": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
