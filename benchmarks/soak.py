"""Soak: many steps and many create/shutdown cycles, watching memory and leaks.

    python benchmarks/soak.py                      # 10,000 steps + 50 cycles
    python benchmarks/soak.py --steps 2000 --cycles 5 --out /tmp/soak.json

Part 1 runs `--steps` decode steps of the reference decoder (PP=2 x TP=1 by
default) through the compiled DAG, sampling the driver's and every worker's RSS
every `--sample-every` steps; growth is the least-squares slope in MB per 1,000
steps after the first sample. Part 2 creates and shuts down `--cycles` executors
(a few steps each) and counts what is left: worker actors and placement groups in
Ray's GCS tables, driver threads, the driver's heap and shared memory, and the object
store. (Ray 2.60 keeps about 20 MB of each compiled graph's channel buffers in the
object store after teardown, even with plain Ray and no rayexec; the shared part
of the driver's RSS grows with it. The heap should stay flat.) Prints a summary, writes JSON.
Not a test: it asserts nothing; tests/integration/test_soak.py runs a short one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

import ray

from rayexec import RayDistributedExecutor
from rayexec.models import StepBatch, decoder_executor_config, make_decode_batch

logger = logging.getLogger("soak")


def rss_mb(kind: str = "VmRSS") -> float:
    """This process's resident memory in MB (Linux /proc): VmRSS (all), RssAnon
    (private heap) or RssShmem (shared memory mapped, e.g. Ray's object store)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{kind}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def object_store_mb() -> float:
    """MB in use in the object store of the connected cluster."""
    import ray
    from ray._private.internal_api import memory_summary

    # The connected cluster's address: with none, Ray refuses when this machine runs
    # several clusters (two test runs at once).
    address = ray.get_runtime_context().gcs_address
    for line in memory_summary(address=address, stats_only=True).splitlines():
        if "Plasma memory usage" in line:
            return float(line.split("usage")[1].split("MiB")[0])
    return float("nan")


def slope_per_1000(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs, times 1000."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def live_counts() -> dict[str, int]:
    """Worker actors and placement groups alive in the connected cluster."""
    from ray._private import state

    actors = sum(1 for a in state.actors().values()
                 if a["ActorClassName"] == "RankActor" and a["State"] != "DEAD")
    groups = sum(1 for g in ray.util.placement_group_table().values()
                 if g["state"] != "REMOVED")
    return {"actors": actors, "placement_groups": groups}


def config(args: argparse.Namespace):
    return decoder_executor_config(args.pp, args.tp, seed=0, device="cpu",
                                   num_devices_per_worker=0.5)


def soak_steps(args: argparse.Namespace) -> dict:
    samples = []
    with RayDistributedExecutor(config(args)) as ex:
        batch = make_decode_batch(ex, num_requests=args.batch, context_len=16)
        start = time.perf_counter()
        for step in range(args.steps + 1):
            if step % args.sample_every == 0:
                workers = ex.collective_rpc(lambda w: rss_mb())
                samples.append({"step": step, "driver_mb": rss_mb(), "workers_mb": workers})
                print(f"soak steps: {step}/{args.steps}  driver {rss_mb():.1f} MB  workers "
                      f"{', '.join(f'{m:.1f}' for m in workers)} MB", file=sys.stderr, flush=True)
            if step < args.steps:
                ex.execute_model(batch)
        elapsed = time.perf_counter() - start
        ex.execute_model(StepBatch.free_only(batch.request_ids))
    steps = [s["step"] for s in samples[1:]]
    growth = {
        "driver_mb_per_1000_steps": slope_per_1000(steps, [s["driver_mb"] for s in samples[1:]]),
        "workers_mb_per_1000_steps": [
            slope_per_1000(steps, [s["workers_mb"][r] for s in samples[1:]])
            for r in range(len(samples[0]["workers_mb"]))
        ],
    }
    return {"steps": args.steps, "steps_per_s": args.steps / elapsed, "samples": samples,
            **growth}


def soak_cycles(args: argparse.Namespace) -> dict:
    before = live_counts()
    threads_before = threading.active_count()
    rss, anon, shmem, store = [], [], [], []
    for cycle in range(args.cycles):
        with RayDistributedExecutor(config(args)) as ex:
            batch = make_decode_batch(ex, num_requests=2, context_len=8)
            for _ in range(3):
                ex.execute_model(batch)
        rss.append(rss_mb())
        anon.append(rss_mb("RssAnon"))
        shmem.append(rss_mb("RssShmem"))
        store.append(object_store_mb())
        print(f"soak cycles: {cycle + 1}/{args.cycles}  driver {rss[-1]:.1f} MB (heap "
              f"{anon[-1]:.1f}, shared {shmem[-1]:.1f})  object store {store[-1]:.0f} MB  "
              f"threads {threading.active_count()}", file=sys.stderr, flush=True)
    time.sleep(1.0)  # let Ray's tables catch up with the last kills and removals
    after = live_counts()
    return {
        "cycles": args.cycles,
        "leaked_actors": after["actors"] - before["actors"],
        "leaked_placement_groups": after["placement_groups"] - before["placement_groups"],
        "leaked_threads": threading.active_count() - threads_before,
        "driver_mb_per_cycle": per_cycle(rss),
        "driver_heap_mb_per_cycle": per_cycle(anon),
        "driver_shared_mb_per_cycle": per_cycle(shmem),
        "object_store_mb_per_cycle": per_cycle(store),
        "driver_mb": rss,
    }


def per_cycle(values: list[float]) -> float:
    return slope_per_1000(list(range(len(values))), values) / 1000


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--sample-every", type=int, default=1000)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="requests per decode step")
    parser.add_argument("--out", default="results/latest/soak.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1),
                 include_dashboard=False, logging_level="ERROR")
    try:
        result = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "ray": ray.__version__, "platform": platform.platform()},
            "args": vars(args),
            "steps": soak_steps(args),
            "cycles": soak_cycles(args),
        }
    finally:
        if started_here:
            ray.shutdown()
    s, c = result["steps"], result["cycles"]
    print(f"\n{s['steps']} steps at {s['steps_per_s']:.0f} steps/s (PP={args.pp} x TP={args.tp})")
    print(f"RSS growth per 1,000 steps: driver {s['driver_mb_per_1000_steps']:+.2f} MB, "
          f"workers {', '.join(f'{g:+.2f}' for g in s['workers_mb_per_1000_steps'])} MB")
    print(f"{c['cycles']} create/shutdown cycles: leaked actors {c['leaked_actors']}, "
          f"placement groups {c['leaked_placement_groups']}, threads {c['leaked_threads']}")
    print(f"per cycle: driver RSS {c['driver_mb_per_cycle']:+.2f} MB (heap "
          f"{c['driver_heap_mb_per_cycle']:+.2f}, shared {c['driver_shared_mb_per_cycle']:+.2f}), "
          f"object store {c['object_store_mb_per_cycle']:+.2f} MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
