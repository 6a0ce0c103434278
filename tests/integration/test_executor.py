"""The executor on a real local Ray: start-up, collective_rpc, forward steps through
the compiled DAG and plain calls, errors, closing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future

import pytest
import torch

from rayexec import (
    ExecutorClosedError,
    ExecutorConfig,
    ExecutorTimeoutError,
    RayDistributedExecutor,
    WorkerError,
)
from tests.helpers import assert_no_leaks, cluster_snapshot
from tests.workers import RecordingWorker, expected


def config(**kw):
    # Half a logical CPU per worker: fractional CPU bundles, and room for several
    # executors at once in the test cluster.
    base = dict(pipeline_parallel_size=2, tensor_parallel_size=2, device="cpu",
                num_devices_per_worker=0.5, worker_cls=RecordingWorker,
                worker_kwargs={"tag": "t"})
    return ExecutorConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def ex(local_ray):
    with RayDistributedExecutor(config()) as executor:
        yield executor


@pytest.fixture(scope="module")
def ex_rpc(local_ray):
    with RayDistributedExecutor(config(forward="rpc")) as executor:
        yield executor


def test_workers_built_with_rank_kwargs_then_phases_in_order(ex):
    kwargs = ex.collective_rpc("get_init_kwargs")
    assert [k["rank"] for k in kwargs] == [0, 1, 2, 3]
    assert [(k["pp_rank"], k["tp_rank"]) for k in kwargs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [k["local_rank"] for k in kwargs] == [0, 1, 2, 3]  # one node: position on it
    assert {k["world_size"] for k in kwargs} == {4}
    assert {k["tag"] for k in kwargs} == {"t"}
    init = {k["distributed_init_method"] for k in kwargs}
    assert len(init) == 1 and init.pop().startswith(f"tcp://{ex.layout[0].node_ip}:")
    assert ex.collective_rpc("get_phases") == [["__init__", "init_device", "load_model"]] * 4


def test_worker_environment(ex):
    envs = ex.collective_rpc("get_env", args=(["RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"],))
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"}
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
    threads = ex.collective_rpc(lambda w: __import__("torch").get_num_threads())
    assert threads == [p.cpu_threads for p in ex.layout]
    assert [e["OMP_NUM_THREADS"] for e in envs] == [str(p.cpu_threads) for p in ex.layout]
    # Workers run at the driver's priority, not Ray's default niceness of 15.
    assert ex.collective_rpc(lambda w: __import__("os").nice(0)) == [0] * 4


def test_collective_rpc_by_name_callable_and_ranks(ex):
    assert ex.collective_rpc("echo", args=("hi",)) == ["hi"] * 4
    factor = 10
    assert ex.collective_rpc(lambda w, k: w.rank * factor + k, args=(1,)) == [1, 11, 21, 31]
    assert ex.collective_rpc("echo", kwargs={"value": 5}, ranks=[3, 1]) == [5, 5]
    assert ex.collective_rpc(lambda w: w.rank, ranks=[3, 1]) == [3, 1]
    with pytest.raises(ValueError, match="ranks=\\[4\\] is invalid"):
        ex.collective_rpc("echo", args=(1,), ranks=[4])


def _digest(worker, weights, note=None, ref=None):
    """What a rank received: per name (type, dtype, shape, sum); the value behind
    ref[0]."""
    import ray as ray_

    out = {n: (type(t).__name__, str(t.dtype), tuple(t.shape),
               float(torch.as_tensor(t).double().sum())) for n, t in weights.items()}
    return out, note, None if ref is None else ray_.get(ref[0])


def test_large_tensor_arguments_arrive_whole_on_every_rank(ex):
    """Above wire.CALL_FRAME_MIN_BYTES host tensors and numpy arrays go as one
    skeleton plus buffers put in the object store once; with an ObjectRef among the
    arguments Ray's own path is kept."""
    import numpy as np
    import ray

    from rayexec import wire

    weights = {"a": torch.arange(1 << 19, dtype=torch.float32).view(512, 1024),
               "b": torch.randn(1 << 20, dtype=torch.float32).to(torch.bfloat16)[::2],
               "small": torch.ones(3, dtype=torch.int64),
               "array": np.arange(1 << 18, dtype=np.float64).reshape(512, 512)}
    parts = wire.pack_call((weights,), {"note": "x"})
    assert parts is not None and len(parts[1]) == 3 and len(parts[2]) == 1
    want = {n: (type(t).__name__, str(t.dtype), tuple(t.shape),
                float(torch.as_tensor(t).double().sum())) for n, t in weights.items()}
    for got in ex.collective_rpc(_digest, args=(weights,), kwargs={"note": "x"}):
        assert got == (want, "x", None)
    refs = [ray.put(7)]  # nested, so Ray passes the ref itself, not its value
    assert wire.pack_call((weights,), {"ref": refs}) is None
    for got in ex.collective_rpc(_digest, args=(weights,), kwargs={"ref": refs}):
        assert got == (want, None, 7)


def test_collective_rpc_non_block_returns_a_future(ex):
    future = ex.collective_rpc(lambda w: w.rank, non_block=True)
    assert isinstance(future, Future)
    assert future.result(timeout=30) == [0, 1, 2, 3]


def test_collective_rpc_timeout_names_the_ranks_that_did_not_answer(ex):
    slow = lambda w: time.sleep(3 if w.rank in (1, 3) else 0)  # noqa: E731
    with pytest.raises(ExecutorTimeoutError) as info:
        ex.collective_rpc(slow, timeout=1.0)
    assert info.value.ranks == [1, 3]
    assert "rank(s) [1, 3]" in str(info.value) and "rpc_timeout_s" in str(info.value)
    assert ex.collective_rpc("echo", args=(1,)) == [1] * 4  # queued behind, then fine


def test_unknown_method_is_an_attribute_error_before_anything_runs(ex):
    with pytest.raises(AttributeError, match="RecordingWorker has no method 'no_such_method'"):
        ex.collective_rpc("no_such_method")


def test_worker_exception_arrives_as_worker_error_and_executor_stays_usable(ex):
    with pytest.raises(WorkerError) as info:
        ex.collective_rpc("fail", args=("bad input",), ranks=[2])
    e = info.value
    assert (e.rank, e.method, e.exc_type, e.exc_message) == (2, "fail", "ValueError", "bad input")
    assert e.node_ip == ex.layout[2].node_ip
    assert "raise ValueError(message)" in e.traceback
    assert ex.collective_rpc("echo", args=(2,)) == [2] * 4


def test_execute_model_through_the_dag(ex):
    out = ex.execute_model({"x": [1.0, 2.0]})
    assert torch.equal(out["h"], expected([1.0, 2.0]))
    assert out["path"] == [0, 2]  # stage 0 tp 0 -> stage 1 tp 0


def test_rpc_forward_gives_identical_results(ex, ex_rpc):
    batches = [{"x": [float(i), -1.5 * i]} for i in range(4)] + [{"x": [3.0],
                                                                   "tensor_elems": 1000}]
    for batch in batches:
        a, b = ex.execute_model(batch), ex_rpc.execute_model(batch)
        assert torch.equal(a["h"], b["h"]) and a["path"] == b["path"]
        assert (a["big"] is None and b["big"] is None) or torch.equal(a["big"], b["big"])


@pytest.mark.parametrize("which", ["ex", "ex_rpc"])
def test_non_blocking_steps_overlap_and_resolve_in_order(which, request):
    executor = request.getfixturevalue(which)
    executor.collective_rpc(lambda w: w.timeline.clear())
    futures = [executor.execute_model({"x": [float(i)], "sleep": 0.5, "marker": i},
                                      non_block=True) for i in range(2)]
    assert all(isinstance(f, Future) for f in futures)
    # Fetch the second first: the first must already be resolved, results in order.
    second = futures[1].result()
    assert futures[0].done()
    assert [futures[0].result()["h"].item(), second["h"].item()] == [
        expected([0.0]).item(), expected([1.0]).item()]
    stage0 = dict((m, (s, e)) for m, s, e in executor.collective_rpc("get_timeline", ranks=[0])[0])
    stage1 = dict((m, (s, e)) for m, s, e in executor.collective_rpc("get_timeline", ranks=[2])[0])
    # Stage 0 started step 1 while stage 1 was still working on step 0.
    assert stage0[1][0] < stage1[0][1]
    assert stage1[0][0] < stage1[1][0]


def test_a_blocking_step_behind_unread_ones_reads_them_first_in_order(ex):
    """A blocking step is fetched without a future only when nothing is unread;
    behind non-blocking steps it reads them first, and each gets its own output."""
    futures = [ex.execute_model({"x": [float(i)]}, non_block=True) for i in range(2)]
    out = ex.execute_model({"x": [5.0]})
    assert all(f.done() for f in futures)
    assert [f.result()["h"].item() for f in futures] + [out["h"].item()] == [
        expected([0.0]).item(), expected([1.0]).item(), expected([5.0]).item()]


def test_one_megabyte_tensor_crosses_the_stage_edge_intact(ex):
    n = 262_144  # float32: 1 MiB
    out = ex.execute_model({"x": [1.0], "tensor_elems": n})
    assert out["big"].dtype == torch.float32 and out["big"].numel() == n
    assert torch.equal(out["big"], torch.arange(n, dtype=torch.float32))
    # On CPU the stage edges carry wire frames (bytes, Ray's raw path), not Ray's
    # tensor transport, which costs more per byte there.
    from ray.experimental.channel.torch_tensor_type import TorchTensorType

    assert ex.transport == "shm" and ex._parts.dag.frames
    hints = ex._parts.dag.edge_type_hints()
    assert len(hints) == 2 and not any(isinstance(h, TorchTensorType) for h in hints)


@pytest.mark.parametrize("mib", [1.5, 5])
def test_large_inputs_and_intermediates_cross_every_edge_intact(ex, mib):
    """Between 1 MiB and wire.GATHER_MIN_BYTES frames go to Ray as msgpack data (one
    copy, not Ray's six-thread copy); above it as pickle-5 buffers written from the
    tensors' memory and joined into a frame by the reader: the driver's
    input (`blob`) and the stage edge carry them, step after step; stage 1 checks the
    tensor it received (tests/workers.py) and the output arrives whole."""
    from rayexec import wire

    n = int(mib * (1 << 20)) // 4
    assert (n * 4 >= wire.GATHER_MIN_BYTES) == (mib == 5)
    blob = torch.arange(n, dtype=torch.float32)
    for _ in range(3):
        out = ex.execute_model({"x": [2.0], "tensor_elems": n, "blob": blob})
        assert torch.equal(out["big"], blob)
        assert out["h"].tolist() == [expected(2.0)]


def test_dag_step_exception_is_a_worker_error_and_the_dag_keeps_working(ex):
    with pytest.raises(WorkerError) as info:
        ex.execute_model({"x": [1.0], "fail_rank": 1})
    assert info.value.rank == 1 and info.value.method == "execute_model"
    assert "planned failure on rank 1" in str(info.value)
    with pytest.raises(WorkerError, match="rank 2"):
        ex.execute_model({"x": [1.0], "fail_rank": 2})
    assert torch.equal(ex.execute_model({"x": [2.0]})["h"], expected([2.0]))


def test_rpc_step_exception_is_a_worker_error(ex_rpc):
    with pytest.raises(WorkerError) as info:
        ex_rpc.execute_model({"x": [1.0], "fail_rank": 3})
    assert info.value.rank == 3
    assert torch.equal(ex_rpc.execute_model({"x": [2.0]})["h"], expected([2.0]))


def test_worker_cls_as_string_and_single_worker(local_ray, no_leaks):
    cfg = ExecutorConfig(worker_cls="tests.workers.RecordingWorker", device="cpu",
                         num_devices_per_worker=0.5)
    with RayDistributedExecutor(cfg) as single:
        assert single.collective_rpc("get_phases") == [["__init__", "init_device", "load_model"]]
        assert torch.equal(single.execute_model({"x": [1.0]})["h"], expected([1.0], pp=1))


def test_more_cpu_workers_than_cores_warns_once_with_the_numbers(local_ray, no_leaks, caplog,
                                                                 monkeypatch):
    """The driver's thread is pinned to one core, so two CPU workers outnumber its
    cores; two executors of that layout give one warning, not one per executor."""
    from rayexec import group

    monkeypatch.setattr(group, "_oversubscribed_warned", set())
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    try:
        with caplog.at_level(logging.WARNING, logger="rayexec.group"):
            for _ in range(2):
                RayDistributedExecutor(config(tensor_parallel_size=1)).shutdown()
    finally:
        os.sched_setaffinity(0, saved)
    warnings = [r.getMessage() for r in caplog.records if "CPU workers share" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "2 CPU workers share this node's 1 core(s)" in warnings[0]


def test_calls_after_shutdown_raise_closed_and_shutdown_is_idempotent(local_ray, no_leaks):
    executor = RayDistributedExecutor(config(pipeline_parallel_size=1))
    executor.shutdown()
    executor.shutdown()
    for call in (lambda: executor.collective_rpc("echo", args=(1,)),
                 lambda: executor.execute_model({"x": [1.0]}),
                 executor.check_health, executor.warmup):
        with pytest.raises(ExecutorClosedError, match="shut down"):
            call()


def test_worker_class_defined_in_main_with_embedded_ray(tmp_path):
    """A script's own worker class (__main__), Ray started by the executor itself."""
    script = tmp_path / "main_worker.py"
    script.write_text(textwrap.dedent("""
        import ray
        from rayexec import ExecutorConfig, RayDistributedExecutor

        class MainWorker:
            def __init__(self, rank, **kwargs):
                self.rank = rank
            def execute_model(self, batch, intermediate=None):
                return (intermediate or 0) + batch + self.rank

        if __name__ == "__main__":
            assert not ray.is_initialized()
            cfg = ExecutorConfig(pipeline_parallel_size=2, worker_cls=MainWorker)
            with RayDistributedExecutor(cfg) as ex:
                print("RESULT", ex.execute_model(10), ex.collective_rpc(lambda w: w.rank))
            # The same class named by a string: the actors get the class, not the name
            # (their own __main__ is Ray's worker script).
            named = ExecutorConfig(worker_cls="__main__.MainWorker", device="cpu")
            with RayDistributedExecutor(named) as ex:
                print("NAMED", ex.execute_model(5))
            ray.shutdown()
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # stage 0 (rank 0): 10 + 0; stage 1 (rank 1): 10 + 10 + 1
    assert "RESULT 21 [0, 1]" in done.stdout
    assert "NAMED 5" in done.stdout


def test_shared_executors_leave_nothing_behind(local_ray):
    """Runs last in this module's order of definition? No: it checks that an executor
    we start and stop here removes exactly what it added."""
    before = cluster_snapshot()
    executor = RayDistributedExecutor(config(pipeline_parallel_size=1))
    assert len(executor.workers) == 2
    executor.shutdown()
    assert_no_leaks(before)
