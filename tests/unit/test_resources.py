"""ResourceConfig: validation, totals, and shortfalls against a given cluster (pure)."""

import pytest

from rayexec import ExecutorConfig, PlacementError
from rayexec.platform import CPU, CUDA
from rayexec.resources import ResourceConfig


def test_from_total_splits_evenly():
    r = ResourceConfig.from_total(total_accelerators=8, total_cpus=16, total_memory=8 << 30,
                                  num_workers=4)
    assert r.bundle() == {"GPU": 2.0, "CPU": 4.0, "memory": float(2 << 30)}
    assert r.required() == {"GPU": 8.0, "CPU": 16.0, "memory": float(8 << 30)}
    half = ResourceConfig.from_total(1, 2, None, 2)
    assert half.accelerators_per_worker == 0.5
    cpu = ResourceConfig.from_total(0, 4, None, 2, accelerator=None)
    assert cpu.bundle() == {"CPU": 2.0} and cpu.device == "cpu"


def test_from_total_refuses_uneven_split():
    with pytest.raises(ValueError, match=r"total_accelerators=6 does not split evenly over "
                                         r"num_workers=4 \(1.5 each\)"):
        ResourceConfig.from_total(6, 8, None, 4)


@pytest.mark.parametrize("field,value,words", [
    ("num_workers", 0, "integer >= 1"),
    ("accelerator", "TPU", '"GPU", "NPU" or None'),
    ("accelerators_per_worker", 1.5, "whole number"),
    ("placement_strategy", "BEST", "Ray's strategies"),
    ("pg_ready_timeout_s", "30", "not a string"),
    ("accelerators_per_node", 0, "integer >= 1"),
    ("memory_per_worker", -1, "bytes > 0"),
])
def test_invalid_fields(field, value, words):
    with pytest.raises(ValueError, match=f"ResourceConfig.{field}=.*{words}"):
        ResourceConfig(**{field: value})


def test_cpu_only_needs_cpu():
    with pytest.raises(ValueError, match="CPU-only worker must reserve some CPU"):
        ResourceConfig(cpus_per_worker=0)


def test_validate_available_names_each_shortfall_needed_vs_free():
    r = ResourceConfig(num_workers=4, accelerator="GPU", cpus_per_worker=4)
    cluster = {"10.0.0.1": {"GPU": 2, "CPU": 8}, "10.0.0.2": {"GPU": 1, "CPU": 4}}
    with pytest.raises(PlacementError) as info:
        r.validate_available(cluster)
    msg = str(info.value)
    assert "GPU needed 4 vs 3 free" in msg and "CPU needed 16 vs 12 free" in msg
    assert "the cluster has 3 GPU free, the layout needs 4" in msg
    assert "the cluster has 12 CPU free, the layout needs 16" in msg
    ResourceConfig(num_workers=3, accelerator="GPU", cpus_per_worker=4).validate_available(
        cluster)


def test_accelerators_per_node():
    r = ResourceConfig(num_workers=4, accelerator="GPU", cpus_per_worker=0,
                       accelerators_per_node=2)
    assert r.shortfalls({"a": {"GPU": 2}, "b": {"GPU": 2}}) == []
    reasons = r.shortfalls({"a": {"GPU": 3}, "b": {"GPU": 1}})
    assert any("need 2 node(s) with 2 free; 1 have that" in x for x in reasons)


def test_maps_to_and_from_executor_config():
    r = ResourceConfig(num_workers=2, accelerator="GPU", cpus_per_worker=2,
                       placement_strategy="SPREAD")
    cfg = ExecutorConfig(worker_cls=object, tensor_parallel_size=2, **r.executor_fields())
    assert ResourceConfig.for_executor(cfg, CUDA) == r
    cpu = ResourceConfig(num_workers=2, cpus_per_worker=0.5)
    cfg = ExecutorConfig(worker_cls=object, tensor_parallel_size=2, **cpu.executor_fields())
    assert cfg.device == "cpu" and ResourceConfig.for_executor(cfg, CPU).bundle() == {"CPU": 0.5}
