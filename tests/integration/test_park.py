"""Idle parking (park.py): after idle_park_s with no step, compiled-graph workers
sleep instead of polling Ray's channels, and the next step wakes them with the same
results as ever; shutdown, death and restart work while parked."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from benchmarks.idle_park import cpu_seconds
from rayexec import ExecutorConfig, RayDistributedExecutor, WorkerDiedError
from tests.helpers import wait_until
from tests.workers import RecordingWorker, expected

IDLE_S = 0.3


def config(**kw):
    base = dict(pipeline_parallel_size=2, tensor_parallel_size=2, device="cpu",
                num_devices_per_worker=0.5, worker_cls=RecordingWorker, idle_park_s=IDLE_S)
    return ExecutorConfig(**{**base, **kw})


def parked(ex) -> list[bool]:
    return ray.get([w.is_parked.remote() for w in ex.workers])


def cores_used(ex, seconds: float) -> list[float]:
    """Cores each worker's process (all on this machine) uses over `seconds`."""
    pids = ex.collective_rpc(lambda w: __import__("os").getpid())
    before = cpu_seconds(pids)
    time.sleep(seconds)
    return [(b - a) / seconds for a, b in zip(before, cpu_seconds(pids))]


@pytest.mark.parametrize("pp,tp", [(2, 2), (1, 2), (4, 1)])
def test_idle_workers_park_stop_polling_and_wake_with_the_same_results(local_ray, no_leaks,
                                                                         pp, tp):
    with RayDistributedExecutor(config(pipeline_parallel_size=pp,
                                       tensor_parallel_size=tp)) as ex:
        assert ex.execute_model({"x": [1.0]})["h"].item() == expected([1.0], pp).item()
        # Every stage ends up blocked in a park step, the last stage on the first
        # park step and stage 0 on the last (none left polling a channel).
        assert wait_until(lambda: all(parked(ex)), timeout_s=10), parked(ex)
        # Polling Ray's channel costs a whole core per worker; a parked one sleeps.
        assert max(cores_used(ex, 1.0)) < 0.2
        # The next steps (one blocking, then several in flight) wake them; results
        # are as before and in order.
        assert ex.execute_model({"x": [2.0]})["h"].item() == expected([2.0], pp).item()
        assert not any(parked(ex))
        assert wait_until(lambda: all(parked(ex)), timeout_s=10)
        futures = [ex.execute_model({"x": [float(i)]}, non_block=True) for i in range(pp)]
        assert [f.result()["h"].item() for f in futures] == [
            expected([float(i)], pp).item() for i in range(pp)]


def test_steps_closer_together_than_idle_park_s_never_park(local_ray, no_leaks):
    with RayDistributedExecutor(config(idle_park_s=2.0)) as ex:
        seen = []
        for i in range(8):
            ex.execute_model({"x": [float(i)]})
            seen.append(any(parked(ex)))
            time.sleep(0.5)
        assert not any(seen)


def test_no_parking_when_idle_park_s_is_none(local_ray, no_leaks):
    with RayDistributedExecutor(config(idle_park_s=None)) as ex:
        ex.execute_model({"x": [1.0]})
        time.sleep(4 * IDLE_S)
        assert not any(parked(ex))
        assert ex.execute_model({"x": [2.0]})["h"].item() == expected([2.0]).item()


def test_shutdown_while_parked_tears_the_graph_down_cleanly(local_ray, no_leaks, caplog):
    ex = RayDistributedExecutor(config())
    ex.execute_model({"x": [1.0]})
    assert wait_until(lambda: all(parked(ex)), timeout_s=10)
    ex.shutdown()
    # A parked worker left asleep would hold Ray's teardown until rayexec's bound
    # ran out and it killed the workers; woken first, the teardown just finishes.
    assert "teardown still running" not in caplog.text


def test_death_while_parked_is_named_and_restart_replaces_only_the_dead_rank(local_ray,
                                                                           no_leaks):
    with RayDistributedExecutor(config()) as ex:
        ex.execute_model({"x": [1.0]})
        assert wait_until(lambda: all(parked(ex)), timeout_s=10)
        died = threading.Event()
        ex.register_failure_callback(lambda err: died.set())
        ray.kill(ex.workers[1])  # stage 0, tp 1: parked on the last park step
        assert died.wait(30)
        with pytest.raises(WorkerDiedError, match="rank 1"):
            ex.execute_model({"x": [2.0]})
        # Survivors were woken before the graph's teardown, so none of them is
        # caught mid-step and replaced with the dead one.
        assert ex.restart_failed_workers() == [1]
        assert ex.execute_model({"x": [3.0]})["h"].item() == expected([3.0]).item()


def test_parking_resumes_after_a_death_and_restart(local_ray, no_leaks):
    with RayDistributedExecutor(config()) as ex:
        ex.execute_model({"x": [1.0]})
        died = threading.Event()
        ex.register_failure_callback(lambda err: died.set())
        ray.kill(ex.workers[3])  # before the workers park
        assert died.wait(30)
        time.sleep(4 * IDLE_S)  # idle with a dead rank: nothing to park
        assert ex.restart_failed_workers() == [3]
        assert ex.execute_model({"x": [2.0]})["h"].item() == expected([2.0]).item()
        # The rebuilt graph's workers park too.
        assert wait_until(lambda: all(parked(ex)), timeout_s=10), parked(ex)
        assert ex.execute_model({"x": [3.0]})["h"].item() == expected([3.0]).item()


def test_a_finished_step_nobody_reads_does_not_keep_the_workers_polling(local_ray, no_leaks):
    # vLLM's in-process engine (LLM with VLLM_ENABLE_V1_MULTIPROCESSING=0) with PP
    # ends a generate with its last, empty batch still in its queue, unread until
    # the next request: idle workers must park all the same.
    with RayDistributedExecutor(config()) as ex:
        unread = [ex.execute_model({"x": [float(i)]}, non_block=True) for i in range(2)]
        assert wait_until(lambda: all(parked(ex)), timeout_s=10), parked(ex)
        assert max(cores_used(ex, 1.0)) < 0.2
        # The steps read while idle keep their results, in order, for their caller.
        assert [f.result()["h"].item() for f in unread] == [
            expected([0.0]).item(), expected([1.0]).item()]
        assert ex.execute_model({"x": [2.0]})["h"].item() == expected([2.0]).item()
