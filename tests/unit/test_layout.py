"""Rank order, device visibility and per-worker environments (pure, no Ray)."""

import pytest

from rayexec.errors import PlacementError
from rayexec.layout import (
    Topology,
    WorkerInfo,
    copied_driver_env,
    device_sort_key,
    ip_sort_key,
    order_workers,
    plan_ranks,
)
from rayexec.platform import CPU, CUDA, NPU


def W(node, ip, *devices, cpus=8):
    return WorkerInfo(node_id=node, node_ip=ip, device_ids=tuple(devices), node_cpus=cpus)


def test_ip_order_is_numeric_not_textual():
    ips = ["10.0.0.10", "10.0.0.9", "9.255.255.255", "10.0.1.0"]
    assert sorted(ips, key=ip_sort_key) == ["9.255.255.255", "10.0.0.9", "10.0.0.10", "10.0.1.0"]
    assert sorted(ips) != sorted(ips, key=ip_sort_key)  # the textual order is wrong


def test_ipv6_sorts_numerically_and_after_ipv4():
    ips = ["fe80::10", "fe80::9", "10.0.0.1", "::1"]
    assert sorted(ips, key=ip_sort_key) == ["10.0.0.1", "::1", "fe80::9", "fe80::10"]


def test_device_ids_sort_as_integers():
    assert sorted(["10", "9", "1", "0"], key=device_sort_key) == ["0", "1", "9", "10"]


def test_bad_ip_is_a_clear_error():
    with pytest.raises(PlacementError, match="host_ip"):
        ip_sort_key("node-a")


def test_driver_node_first_then_lighter_nodes_then_numeric_ip():
    workers = [
        W("big", "10.0.0.9", "0"), W("big", "10.0.0.9", "1"), W("big", "10.0.0.9", "2"),
        W("small10", "10.0.0.10", "0"),
        W("drv", "10.0.0.200", "1"), W("drv", "10.0.0.200", "0"),
        W("small2", "10.0.0.2", "0"),
    ]
    order = order_workers("10.0.0.200", workers)
    nodes = [workers[i].node_id for i in order]
    assert nodes == ["drv", "drv", "small2", "small10", "big", "big", "big"]
    # within the driver's node, by device id
    assert [workers[i].device_ids for i in order[:2]] == [("0",), ("1",)]


def test_within_node_device_ids_compare_as_integers():
    workers = [W("n", "10.0.0.1", d) for d in ("10", "9", "2", "11")]
    order = order_workers("10.0.0.99", workers)
    assert [workers[i].device_ids[0] for i in order] == ["2", "9", "10", "11"]


def test_grid_is_stage_major():
    topo = Topology(pp=2, tp=3)
    assert topo.grid(list(range(6))) == [[0, 1, 2], [3, 4, 5]]
    assert [topo.pp_rank(r) for r in range(6)] == [0, 0, 0, 1, 1, 1]
    assert [topo.tp_rank(r) for r in range(6)] == [0, 1, 2, 0, 1, 2]
    assert topo.rank(1, 2) == 5 and topo.stage_ranks(1) == [3, 4, 5]


def test_same_visible_list_per_node_and_local_rank_is_position():
    workers = [
        W("a", "10.0.0.1", "3"), W("a", "10.0.0.1", "1"),
        W("b", "10.0.0.2", "10"), W("b", "10.0.0.2", "9"),
    ]
    plans = plan_ranks(Topology(2, 2), CUDA, "10.0.0.1", workers, master_port=1234)
    by_rank = {p.rank: p for p in plans}
    assert [by_rank[r].env["CUDA_VISIBLE_DEVICES"] for r in range(4)] == ["1,3", "1,3", "9,10",
                                                                          "9,10"]
    assert [by_rank[r].local_rank for r in range(4)] == [0, 1, 0, 1]
    assert [by_rank[r].device_ids for r in range(4)] == [("1",), ("3",), ("9",), ("10",)]
    assert all(p.env["MASTER_ADDR"] == "10.0.0.1" and p.env["MASTER_PORT"] == "1234"
               for p in plans)
    assert [p.env["RANK"] for p in plans] == ["0", "1", "2", "3"]
    assert {p.env["WORLD_SIZE"] for p in plans} == {"4"}
    assert {p.env["LOCAL_WORLD_SIZE"] for p in plans} == {"2"}


def test_npu_uses_its_own_visibility_variable():
    workers = [W("a", "10.0.0.1", "1"), W("a", "10.0.0.1", "0")]
    plans = plan_ranks(Topology(1, 2), NPU, "10.0.0.1", workers, master_port=1)
    assert {p.env["ASCEND_RT_VISIBLE_DEVICES"] for p in plans} == {"0,1"}
    assert "CUDA_VISIBLE_DEVICES" not in plans[0].env


def test_master_addr_is_rank0_node_when_driver_has_no_workers():
    workers = [W("b", "10.0.0.20", "0"), W("a", "10.0.0.3", "0")]
    plans = plan_ranks(Topology(2, 1), CUDA, "10.0.0.99", workers, master_port=5)
    assert plans[0].node_ip == "10.0.0.3"
    assert {p.env["MASTER_ADDR"] for p in plans} == {"10.0.0.3"}


def test_env_copies_prefixes_but_never_worker_specific_vars():
    driver_env = {
        "NCCL_DEBUG": "INFO", "HF_TOKEN": "secret", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
        "RANK": "7", "TORCH_LOGS": "+dynamo", "LOCAL_RANK": "3", "MASTER_PORT": "1",
    }
    assert copied_driver_env(driver_env, ("NCCL_", "TORCH_", "CUDA_", "RANK", "LOCAL_")) == {
        "NCCL_DEBUG": "INFO", "TORCH_LOGS": "+dynamo"}
    workers = [W("a", "10.0.0.1", "2"), W("a", "10.0.0.1", "3")]
    plans = plan_ranks(Topology(1, 2), CUDA, "10.0.0.1", workers, master_port=9,
                       env_vars={"MY_FLAG": "1"}, driver_env=driver_env,
                       env_prefixes_to_copy=("NCCL_", "CUDA_", "RANK"))
    for p in plans:
        assert p.env["NCCL_DEBUG"] == "INFO" and p.env["MY_FLAG"] == "1"
        assert "HF_TOKEN" not in p.env  # not named by a prefix: secrets stay behind
        assert p.env["CUDA_VISIBLE_DEVICES"] == "2,3"  # ours, not the driver's
        assert p.env["RANK"] == str(p.rank)


def test_cpu_threads_split_node_cores_and_bind_disjoint_cores():
    workers = [W("a", "10.0.0.1", cpus=8) for _ in range(4)]
    plans = plan_ranks(Topology(2, 2), CPU, "10.0.0.1", workers, master_port=1, cpu_bind=True)
    assert [p.cpu_threads for p in plans] == [2, 2, 2, 2]
    assert [p.env["OMP_NUM_THREADS"] for p in plans] == ["2"] * 4
    assert [p.cpu_cores for p in plans] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [p.local_rank for p in plans] == [0, 1, 2, 3]
    assert "CUDA_VISIBLE_DEVICES" not in plans[0].env


def test_cpu_threads_at_least_one_and_explicit_setting_wins():
    workers = [W("a", "10.0.0.1", cpus=2) for _ in range(4)]
    plans = plan_ranks(Topology(2, 2), CPU, "10.0.0.1", workers, master_port=1, cpu_bind=True)
    assert [p.cpu_threads for p in plans] == [1, 1, 1, 1]
    assert [p.cpu_cores for p in plans] == [(0,), (1,), (0,), (1,)]  # round robin
    plans = plan_ranks(Topology(1, 2), CPU, "10.0.0.1", workers[:2], master_port=1,
                       cpu_threads_per_worker=3)
    assert [p.cpu_threads for p in plans] == [3, 3] and plans[0].cpu_cores is None


def test_duplicate_ip_across_nodes_is_an_error_naming_the_fix():
    workers = [W("a", "10.0.0.1", "0"), W("b", "10.0.0.1", "0")]
    with pytest.raises(PlacementError, match=r"same IP 10\.0\.0\.1.*RAYEXEC_HOST_IP"):
        plan_ranks(Topology(1, 2), CUDA, "10.0.0.1", workers, master_port=1)


def test_node_with_two_ips_is_an_error_naming_the_fix():
    workers = [W("a", "10.0.0.1", "0"), W("a", "10.0.0.2", "1")]
    with pytest.raises(PlacementError, match=r"node a reports more than one IP.*host_ip"):
        plan_ranks(Topology(1, 2), CUDA, "10.0.0.1", workers, master_port=1)


def test_accelerator_worker_without_device_is_an_error():
    workers = [W("a", "10.0.0.1", "0"), W("a", "10.0.0.1")]
    with pytest.raises(PlacementError, match="hold no GPU"):
        plan_ranks(Topology(1, 2), CUDA, "10.0.0.1", workers, master_port=1)


def test_host_ip_is_given_to_driver_node_workers_only():
    workers = [W("a", "10.0.0.1", "0"), W("b", "10.0.0.2", "0")]
    plans = plan_ranks(Topology(1, 2), CUDA, "10.0.0.1", workers, master_port=1,
                       host_ip="10.0.0.1")
    assert plans[0].env.get("RAYEXEC_HOST_IP") == "10.0.0.1"
    assert "RAYEXEC_HOST_IP" not in plans[1].env


def test_worker_count_must_match_topology():
    with pytest.raises(ValueError, match="world_size=4"):
        plan_ranks(Topology(2, 2), CPU, "10.0.0.1", [W("a", "10.0.0.1")], master_port=1)


def test_multi_device_worker_is_on_the_first_device_ray_lists_for_it():
    # Ray's channels use ray.get_gpu_ids()[0] (reported as device_ids[0]), which need
    # not be the smallest id; local_rank follows the same rule, and order stays numeric.
    workers = [W("a", "10.0.0.1", "3", "2"), W("a", "10.0.0.1", "0", "1")]
    plans = plan_ranks(Topology(2, 1), CUDA, "10.0.0.1", workers, master_port=1)
    assert [p.device_ids for p in plans] == [("0", "1"), ("3", "2")]
    assert {p.env["CUDA_VISIBLE_DEVICES"] for p in plans} == {"0,1,2,3"}
    assert [p.local_rank for p in plans] == [0, 3]
