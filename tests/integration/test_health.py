"""Worker death: check_health, the background monitor, in-flight futures, callbacks."""

from __future__ import annotations

import threading

import pytest
import ray

from rayexec import (
    ExecutorConfig,
    RayDistributedExecutor,
    WorkerDiedError,
)
from tests.workers import RecordingWorker


def config(**kw):
    base = dict(pipeline_parallel_size=2, tensor_parallel_size=1, device="cpu",
                num_devices_per_worker=0.5, worker_cls=RecordingWorker,
                execute_timeout_s=120.0)
    return ExecutorConfig(**{**base, **kw})


def test_check_health_passes_on_a_healthy_executor(local_ray, no_leaks):
    with RayDistributedExecutor(config()) as ex:
        ex.check_health()  # raises on any problem
        assert ex.collective_rpc(lambda w: w.rank) == [0, 1]


@pytest.mark.parametrize("forward", ["dag", "rpc"])
def test_killed_worker_fails_in_flight_steps_calls_callbacks_and_health(
        local_ray, no_leaks, forward):
    with RayDistributedExecutor(config(forward=forward)) as ex:
        ex.warmup()
        died = threading.Event()
        seen: list[WorkerDiedError] = []
        ex.register_failure_callback(lambda err: (seen.append(err), died.set()))

        # Two long steps in flight; nobody is waiting on them when the worker dies.
        futures = [ex.execute_model({"x": [1.0], "sleep": 60}, non_block=True)
                   for _ in range(2)]
        ray.kill(ex.workers[1])

        # The monitor notices by itself (no call from us), fails both futures and
        # runs the callback -- long before the 120 s step timeout.
        assert died.wait(timeout=30), "failure callback not called"
        assert all(f.done() for f in futures)
        for f in futures:
            with pytest.raises(WorkerDiedError) as info:
                f.result()
            assert info.value.ranks == [1]
        assert seen[0].ranks == [1] and seen[0].nodes == [ex.layout[1].node_ip]

        with pytest.raises(WorkerDiedError) as info:
            ex.check_health()
        assert info.value.ranks == [1]
        assert f"rank 1 on node {ex.layout[1].node_ip}" in str(info.value)

        with pytest.raises(WorkerDiedError, match="rank 1"):
            ex.execute_model({"x": [1.0]})

        late: list[WorkerDiedError] = []
        ex.register_failure_callback(late.append)  # registered after the death
        assert late and late[0].ranks == [1]


def test_death_while_the_caller_waits_on_the_step(local_ray, no_leaks):
    with RayDistributedExecutor(config()) as ex:
        ex.warmup()
        timer = threading.Timer(1.0, lambda: ray.kill(ex.workers[0]))
        timer.start()
        with pytest.raises(WorkerDiedError) as info:
            ex.execute_model({"x": [1.0], "sleep": 60})
        timer.join()
        assert info.value.ranks == [0]
