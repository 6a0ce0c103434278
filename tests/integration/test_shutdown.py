"""Shutdown: bounded even when Ray's compiled-graph teardown hangs, safe after a
partial start, and it leaves no actor or placement group of ours behind."""

from __future__ import annotations

import threading

import pytest
import torch

from rayexec import ExecutorConfig, RayDistributedExecutor, WorkerError
from tests.workers import BrokenInitWorker, RecordingWorker


def config(**kw):
    base = dict(pipeline_parallel_size=2, tensor_parallel_size=2, device="cpu",
                num_devices_per_worker=0.5, worker_cls=RecordingWorker)
    return ExecutorConfig(**{**base, **kw})


def shutdown_in_thread(executor, limit_s=60.0) -> bool:
    """True if shutdown returned within limit_s (a liveness check, not a timing one)."""
    thread = threading.Thread(target=executor.shutdown, daemon=True)
    thread.start()
    thread.join(limit_s)
    return not thread.is_alive()


def test_shutdown_returns_after_large_shm_payloads(local_ray, no_leaks):
    # On Ray 2.60 teardown() of a graph that moved >= 1 MB over shared memory can
    # hang forever; rayexec bounds it and kills the actors.
    executor = RayDistributedExecutor(config())
    for _ in range(3):
        out = executor.execute_model({"x": [1.0], "tensor_elems": 1 << 20})  # 4 MiB
        assert out["big"].numel() == 1 << 20
    assert shutdown_in_thread(executor), "shutdown did not return"


def test_shutdown_with_steps_in_flight(local_ray, no_leaks):
    executor = RayDistributedExecutor(config(execute_timeout_s=120))
    futures = [executor.execute_model({"x": [1.0], "sleep": 30}, non_block=True)
               for _ in range(2)]
    assert shutdown_in_thread(executor)
    for f in futures:
        assert f.done() and f.exception() is not None


def test_failure_during_start_cleans_up(local_ray, no_leaks):
    with pytest.raises(WorkerError) as info:
        RayDistributedExecutor(config(worker_cls=BrokenInitWorker))
    assert info.value.rank == 1 and info.value.method == "__init__"
    assert "cannot build the worker on rank 1" in str(info.value)


def test_finalizer_releases_an_executor_dropped_without_shutdown(local_ray, no_leaks):
    import gc

    executor = RayDistributedExecutor(config(pipeline_parallel_size=1))
    assert torch.equal(executor.execute_model({"x": [1.0]})["h"], torch.tensor([3.0]))
    finalizer = executor._finalizer
    del executor
    gc.collect()
    assert not finalizer.alive  # weakref.finalize ran: workers and group released
