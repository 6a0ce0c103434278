"""The bad-input catalogue: each row is a mistake a user can make, the exception it
must raise (or the warning it must log) and words its message must contain.
tests/integration/test_bad_inputs.py runs every row (and checks nothing is left
behind); `python -m tests.bad_inputs` runs them all and prints the table of
docs/failures.md with the messages actually produced (`--write` puts it there).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group

from rayexec import (
    ExecutorClosedError,
    ExecutorConfig,
    ExecutorTimeoutError,
    PlacementError,
    RayDistributedExecutor,
    WorkerError,
)
from tests.workers import BrokenInitWorker, RankOnlyWorker, RecordingWorker

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "failures.md"
TABLE_START = "<!-- bad-inputs table: python -m tests.bad_inputs --write -->"
TABLE_END = "<!-- end of bad-inputs table -->"


class LoggedWarning(Exception):
    """A row whose mistake is worth a warning, not an error: the warning's text,
    raised by the row so that the catalogue checks it like an exception."""


def config(**kw: Any) -> ExecutorConfig:
    base = dict(device="cpu", num_devices_per_worker=0.5, worker_cls=RecordingWorker,
                pg_ready_timeout_s=3.0)
    return ExecutorConfig(**{**base, **kw})


class Context:
    """Gives rows a live executor to misuse (shared, started on first use)."""

    def __init__(self) -> None:
        self._executor: RayDistributedExecutor | None = None

    def executor(self) -> RayDistributedExecutor:
        if self._executor is None:
            self._executor = RayDistributedExecutor(config(pipeline_parallel_size=2))
            # Its compiled graph (and the graph's proxy actor and idle timer) exists
            # from here on, before any row's leak-check snapshot.
            self._executor.warmup()
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


@dataclass(frozen=True)
class Row:
    name: str
    mistake: str
    run: Callable[[Context], Any]
    error: type[BaseException]
    words: tuple[str, ...]
    needs_ray: bool = True


def _after_shutdown(ctx: Context) -> None:
    ex = RayDistributedExecutor(config())
    ex.shutdown()
    ex.collective_rpc("echo", args=(1,))


def _never_ready_group(ctx: Context) -> None:
    group = placement_group([{"GPU": 1.0}, {"GPU": 1.0}])  # no GPUs: pending forever
    try:
        RayDistributedExecutor(config(pipeline_parallel_size=2, device="cuda",
                                      num_devices_per_worker=1, placement_group=group,
                                      pg_ready_timeout_s=2.0))
    finally:
        ray.util.remove_placement_group(group)


def _bundle_out_of_range(ctx: Context) -> None:
    group = placement_group([{"CPU": 0.5}, {"CPU": 0.5}])
    ray.get(group.ready(), timeout=30)
    try:
        RayDistributedExecutor(config(pipeline_parallel_size=2, placement_group=group,
                                      bundle_indices=(0, 5)))
    finally:
        ray.util.remove_placement_group(group)


def _nccl_without_cupy(ctx: Context) -> None:
    # The workers are asked (tests/integration/test_devices.py does it end to end on
    # fake GPUs); here, the decision on what a worker without cupy reported.
    from rayexec.dag import resolve_transport

    resolve_transport("nccl", whole_gpus=True,
                      no_cupy={1: "ModuleNotFoundError: No module named 'cupy'"})


def _unreachable_address(ctx: Context) -> None:
    # ray.init must not be running in the process: use a fresh interpreter.
    code = ("from rayexec import ExecutorConfig, RayDistributedExecutor\n"
            "RayDistributedExecutor(ExecutorConfig(worker_cls='tests.workers.RecordingWorker',"
            " device='cpu'))\n")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if last.startswith("rayexec.errors.PlacementError: "):
        raise PlacementError(last.split(": ", 1)[1])
    raise AssertionError(f"expected a PlacementError, got: {done.stderr[-2000:]}")


def _bad_env_value(ctx: Context) -> None:
    os.environ["RAYEXEC_BUNDLE_INDICES"] = "0,x"
    try:
        ExecutorConfig.from_env(worker_cls=RecordingWorker)
    finally:
        del os.environ["RAYEXEC_BUNDLE_INDICES"]


def _more_workers_than_cores(ctx: Context) -> None:
    """The driver's thread pinned to one core: two CPU workers outnumber it."""
    from rayexec import group

    group._oversubscribed_warned.clear()  # warned once per process and count
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("rayexec.group").addHandler(handler)
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    try:
        RayDistributedExecutor(config(pipeline_parallel_size=2)).shutdown()
    finally:
        os.sched_setaffinity(0, saved)
        logging.getLogger("rayexec.group").removeHandler(handler)
    raise LoggedWarning(next((m for m in seen if "CPU workers share" in m), "NO WARNING"))


ROWS: list[Row] = [
    Row("pp-zero", "pipeline_parallel_size=0",
        lambda ctx: config(pipeline_parallel_size=0), ValueError,
        ("ExecutorConfig.pipeline_parallel_size=0", "integer >= 1"), needs_ray=False),
    Row("tp-float", "tensor_parallel_size=1.5",
        lambda ctx: config(tensor_parallel_size=1.5), ValueError,
        ("tensor_parallel_size=1.5", "integer >= 1"), needs_ray=False),
    Row("too-many-devices", "world size above what the cluster holds (2 x 6 CPUs on 8)",
        lambda ctx: RayDistributedExecutor(config(tensor_parallel_size=2,
                                                  num_devices_per_worker=6)),
        PlacementError, ("CPU needed 12 vs 8 in all", "Fix:")),
    Row("too-many-gpus", "device='cuda' on a cluster without GPUs",
        lambda ctx: RayDistributedExecutor(config(device="cuda", num_devices_per_worker=1)),
        PlacementError, ("GPU needed 1 vs 0 in all",)),
    Row("bundle-dup", "bundle_indices=(0, 0)",
        lambda ctx: config(pipeline_parallel_size=2, bundle_indices=(0, 0)), ValueError,
        ("bundle_indices", "[0] appear more than once"), needs_ray=False),
    Row("bundle-len", "bundle_indices shorter than world size",
        lambda ctx: config(pipeline_parallel_size=2, bundle_indices=(0,)), ValueError,
        ("needs exactly world_size=2",), needs_ray=False),
    Row("bundle-range", "bundle_indices=(0, 5) on a 2-bundle group",
        _bundle_out_of_range, ValueError, ("[5] are out of range", "2 bundles")),
    Row("bad-env", "RAYEXEC_BUNDLE_INDICES='0,x'", _bad_env_value, ValueError,
        ("RAYEXEC_BUNDLE_INDICES='0,x' is invalid", "comma-separated"), needs_ray=False),
    Row("channel", "channel='tcp'", lambda ctx: config(channel="tcp"), ValueError,
        ("ExecutorConfig.channel='tcp'", "['auto', 'nccl', 'shm', 'gloo']"), needs_ray=False),
    Row("nccl-cpu", "channel='nccl' with device='cpu'",
        lambda ctx: config(channel="nccl"), ValueError,
        ("nccl needs GPU workers", "channel='shm'"), needs_ray=False),
    Row("nccl-cupy", "channel='nccl' on GPUs without cupy", _nccl_without_cupy, ImportError,
        ("needs cupy on every worker", "rank(s) [1]", "pip install cupy-cuda"),
        needs_ray=False),
    Row("nccl-visibility", "channel='nccl' with manage_visibility=False",
        lambda ctx: config(device="cuda", channel="nccl", manage_visibility=False), ValueError,
        ("needs manage_visibility=True", "visibility variable"), needs_ray=False),
    Row("overlap-cpu", "overlap_comm=True on CPU", lambda ctx: config(overlap_comm=True),
        ValueError, ("overlap_comm", "GPU workers"), needs_ray=False),
    Row("unknown-key", "an unknown config key",
        lambda ctx: ExecutorConfig.from_dict({"worker_cls": RecordingWorker, "tp_size": 2}),
        ValueError, ("unknown ExecutorConfig field(s): 'tp_size'",), needs_ray=False),
    Row("reserved-env", "env_vars={'RANK': '0'}",
        lambda ctx: config(env_vars={"RANK": "0"}), ValueError,
        ("['RANK'] are set per worker",), needs_ray=False),
    Row("reserved-kwarg", "worker_kwargs={'rank': 0}",
        lambda ctx: config(worker_kwargs={"rank": 0}), ValueError,
        ("keys ['rank'] are set by rayexec",), needs_ray=False),
    Row("no-import", "worker_cls='no_such_pkg.Worker'",
        lambda ctx: RayDistributedExecutor(config(worker_cls="no_such_pkg.Worker")), ValueError,
        ("cannot be imported", "No module named 'no_such_pkg'")),
    Row("misspelt-cls", "worker_cls='tests.workers.RecordingWorkr' (misspelt)",
        lambda ctx: RayDistributedExecutor(config(worker_cls="tests.workers.RecordingWorkr")),
        ValueError, ("has no class 'RecordingWorkr'", "did you mean 'RecordingWorker'?"),
        needs_ray=False),
    Row("bad-signature", "a worker class whose __init__ takes only rank",
        lambda ctx: RayDistributedExecutor(config(worker_cls=RankOnlyWorker)), TypeError,
        ("RankOnlyWorker(rank) cannot be built", "every worker receives rank, local_rank, "
         "world_size, pp_rank, tp_rank and distributed_init_method")),
    Row("init-raises", "the worker's __init__ raises (rank 1)",
        lambda ctx: RayDistributedExecutor(config(pipeline_parallel_size=2,
                                                  worker_cls=BrokenInitWorker)),
        WorkerError, ("raised in __init__() on rank 1", "cannot build the worker on rank 1")),
    Row("bad-arg", "an unpicklable collective_rpc argument (a lock)",
        lambda ctx: ctx.executor().collective_rpc("echo", args=(threading.Lock(),)),
        TypeError, ("collective_rpc('echo')", "cannot be pickled")),
    Row("no-method", "collective_rpc of a method the worker lacks",
        lambda ctx: ctx.executor().collective_rpc("no_such_method"), AttributeError,
        ("has no method 'no_such_method'",)),
    Row("bad-batch", "an unpicklable execute_model batch",
        lambda ctx: ctx.executor().execute_model({"x": [1.0], "lock": threading.Lock()}),
        TypeError, ("execute_model(batch)", "cannot be pickled")),
    Row("bad-ranks", "collective_rpc(ranks=[7]) on 2 ranks",
        lambda ctx: ctx.executor().collective_rpc("echo", args=(1,), ranks=[7]), ValueError,
        ("ranks=[7] is invalid", "0..1")),
    Row("rpc-timeout", "collective_rpc that outlives its timeout",
        lambda ctx: ctx.executor().collective_rpc("sleep", args=(2.0,), timeout=0.5),
        ExecutorTimeoutError, ("did not finish within 0.5s", "rank(s) [0, 1]", "rpc_timeout_s")),
    Row("closed", "any call after shutdown()", _after_shutdown, ExecutorClosedError,
        ("was shut down",)),
    Row("unreachable", "RAY_ADDRESS=127.0.0.1:1 (nothing listening)", _unreachable_address,
        PlacementError, ("cannot reach the Ray cluster", "unset RAY_ADDRESS")),
    Row("never-ready", "a given placement group that can never be satisfied",
        _never_ready_group, PlacementError,
        ("not ready after 2s (pg_ready_timeout_s)", "0 GPU free")),
    Row("strict-spread", "STRICT_SPREAD of 2 bundles on a 1-node cluster",
        lambda ctx: RayDistributedExecutor(config(pipeline_parallel_size=2,
                                                  placement_strategy="STRICT_SPREAD")),
        PlacementError, ("STRICT_SPREAD puts every bundle on a different node",)),
    Row("host-ip", "host_ip that is not this machine's (10.255.255.1)",
        lambda ctx: RayDistributedExecutor(config(host_ip="10.255.255.1")), PlacementError,
        ("host_ip='10.255.255.1' is not an address of the driver's machine",)),
]


def _duplicate_node_ips(ctx: Context) -> None:
    """Needs its own 2-node cluster: leaves the local Ray for it and comes back."""
    from tests.helpers import assert_no_leaks
    from tests.integration.test_multinode import start_cluster
    from tests.workers import IdentityWorker

    ctx.close()
    ray.shutdown()
    cluster = start_cluster([("127.0.0.5", 1), ("127.0.0.5", 1)])
    try:
        RayDistributedExecutor(ExecutorConfig(
            tensor_parallel_size=2, device="cuda", forward="rpc",
            placement_strategy="STRICT_SPREAD", worker_cls=IdentityWorker))
    except PlacementError:
        assert_no_leaks()  # checked in the cluster the row ran in
        raise
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR")


ROWS.append(Row("cpu-oversubscribed", "more CPU workers than the driver's cores (2 on 1)",
                _more_workers_than_cores, LoggedWarning,
                ("2 CPU workers share this node's 1 core(s)", "at most 1 workers")))
ROWS.append(Row("duplicate-ip", "two Ray nodes reporting the same IP", _duplicate_node_ips,
                PlacementError, ("2 nodes report the same IP 127.0.0.5", "RAYEXEC_HOST_IP")))


def run_row(row: Row, ctx: Context) -> BaseException | None:
    try:
        row.run(ctx)
    except BaseException as e:  # the point of the row
        return e
    return None


def stable(text: str) -> str:
    """A message as it reads on any machine: paths relative to the repository, and
    no object addresses or Ray node ids (they change from run to run)."""
    text = text.replace(f"{ROOT}/", "")
    text = re.sub(r"\b0x[0-9a-f]{6,}\b", "0x…", text)
    return re.sub(r"'[0-9a-f]{56}'", "'…'", text)


def markdown_table() -> str:
    """Runs every row on a local Ray and renders the table of docs/failures.md."""
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR")
    ctx = Context()
    lines = ["| # | bad input | exception | message (as produced) |", "|---|---|---|---|"]
    try:
        for i, row in enumerate(ROWS, 1):
            error = run_row(row, ctx)
            text = " ".join(str(error).split()) if error else "NO ERROR"
            text = stable(text)
            if len(text) > 300:
                text = text[:297] + "..."
            kind = ("warning (logged)" if isinstance(error, LoggedWarning)
                    else f"`{type(error).__name__}`")
            lines.append(f"| {i} | {row.mistake} | {kind} | {text.replace('|', '/')} |")
    finally:
        ctx.close()
        ray.shutdown()
    return "\n".join(lines)


def write_table(table: str, doc: Path = DOC) -> None:
    """Replace the table between the markers of docs/failures.md."""
    text = doc.read_text()
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    doc.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")


if __name__ == "__main__":
    table = markdown_table()
    if "--write" in sys.argv[1:]:
        write_table(table)
        print(f"wrote {DOC.relative_to(ROOT)}")
    else:
        print(table)
