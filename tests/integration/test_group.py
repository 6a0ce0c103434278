"""WorkerGroup on its own (the SPMD path): from_config, from_placement_group,
visibility management, and the live-resource check before placement."""

from __future__ import annotations

import pytest
import ray
from ray.util.placement_group import placement_group

from rayexec import PlacementError
from rayexec.group import WorkerGroup
from rayexec.resources import ResourceConfig
from tests.helpers import assert_no_leaks, cluster_snapshot, live_placement_groups
from tests.workers import IdentityWorker, RecordingWorker


def test_from_config_runs_methods_in_rank_order(local_ray, no_leaks):
    group = WorkerGroup.from_config(RecordingWorker, {"tag": "spmd"},
                                    ResourceConfig(num_workers=3, cpus_per_worker=0.5))
    try:
        kwargs = group.run("get_init_kwargs")
        assert [k["rank"] for k in kwargs] == [0, 1, 2] and {k["tag"] for k in kwargs} == {"spmd"}
        assert {k["world_size"] for k in kwargs} == {3}
        refs = group.run_async("echo", args=("x",))
        assert ray.get(refs) == ["x"] * 3
        env = group.run("get_env", args=(["RANK", "WORLD_SIZE", "MASTER_ADDR"],))
        assert [e["RANK"] for e in env] == ["0", "1", "2"]
    finally:
        group.shutdown()


def test_from_placement_group_keeps_the_group(local_ray):
    pg = placement_group([{"CPU": 0.5}] * 3)
    ray.get(pg.ready(), timeout=30)
    before = cluster_snapshot()
    group = WorkerGroup.from_placement_group(RecordingWorker, None, pg, bundle_indices=[2, 0],
                                             device="cpu", num_devices_per_worker=0.5)
    assert len(group.actors) == 2
    group.shutdown()
    assert_no_leaks(before)
    assert pg.id.hex() in live_placement_groups()
    ray.util.remove_placement_group(pg)


def test_request_beyond_the_cluster_fails_before_any_group(local_ray, no_leaks):
    with pytest.raises(PlacementError, match="CPU needed 400 vs 8 in all"):
        WorkerGroup.from_config(RecordingWorker, None,
                                ResourceConfig(num_workers=4, cpus_per_worker=100))


@pytest.fixture
def gpu_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             logging_level="WARNING")
    yield
    ray.shutdown()


def test_visibility_set_per_node_or_left_to_the_worker(gpu_ray):
    gpus = ResourceConfig(num_workers=2, accelerator="GPU", cpus_per_worker=0)
    group = WorkerGroup.from_config(IdentityWorker, None, gpus)
    try:
        assert {r["CUDA_VISIBLE_DEVICES"] for r in group.run("report")} == {"0,1"}
    finally:
        group.shutdown()
    group = WorkerGroup.from_config(IdentityWorker, None, gpus, manage_visibility=False)
    try:
        # rayexec set Ray's NOSET variable and no list of its own: Ray did not narrow
        # the variable either, so the worker decides.
        reports = group.run("report")
        assert {r["CUDA_VISIBLE_DEVICES"] for r in reports} == {None}
        assert sorted(r["ray_gpu_ids"][0] for r in reports) == ["0", "1"]
    finally:
        group.shutdown()
    assert_no_leaks()
