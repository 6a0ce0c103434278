"""The words of a PlacementError, from the pure diagnosis (no Ray cluster)."""

from rayexec import ExecutorConfig
from rayexec.diagnosis import diagnose_placement
from rayexec.placement import embedded_cpus
from rayexec.platform import CPU, CUDA
from rayexec.resources import ResourceConfig

GPU1 = {"GPU": 1.0}


def test_too_many_gpus_names_need_and_free_per_node():
    msg = diagnose_placement([GPU1] * 8, "PACK", {"10.0.0.1": {"GPU": 2}, "10.0.0.2": {"GPU": 4}})
    assert "Asked for 8 bundles of {GPU=1} with PACK" in msg
    assert "10.0.0.1: GPU=2; 10.0.0.2: GPU=4" in msg
    assert "the cluster has 6 GPU free, the layout needs 8" in msg


def test_strict_spread_over_too_few_nodes():
    msg = diagnose_placement([GPU1] * 4, "STRICT_SPREAD",
                             {"10.0.0.1": {"GPU": 4}, "10.0.0.2": {"GPU": 4}})
    assert "STRICT_SPREAD puts every bundle on a different node, but only 2 node(s)" in msg
    assert "total" not in msg  # enough GPUs overall: the strategy is the problem


def test_strict_pack_without_a_big_enough_node():
    msg = diagnose_placement([GPU1] * 4, "STRICT_PACK",
                             {"10.0.0.1": {"GPU": 2}, "10.0.0.2": {"GPU": 2}})
    assert "STRICT_PACK puts all bundles on one node, and no node has {GPU=4} free" in msg


def test_bundle_larger_than_any_node():
    msg = diagnose_placement([{"GPU": 3.0}] * 2, "PACK",
                             {"10.0.0.1": {"GPU": 2}, "10.0.0.2": {"GPU": 2}})
    assert "no node can hold even one bundle" in msg


def test_fragmented_resources():
    msg = diagnose_placement([{"GPU": 2.0}] * 3, "PACK",
                             {"a": {"GPU": 3}, "b": {"GPU": 3}})
    assert "only 2 whole bundle(s) fit" in msg


def test_sufficient_resources_point_elsewhere():
    msg = diagnose_placement([GPU1] * 2, "PACK", {"10.0.0.1": {"GPU": 8}})
    assert "look sufficient" in msg and "pg_ready_timeout_s" in msg


def test_driver_pin_resource_is_ignored_in_words():
    msg = diagnose_placement([{**GPU1, "node:10.0.0.1": 0.001}, GPU1], "PACK", {"10.0.0.1": {}})
    assert "node:10" not in msg and "{GPU=1}" in msg


def test_bundle_shapes():
    c = ExecutorConfig(worker_cls=object, num_cpus_per_worker=2, memory_per_worker=1 << 30)
    assert ResourceConfig.for_executor(c, CUDA).bundle() == {
        "GPU": 1.0, "CPU": 2.0, "memory": float(1 << 30)}
    half = ExecutorConfig(worker_cls=object, num_devices_per_worker=0.5)
    assert ResourceConfig.for_executor(half, CPU).bundle() == {"CPU": 0.5}


def test_embedded_ray_gets_enough_cpus_for_a_cpu_layout():
    c = ExecutorConfig(worker_cls=object, pipeline_parallel_size=2, tensor_parallel_size=2,
                       device="cpu")
    assert embedded_cpus(c, physical_cpus=2) == 4
    assert embedded_cpus(c, physical_cpus=16) == 16
    assert embedded_cpus(c.replace(device="cuda"), physical_cpus=2) == 2
