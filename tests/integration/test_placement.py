"""Placement on a real local Ray: given, current and named groups, bundle_indices,
and the PlacementError for requests that can never be met (nothing left reserved)."""

from __future__ import annotations

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table

from rayexec import ExecutorConfig, PlacementError, RayDistributedExecutor
from tests.helpers import assert_no_leaks, cluster_snapshot, live_placement_groups
from tests.workers import RecordingWorker

SLOTS = 4


@pytest.fixture(scope="module")
def slot_ray(local_ray):
    yield local_ray


def slot_group():
    group = placement_group([{"CPU": 1.0} for i in range(SLOTS)])
    ray.get(group.ready(), timeout=30)
    return group


def used_bundles(group) -> list[int]:
    """Bundles whose CPU a worker took, from Ray's own per-bundle bookkeeping."""
    free = ray.available_resources()
    return [i for i in range(SLOTS) if free.get(f"CPU_group_{i}_{group.id.hex()}", 0) < 1.0]


def config(**kw):
    base = dict(device="cpu", num_devices_per_worker=0.5, worker_cls=RecordingWorker,
                pg_ready_timeout_s=3.0)
    return ExecutorConfig(**{**base, **kw})


def test_given_group_and_bundle_indices_are_used_and_the_group_is_kept(slot_ray):
    group = slot_group()
    before = cluster_snapshot()
    cfg = config(pipeline_parallel_size=2, placement_group=group, bundle_indices=(3, 1))
    with RayDistributedExecutor(cfg) as ex:
        assert ex.placement_group.id == group.id
        assert used_bundles(group) == [1, 3]
    assert group.id.hex() in live_placement_groups()  # given, so not removed
    assert_no_leaks(before)
    ray.util.remove_placement_group(group)


def test_bundle_indices_out_of_range_fail_before_any_actor(slot_ray):
    group = slot_group()
    before = cluster_snapshot()
    cfg = config(pipeline_parallel_size=2, placement_group=group, bundle_indices=(1, 4))
    with pytest.raises(ValueError, match=r"\[4\] are out of range .* 4 bundles"):
        RayDistributedExecutor(cfg)
    assert_no_leaks(before)
    assert group.id.hex() in live_placement_groups()
    ray.util.remove_placement_group(group)


def test_bundle_too_small_for_a_worker(slot_ray):
    group = placement_group([{"CPU": 0.25}, {"CPU": 0.25}])
    ray.get(group.ready(), timeout=30)
    before = cluster_snapshot()
    with pytest.raises(PlacementError, match=r"bundle 0 .* needs \{'CPU': 0.5\}"):
        RayDistributedExecutor(config(pipeline_parallel_size=2, placement_group=group))
    assert_no_leaks(before)
    ray.util.remove_placement_group(group)


def test_env_var_bundle_indices(slot_ray, monkeypatch):
    group = slot_group()
    monkeypatch.setenv("RAYEXEC_BUNDLE_INDICES", "2,0")
    cfg = ExecutorConfig.from_env(device="cpu", num_devices_per_worker=0.5,
                                  worker_cls=RecordingWorker, pipeline_parallel_size=2,
                                  placement_group=group)
    with RayDistributedExecutor(cfg):
        assert used_bundles(group) == [0, 2]
    ray.util.remove_placement_group(group)


def test_created_group_is_named_reused_and_removed(slot_ray):
    before = cluster_snapshot()
    cfg = config(pipeline_parallel_size=2, placement_group_name="rayexec-test-pg")
    with RayDistributedExecutor(cfg) as ex:
        group = ex.placement_group
        assert ray.util.get_placement_group("rayexec-test-pg").id == group.id
        table = placement_group_table(group)
        assert table["strategy"] == "PACK" and len(table["bundles"]) == 2
        # The driver's node has CPUs, so bundle 0 is pinned to it.
        assert any(k.startswith("node:") for k in table["bundles"][0])
    assert_no_leaks(before)


def test_executor_inside_a_placement_group_uses_it(slot_ray):
    group = slot_group()

    @ray.remote(num_cpus=0)
    def driver_inside():
        from rayexec import ExecutorConfig, RayDistributedExecutor
        from tests.workers import RecordingWorker

        cfg = ExecutorConfig(device="cpu", num_devices_per_worker=0.5,
                             worker_cls=RecordingWorker, pipeline_parallel_size=2)
        with RayDistributedExecutor(cfg) as ex:
            used = ex.placement_group.id.hex()
            free = ray.available_resources()
            bundles = [i for i in range(4) if free.get(f"CPU_group_{i}_{used}", 0) < 1.0]
        return used, bundles

    strategy = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy(
        group, placement_group_capture_child_tasks=True)
    used, bundles = ray.get(driver_inside.options(scheduling_strategy=strategy).remote(),
                            timeout=120)
    assert used == group.id.hex()
    assert bundles == [0, 1]
    assert group.id.hex() in live_placement_groups()  # not created there, so kept
    ray.util.remove_placement_group(group)


def test_more_gpus_than_the_cluster_has(slot_ray):
    before = cluster_snapshot()
    cfg = config(device="cuda", pipeline_parallel_size=2, tensor_parallel_size=2,
                 num_devices_per_worker=1)
    with pytest.raises(PlacementError) as info:
        RayDistributedExecutor(cfg)
    msg = str(info.value)
    # Checked against what the nodes hold before any group is created.
    assert "Asked for 4 bundles of {GPU=1} with PACK" in msg
    assert "GPU needed 4 vs 0 in all" in msg
    assert "the cluster has 0 GPU in all, the layout needs 4" in msg
    assert_no_leaks(before)


def test_given_group_that_never_becomes_ready_times_out_and_is_kept(slot_ray):
    group = placement_group([{"GPU": 1.0}, {"GPU": 1.0}])  # pending forever: no GPUs
    with pytest.raises(PlacementError) as info:
        RayDistributedExecutor(config(pipeline_parallel_size=2, device="cuda",
                                      num_devices_per_worker=1, placement_group=group,
                                      pg_ready_timeout_s=2.0))
    msg = str(info.value)
    assert "not ready after 2s (pg_ready_timeout_s)" in msg
    assert "Asked for 2 bundles of {GPU=1} with PACK" in msg and "0 GPU free" in msg
    assert group.id.hex() in live_placement_groups()  # the caller's group stays
    ray.util.remove_placement_group(group)


def test_strict_spread_over_too_few_nodes(slot_ray):
    before = cluster_snapshot()
    cfg = config(pipeline_parallel_size=2, placement_strategy="STRICT_SPREAD")
    with pytest.raises(PlacementError, match="STRICT_SPREAD puts every bundle on a different "
                                             "node, but only 1 node"):
        RayDistributedExecutor(cfg)
    assert_no_leaks(before)
