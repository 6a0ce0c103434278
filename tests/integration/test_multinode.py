"""Multi-node behaviour on one machine: ray.cluster_utils.Cluster nodes on distinct
loopback addresses with fake GPU counts. Real Ray scheduling, real IP ordering,
real per-node CUDA_VISIBLE_DEVICES; the workers never touch CUDA."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from rayexec import ExecutorConfig, PlacementError, RayDistributedExecutor
from tests.helpers import assert_no_leaks
from tests.workers import IdentityWorker


def start_cluster(nodes: list[tuple[str, int]]) -> Cluster:
    if ray.is_initialized():
        ray.shutdown()
    (head_ip, head_gpus), *others = nodes
    # Not 127.0.0.1: Ray rewrites that address and connections can stall.
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        node_ip_address=head_ip, num_cpus=2, num_gpus=head_gpus, include_dashboard=False))
    for ip, gpus in others:
        cluster.add_node(node_ip_address=ip, num_cpus=1, num_gpus=gpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address=head_ip, logging_level="WARNING")
    return cluster


@pytest.fixture(scope="module")
def three_nodes():
    cluster = start_cluster([("127.0.0.2", 2), ("127.0.0.3", 4), ("127.0.0.4", 2)])
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_rank_order_and_per_node_visibility(three_nodes):
    cfg = ExecutorConfig(pipeline_parallel_size=2, tensor_parallel_size=4, device="cuda",
                         channel="shm", worker_cls=IdentityWorker)
    with RayDistributedExecutor(cfg) as ex:
        reports = ex.collective_rpc("report")
        assert [r["rank"] for r in reports] == list(range(8))
        ips = [r["node_ip"] for r in reports]
        # Driver's node first, then the lighter node (.4 holds 2, .3 holds 4).
        assert ips == ["127.0.0.2"] * 2 + ["127.0.0.4"] * 2 + ["127.0.0.3"] * 4
        assert ips == [p.node_ip for p in ex.layout]
        visible = [r["CUDA_VISIBLE_DEVICES"] for r in reports]
        assert visible == ["0,1"] * 4 + ["0,1,2,3"] * 4
        for r in reports:
            # local_rank is the position of the worker's own GPU in its node's list.
            (gpu,) = r["ray_gpu_ids"]
            assert r["local_rank"] == r["CUDA_VISIBLE_DEVICES"].split(",").index(gpu)
        # Within a node, ranks follow device ids.
        assert [r["ray_gpu_ids"][0] for r in reports[4:]] == ["0", "1", "2", "3"]
        assert [(r["pp_rank"], r["tp_rank"]) for r in reports] == [
            (p, t) for p in range(2) for t in range(4)]
        # The forward DAG spans the nodes: stage 0 tp 0 (rank 0) -> stage 1 tp 0 (rank 4).
        assert ex.execute_model("step") == [0, 4]
        ex.check_health()
    assert_no_leaks()


def test_host_ip_is_given_to_workers_on_the_driver_node(three_nodes):
    cfg = ExecutorConfig(tensor_parallel_size=4, device="cuda", forward="rpc",
                         placement_strategy="SPREAD", host_ip="127.0.0.2",
                         worker_cls=IdentityWorker)
    with RayDistributedExecutor(cfg) as ex:
        for plan, report in zip(ex.layout, ex.collective_rpc("report")):
            on_driver_node = plan.node_ip == "127.0.0.2"
            assert report["RAYEXEC_HOST_IP"] == ("127.0.0.2" if on_driver_node else None)
    assert_no_leaks()


def test_two_nodes_with_the_same_ip_fail_naming_the_fix():
    cluster = start_cluster([("127.0.0.5", 1), ("127.0.0.5", 1)])
    try:
        cfg = ExecutorConfig(tensor_parallel_size=2, device="cuda", forward="rpc",
                             placement_strategy="STRICT_SPREAD", worker_cls=IdentityWorker)
        with pytest.raises(PlacementError, match=r"2 nodes report the same IP 127\.0\.0\.5.*"
                                                 r"RAYEXEC_HOST_IP"):
            RayDistributedExecutor(cfg)
        assert_no_leaks()
    finally:
        ray.shutdown()
        cluster.shutdown()
