"""Seeded randomized fault schedules against a live executor, checked after every call.

    python benchmarks/faults.py --minutes 10            # writes results/faults.json
    python benchmarks/faults.py --seed 1234 --ops 20    # replay one schedule

A schedule is drawn from its seed: an executor (PP=2 x TP=1 or 2, forward dag or
rpc, restart_on_failure on or off; small RecordingWorker workers on a sliver of a
CPU each), one to three driver threads, and a list of operations split among
them: blocking and non-blocking steps, collective_rpc (blocking, non-blocking, a
subset of ranks), SIGKILL of a random worker, SIGSTOP then SIGCONT of one,
restart_failed_workers(), check_health() and, last, shutdown(). A fault is
injected by a thread of its own while the driver threads run.

Invariants, checked after every operation (a breach is a `Violation`, with the seed):
- each call returns the right value (a step: RecordingWorker's known output; an
  rpc: the echoed value from each asked rank, in rank order) or raises a
  RayExecError subclass that names ranks (ExecutorClosedError only once shutdown
  was called, and ExecutorTimeoutError while a restart is awaited);
- no call runs past its documented bound (`bound_s`): a call still running then
  is a hang; this is a hang detector, not a speed test;
- with restart_on_failure=True, after a kill the executor serves the right
  results again within the restart bound; with it off, after
  restart_failed_workers();
- after shutdown(): no RankActor, no compiled-graph proxy actor, no placement
  group, no "rayexec-" thread and no worker /dev/shm entry is left
  (tests/helpers.py).
Also measured (the JSON's "measured"): seconds from a SIGKILL to the death being
reported, from a kill to serving again, and shutdown() with a frozen rank.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from rayexec import (
    ExecutorClosedError,
    ExecutorConfig,
    ExecutorTimeoutError,
    RayDistributedExecutor,
    RayExecError,
)
from rayexec.executor import RESTART_MARGIN_S, SHUTDOWN_TIMEOUT_S
from tests.helpers import assert_no_leaks, cluster_snapshot
from tests.workers import RecordingWorker, expected

logger = logging.getLogger("faults")

OPS = ("step", "step_nb", "rpc", "rpc_nb", "rpc_subset", "health", "restart",
       "sigkill", "sigstop")
EXECUTE_TIMEOUT_S = 6.0
RPC_TIMEOUT_S = 6.0
HEALTH_TIMEOUT_S = 4.0
INIT_TIMEOUT_S = 60.0
# Headroom over each documented bound for a shared 2-core machine: a call past
# bound + SLACK_S is a hang, not a slow call.
SLACK_S = 30.0
OP_GAP_S = 1.0  # a driver thread pauses up to this long before each call
FAULT_WINDOW_S = 4.0  # faults land this soon after the calls begin
SIGSTOP_MAX_S = 9.0


class Violation(AssertionError):
    """An invariant broken by a schedule; the message starts with the seed."""


@dataclass
class Schedule:
    seed: int
    tp: int
    forward: str
    restart_on_failure: bool
    threads: list[list[str]]  # per driver thread, its operations in order
    faults: list[tuple[float, str]]  # (seconds after start, "sigkill" | "sigstop")

    @classmethod
    def draw(cls, seed: int, ops: int) -> Schedule:
        rng = random.Random(seed)
        n_threads = rng.randint(1, 3)
        calls = [rng.choice(OPS[:7]) for _ in range(ops)]
        threads: list[list[str]] = [[] for _ in range(n_threads)]
        for i, op in enumerate(calls):
            threads[i % n_threads].append(op)
        n_faults = rng.randint(1, 2)
        faults = sorted((rng.uniform(0.0, FAULT_WINDOW_S), rng.choice(("sigkill", "sigstop")))
                        for _ in range(n_faults))
        return cls(seed, rng.choice((1, 2)), rng.choice(("dag", "dag", "rpc")),
                   rng.random() < 0.5, threads, faults)

    def config(self) -> ExecutorConfig:
        return ExecutorConfig(
            worker_cls=RecordingWorker, pipeline_parallel_size=2, tensor_parallel_size=self.tp,
            device="cpu", num_devices_per_worker=0.01, forward=self.forward,
            restart_on_failure=self.restart_on_failure, execute_timeout_s=EXECUTE_TIMEOUT_S,
            rpc_timeout_s=RPC_TIMEOUT_S, health_check_timeout_s=HEALTH_TIMEOUT_S,
            init_timeout_s=INIT_TIMEOUT_S, pg_ready_timeout_s=30.0, idle_park_s=0.5,
        )


def restart_bound_s() -> float:
    """What a call may wait for an automatic restart (executor._wait_until_serving)."""
    return INIT_TIMEOUT_S + RESTART_MARGIN_S


def bound_s(op: str) -> float:
    """The documented bound of one call, waiting out a restart included."""
    own = {"step": EXECUTE_TIMEOUT_S + 4, "step_nb": EXECUTE_TIMEOUT_S + 4,
           "rpc": RPC_TIMEOUT_S, "rpc_nb": RPC_TIMEOUT_S, "rpc_subset": RPC_TIMEOUT_S,
           "health": HEALTH_TIMEOUT_S, "restart": 4 * INIT_TIMEOUT_S,
           "shutdown": SHUTDOWN_TIMEOUT_S}[op]
    return own + (0 if op == "shutdown" else restart_bound_s()) + SLACK_S


def worker_pids(ex: RayDistributedExecutor) -> list[int]:
    """Worker process ids in rank order, from Ray's actor table (asks no worker)."""
    from ray._private import state

    table = state.actors()
    return [int(table[w._actor_id.hex()]["Pid"]) for w in ex.workers]


def names_ranks(error: BaseException) -> bool:
    return bool(getattr(error, "ranks", None))


@dataclass
class Run:
    """One schedule being run: the executor, what happened, what broke."""

    schedule: Schedule
    ex: RayDistributedExecutor
    closed: threading.Event = field(default_factory=threading.Event)
    log: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: dict[int, float] = field(default_factory=dict)  # pid -> when SIGSTOPped

    def note(self, text: str) -> None:
        with self.lock:
            self.log.append(f"{time.monotonic():.2f} {text}")

    def violate(self, text: str) -> None:
        with self.lock:
            self.violations.append(f"seed={self.schedule.seed}: {text}")

    def allowed(self, op: str, error: BaseException) -> bool:
        """Whether `error` is an acceptable outcome of `op`."""
        if isinstance(error, ExecutorClosedError):
            return self.closed.is_set()
        if not isinstance(error, RayExecError):
            return False
        if isinstance(error, ExecutorTimeoutError) and error.what.startswith("waiting for"):
            return True  # a restart did not finish in its bound: named by its setting
        return names_ranks(error)


def bounded(run: Run, op: str, call: Callable[[], Any]) -> tuple[bool, Any, BaseException | None]:
    """Run `call` in a helper thread; (finished in bound, value, error)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, name=f"faults-{op}", daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(bound_s(op))
    if thread.is_alive():
        run.violate(f"{op} still running {bound_s(op):.0f}s after it began (hang)")
        return False, None, None
    run.note(f"{op} {time.monotonic() - start:.2f}s {type(box.get('error')).__name__}")
    return True, box.get("value"), box.get("error")


def do(run: Run, op: str, rng: random.Random) -> None:
    ex, world = run.ex, run.ex.world_size
    x = [rng.uniform(-5, 5)]
    want = expected(x)
    if op in ("step", "step_nb"):
        def call():
            out = ex.execute_model({"x": x}, non_block=op == "step_nb")
            return out.result(timeout=bound_s(op)) if op == "step_nb" else out

        def check(value):
            return value["h"].tolist() == want.tolist()
    elif op in ("rpc", "rpc_nb", "rpc_subset"):
        ranks = sorted(rng.sample(range(world), rng.randint(1, world))) if op == "rpc_subset" \
            else list(range(world))

        def call():
            out = ex.collective_rpc("echo", args=(x,), non_block=op == "rpc_nb",
                                    ranks=ranks if op == "rpc_subset" else None)
            return out.result(timeout=bound_s(op)) if op == "rpc_nb" else out

        def check(value):
            return value == [x] * len(ranks)
    elif op == "health":
        def call():
            return ex.check_health()

        def check(value):
            return value is None
    elif op == "restart":
        def call():
            return ex.restart_failed_workers()

        def check(value):
            return isinstance(value, list) and all(0 <= r < world for r in value)
    else:
        raise ValueError(op)
    finished, value, error = bounded(run, op, call)
    if not finished:
        return
    if error is not None:
        with run.lock:
            run.errors[type(error).__name__] = run.errors.get(type(error).__name__, 0) + 1
        if not run.allowed(op, error):
            run.violate(f"{op} raised {type(error).__name__} that names no rank: {error!r}"[:400])
    elif not check(value):
        run.violate(f"{op} returned a wrong value: {value!r}"[:400])


def inject(run: Run, kind: str, rng: random.Random) -> None:
    """SIGKILL one worker, or SIGSTOP one and SIGCONT it 1 to SIGSTOP_MAX_S s later
    (past the step and rpc timeouts in some schedules)."""
    try:
        pids = worker_pids(run.ex)
    except Exception as e:  # shut down, or mid-restart: nothing to hit now
        run.note(f"{kind} skipped: {e!r}")
        return
    rank = rng.randrange(len(pids))
    pid = pids[rank]
    run.note(f"{kind} rank {rank} pid {pid}")
    try:
        if kind == "sigkill":
            os.kill(pid, signal.SIGKILL)
            return
        os.kill(pid, signal.SIGSTOP)
        run.stopped[pid] = time.monotonic()
        time.sleep(rng.uniform(1.0, SIGSTOP_MAX_S))
        os.kill(pid, signal.SIGCONT)
        run.stopped.pop(pid, None)
    except ProcessLookupError:
        run.note(f"{kind}: pid {pid} already gone")


def recover(run: Run) -> None:
    """After the faults: the executor must serve right results again within the
    restart bound (automatically, or after restart_failed_workers())."""
    deadline = time.monotonic() + restart_bound_s() + 4 * INIT_TIMEOUT_S
    x = [1.5]
    want = expected(x).tolist()
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if not run.schedule.restart_on_failure:
                run.ex.restart_failed_workers()
            if run.ex.execute_model({"x": x})["h"].tolist() == want:
                return
            run.violate("a step after recovery returned a wrong value")
            return
        except RayExecError as e:
            if last is None or type(last) is not type(e):
                run.note(f"recover: {e!r}"[:300])
            last = e
            time.sleep(0.5)
    run.violate(f"not serving again within {restart_bound_s() + 4 * INIT_TIMEOUT_S:.0f}s "
                f"after the faults; last error {last!r}"[:400])


def run_schedule(schedule: Schedule) -> dict[str, Any]:
    """Run one schedule from its seed; returns its record (violations included)."""
    before = cluster_snapshot()
    rng = random.Random(schedule.seed)
    t0 = time.monotonic()
    ex = RayDistributedExecutor(schedule.config())
    run = Run(schedule, ex)
    try:
        ex.warmup()
        start = time.monotonic()

        def driver(ops: list[str], index: int) -> None:
            own = random.Random(schedule.seed * 31 + index)
            for op in ops:
                # Spread the calls over the window in which the faults land.
                time.sleep(own.uniform(0.0, OP_GAP_S))
                do(run, op, own)

        def faults() -> None:
            own = random.Random(schedule.seed * 17)
            for at, kind in schedule.faults:
                time.sleep(max(0.0, at - (time.monotonic() - start)))
                inject(run, kind, own)

        threads = [threading.Thread(target=driver, args=(ops, i), name=f"faults-driver-{i}")
                   for i, ops in enumerate(schedule.threads)]
        threads.append(threading.Thread(target=faults, name="faults-inject"))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        recover(run)
    finally:
        for pid in list(run.stopped):  # never leave a frozen process behind
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        run.closed.set()
        finished, _, error = bounded(run, "shutdown", ex.shutdown)
        if finished and error is not None:
            run.violate(f"shutdown raised {error!r}")
    try:
        assert_no_leaks(before)
    except AssertionError as e:
        run.violate(f"after shutdown: {e}")
    del rng
    return {"seed": schedule.seed, "tp": schedule.tp, "forward": schedule.forward,
            "restart_on_failure": schedule.restart_on_failure,
            "threads": schedule.threads, "faults": schedule.faults,
            "errors": run.errors, "violations": run.violations,
            "seconds": round(time.monotonic() - t0, 1), "log": run.log[-40:]}


# ---- measured bounds ---------------------------------------------------------------
def measure_death_and_restart(tp: int = 1) -> dict[str, float]:
    """Seconds from SIGKILL of a worker to the failure callback, and to the first
    right step after the automatic restart."""
    cfg = Schedule(0, tp, "dag", True, [], []).config()
    with RayDistributedExecutor(cfg) as ex:
        ex.warmup()
        ex.execute_model({"x": [1.0]})
        died = threading.Event()
        ex.register_failure_callback(lambda err: died.set())
        pid = worker_pids(ex)[-1]
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        died.wait(60)
        detect = time.monotonic() - start
        while True:
            try:
                if ex.execute_model({"x": [1.0]})["h"].tolist() == expected([1.0]).tolist():
                    break
            except RayExecError:
                time.sleep(0.1)
            if time.monotonic() - start > restart_bound_s():
                break
        return {"death_detected_s": round(detect, 2),
                "serving_again_s": round(time.monotonic() - start, 2)}


def measure_shutdown_with_frozen_rank(tp: int = 1) -> dict[str, float]:
    """SIGSTOP one rank mid-step: the step's ExecutorTimeoutError, then SIGCONT
    and shutdown(): seconds each took."""
    cfg = Schedule(0, tp, "dag", False, [], []).config()
    ex = RayDistributedExecutor(cfg)
    ex.warmup()
    ex.execute_model({"x": [1.0]})
    pid = worker_pids(ex)[-1]
    future = ex.execute_model({"x": [1.0], "sleep": 1.0}, non_block=True)
    time.sleep(0.3)
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        future.result()
    except ExecutorTimeoutError:
        pass
    timed_out = time.monotonic() - start
    os.kill(pid, signal.SIGCONT)
    start = time.monotonic()
    ex.shutdown()
    return {"frozen_step_error_s": round(timed_out, 2),
            "shutdown_after_frozen_s": round(time.monotonic() - start, 2)}


def measure_shutdown_with_hung_step(tp: int = 1) -> dict[str, float]:
    """shutdown() while a step hangs inside a worker (a 120 s sleep, past nothing)."""
    cfg = Schedule(0, tp, "dag", False, [], []).config().replace(execute_timeout_s=300.0)
    ex = RayDistributedExecutor(cfg)
    ex.warmup()
    ex.execute_model({"x": [1.0]})
    future = ex.execute_model({"x": [1.0], "sleep": 120.0}, non_block=True)
    fetcher = threading.Thread(target=future.exception, name="faults-fetch", daemon=True)
    fetcher.start()  # a thread blocked fetching the hung step, holding the steps lock
    time.sleep(1.0)
    start = time.monotonic()
    ex.shutdown()
    took = time.monotonic() - start
    fetcher.join(SHUTDOWN_TIMEOUT_S)
    return {"shutdown_with_hung_step_s": round(took, 2),
            "hung_fetch_released": not fetcher.is_alive()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="run schedules this long (0: only the measured bounds)")
    parser.add_argument("--seed", type=int, default=None, help="run this one schedule")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--ops", type=int, default=10, help="operations per schedule")
    parser.add_argument("--no-measure", action="store_true", help="skip the measured bounds")
    parser.add_argument("--out", default="results/faults.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        records = []
        deadline = time.monotonic() + args.minutes * 60
        seed = args.seed if args.seed is not None else args.first_seed
        while args.minutes > 0 or args.seed is not None:
            record = run_schedule(Schedule.draw(seed, args.ops))
            records.append(record)
            print(f"seed {seed}: {len(record['violations'])} violation(s) "
                  f"in {record['seconds']}s {record['errors']}", flush=True)
            for v in record["violations"]:
                print("  " + v, flush=True)
            seed += 1
            if args.seed is not None or time.monotonic() > deadline:
                break
        measured = {} if args.no_measure else {**measure_death_and_restart(),
                                               **measure_shutdown_with_frozen_rank(),
                                               **measure_shutdown_with_hung_step()}
    finally:
        if own_ray:
            ray.shutdown()
    result = {
        "schedules": len(records),
        "seeds": [r["seed"] for r in records],
        "violations": [v for r in records for v in r["violations"]],
        "measured": measured,
        "records": records,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
                    "ray": ray.__version__, "platform": platform.platform()},
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({"schedules": result["schedules"],
                      "violations": len(result["violations"]), "measured": measured}))
    return result


if __name__ == "__main__":
    main()
