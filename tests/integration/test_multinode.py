"""Multi-node behaviour on one machine: ray.cluster_utils.Cluster nodes on distinct
loopback addresses with fake GPU counts. Real Ray scheduling, real IP ordering,
real per-node CUDA_VISIBLE_DEVICES; the workers never touch CUDA."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from rayexec import ExecutorConfig, PlacementError, RayDistributedExecutor
from tests.helpers import assert_no_leaks, cluster_snapshot
from tests.workers import IdentityWorker


def start_cluster(nodes: list[tuple[str, int]], node_env: dict | None = None) -> Cluster:
    """Nodes (ip, fake GPU count); `node_env` maps an ip to its raylet's extra
    environment (inherited by the workers started there)."""
    if ray.is_initialized():
        ray.shutdown()
    (head_ip, head_gpus), *others = nodes
    # Not 127.0.0.1: Ray rewrites that address and connections can stall.
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        node_ip_address=head_ip, num_cpus=2, num_gpus=head_gpus, include_dashboard=False))
    for ip, gpus in others:
        cluster.add_node(node_ip_address=ip, num_cpus=1, num_gpus=gpus,
                         env_vars=(node_env or {}).get(ip))
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


def test_gloo_channel_across_nodes_gives_the_single_process_greedy_ids(three_nodes):
    """PP=2 with one stage per node: the hidden states cross nodes over gloo."""
    from rayexec.gloo import gloo_traffic
    from rayexec.models import ReferenceModel, decoder_executor_config, generate, make_prompts

    prompts = make_prompts(3, 6, 4096, seed=1)
    want = generate(ReferenceModel("small", seed=1), prompts, 3)
    cfg = decoder_executor_config(2, 1, model="small", seed=1, device="cpu", channel="gloo",
                                  num_devices_per_worker=0.5, placement_strategy="STRICT_SPREAD")
    before = cluster_snapshot()
    with RayDistributedExecutor(cfg) as ex:
        assert len({p.node_ip for p in ex.layout}) == 2
        assert generate(ex, prompts, 3).token_ids == want.token_ids
        traffic = [ray.get(a.__ray_call__.remote(gloo_traffic)) for a in ex.workers]
    assert traffic[0]["sent"] > 0 and traffic[0]["sent"] == traffic[1]["received"]
    assert_no_leaks(before)


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


def test_node_address_override_must_be_an_address_of_that_node():
    cluster = start_cluster([("127.0.0.6", 1), ("127.0.0.7", 1), ("127.0.0.8", 1)],
                            node_env={"127.0.0.7": {"RAYEXEC_HOST_IP": "127.0.0.17"},
                                      "127.0.0.8": {"RAYEXEC_HOST_IP": "10.255.255.1"}})
    try:
        # A valid override (an address the node owns) is used for that node's ranks.
        group = _spread_group(["127.0.0.6", "127.0.0.7"])
        cfg = ExecutorConfig(tensor_parallel_size=2, device="cuda", forward="rpc",
                             worker_cls=IdentityWorker, placement_group=group)
        with RayDistributedExecutor(cfg) as ex:
            assert [p.node_ip for p in ex.layout] == ["127.0.0.6", "127.0.0.17"]
            assert ex.collective_rpc("report")[1]["node_ip"] == "127.0.0.7"  # Ray's view
        ray.util.remove_placement_group(group)
        # One that is not an address of the node differs from Ray's and cannot work.
        cfg = cfg.replace(placement_group=_spread_group(["127.0.0.6", "127.0.0.8"]))
        before = cluster_snapshot()
        with pytest.raises(PlacementError, match=r"\(Ray: 127\.0\.0\.8\) reports IP "
                                                 r"10\.255\.255\.1, which is not an address"):
            RayDistributedExecutor(cfg)
        assert_no_leaks(before)
        with pytest.raises(PlacementError, match="host_ip='10.255.255.1' is not an address"):
            RayDistributedExecutor(cfg.replace(host_ip="10.255.255.1"))
    finally:
        ray.shutdown()
        cluster.shutdown()


def _spread_group(ips: list[str]):
    """A placement group with one GPU bundle pinned to each of `ips`."""
    group = ray.util.placement_group([{"GPU": 1, f"node:{ip}": 0.001} for ip in ips])
    ray.get(group.ready(), timeout=60)
    return group
