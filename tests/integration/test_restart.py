"""Hardening: a stuck stage is named, and dead workers are replaced (by hand or
automatically) with the same ranks, rebuilt torch.distributed groups and DAG."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from rayexec import (
    ExecutorConfig,
    ExecutorTimeoutError,
    RayDistributedExecutor,
    WorkerDiedError,
)
from rayexec.models import decoder_executor_config, generate, make_prompts
from tests.workers import StuckWorker

PROMPTS = make_prompts(3, 8, 4096, seed=1)


def test_stuck_stage_is_named_with_the_timeout_setting(local_ray, no_leaks):
    cfg = ExecutorConfig(pipeline_parallel_size=2, tensor_parallel_size=2, device="cpu",
                         num_devices_per_worker=0.5, worker_cls=StuckWorker,
                         execute_timeout_s=3.0)
    with RayDistributedExecutor(cfg) as ex:
        assert ex.execute_model({"x": [1.0]})["path"] == [0, 2]
        with pytest.raises(ExecutorTimeoutError) as info:
            ex.execute_model({"x": [1.0], "stuck_rank": 3})
        e = info.value
        # Rank 3 (stage 1) never finished; rank 2 finished (it does not wait for 3).
        assert e.ranks == [3] and e.stages == [1]
        assert "rank 3 has been in step 2" in str(e)
        assert "raise ExecutorConfig.execute_timeout_s" in str(e) and e.timeout_s == 3.0


def decoder_config(**kw):
    return decoder_executor_config(pp=2, tp=2, seed=3, device="cpu", num_devices_per_worker=0.5,
                                   **kw)


def actor_ids(ex):
    return [w._actor_id.hex() for w in ex.workers]


def test_idle_death_replaces_only_the_dead_rank(local_ray, no_leaks):
    with RayDistributedExecutor(decoder_config()) as ex:
        before = generate(ex, PROMPTS, 4).token_ids
        old = actor_ids(ex)
        died = threading.Event()
        ex.register_failure_callback(lambda err: died.set())
        victim = 3  # stage 1, tp 1: in a gloo TP group with rank 2
        ray.kill(ex.workers[victim])
        assert died.wait(30)
        with pytest.raises(WorkerDiedError, match="rank 3"):
            ex.check_health()
        # Nothing was in flight: the survivors are reset and reused.
        assert ex.restart_failed_workers() == [victim]
        new = actor_ids(ex)
        assert new[victim] != old[victim]
        assert [n for r, n in enumerate(new) if r != victim] == \
            [o for r, o in enumerate(old) if r != victim]
        assert [p.rank for p in ex.layout] == [0, 1, 2, 3]
        ex.check_health()
        assert generate(ex, PROMPTS, 4).token_ids == before  # torch.distributed rebuilt
        assert ex.restart_failed_workers() == []  # nothing dead: nothing replaced


def test_death_mid_run_is_replaced_and_serves_the_same_tokens(local_ray, no_leaks):
    with RayDistributedExecutor(decoder_config(execute_timeout_s=120)) as ex:
        before = generate(ex, PROMPTS, 4).token_ids
        old = actor_ids(ex)
        victim = 3
        ray.kill(ex.workers[victim])
        with pytest.raises(WorkerDiedError) as info:
            generate(ex, PROMPTS, 4)  # steps run into the dead rank
        assert victim in info.value.ranks
        replaced = ex.restart_failed_workers()
        # Survivors caught inside a step with the dead rank are replaced as well.
        assert victim in replaced
        new = actor_ids(ex)
        for rank in range(4):
            assert (new[rank] != old[rank]) == (rank in replaced)
        ex.check_health()
        assert generate(ex, PROMPTS, 4).token_ids == before


def test_a_death_seen_only_as_a_closed_channel_still_names_the_rank(local_ray, no_leaks):
    with RayDistributedExecutor(decoder_config(execute_timeout_s=60)) as ex:
        generate(ex, PROMPTS, 2)
        # Without the death monitor, the step's only news is Ray's "Channel closed"
        # once Ray tears the graph down: it names no actor.
        ex._parts.monitor.stop()
        ray.kill(ex.workers[3])
        time.sleep(3)  # Ray's own graph monitor tears the graph down meanwhile
        with pytest.raises(WorkerDiedError) as info:
            generate(ex, PROMPTS, 2)
        assert info.value.ranks == [3]
        assert "rank 3" in str(info.value)


def test_restart_on_failure_replaces_automatically(local_ray, no_leaks):
    with RayDistributedExecutor(decoder_config(restart_on_failure=True)) as ex:
        before = generate(ex, PROMPTS, 3).token_ids
        died = threading.Event()
        ex.register_failure_callback(lambda err: died.set())
        ray.kill(ex.workers[1])
        assert died.wait(30)
        # Calls wait for the automatic restart, then run on the new workers.
        assert generate(ex, PROMPTS, 3).token_ids == before
        ex.check_health()
