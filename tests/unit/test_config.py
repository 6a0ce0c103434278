"""ExecutorConfig validation and the RAYEXEC_* overrides (pure, no Ray)."""

import dataclasses

import pytest

from rayexec import ExecutorConfig
from rayexec.config import check_bundle_indices_in_range
from rayexec.envs import CONFIG_VARS, config_overrides


class Worker:
    pass


def cfg(**kw):
    return ExecutorConfig(worker_cls=kw.pop("worker_cls", Worker), **kw)


@pytest.mark.parametrize("field,value,words", [
    ("pipeline_parallel_size", 0, "integer >= 1"),
    ("tensor_parallel_size", 1.5, "integer >= 1"),
    ("tensor_parallel_size", True, "integer >= 1"),
    ("device", "tpu", "['auto', 'cuda', 'rocm', 'npu', 'cpu']"),
    ("channel", "tcp", "['auto', 'nccl', 'shm', 'gloo']"),
    ("forward", "eager", "['dag', 'rpc']"),
    ("placement_strategy", "pack", "STRICT_SPREAD"),
    ("num_devices_per_worker", 0, "> 0"),
    ("num_cpus_per_worker", -1, ">= 0"),
    ("memory_per_worker", 1.5, "bytes > 0"),
    ("pg_ready_timeout_s", 0, "seconds > 0"),
    ("init_timeout_s", 0, "seconds > 0"),
    ("execute_timeout_s", -5, "seconds > 0"),
    ("rpc_timeout_s", "10", "seconds > 0"),
    ("idle_park_s", 0, "None or a number of seconds > 0"),
    ("idle_park_s", "1", "None or a number of seconds > 0"),
    ("env_vars", {"A": 1}, "str names to str values"),
    ("env_vars", {"CUDA_VISIBLE_DEVICES": "0"}, "set per worker"),
    ("env_prefixes_to_copy", "NCCL_", "tuple of non-empty prefixes"),
    ("cpu_threads_per_worker", 0, "int >= 1"),
    ("host_ip", "my-host", "IPv4 or IPv6"),
    ("worker_kwargs", {"rank": 3}, "set by rayexec"),
    ("worker_cls", "NoDots", "pkg.module.Class"),
    ("worker_cls", 42, "class"),
    ("runtime_env", "x", "runtime_env mapping"),
])
def test_invalid_field_names_field_value_and_allowed(field, value, words):
    with pytest.raises(ValueError) as info:
        cfg(**{field: value})
    msg = str(info.value)
    assert f"ExecutorConfig.{field}={value!r}" in msg
    assert words in msg


def test_worker_cls_required():
    with pytest.raises(ValueError, match="worker_cls=None.*required"):
        ExecutorConfig()


@pytest.mark.parametrize("indices,words", [
    ((0, 1, 2), "needs exactly world_size=4"),
    ((0, 1, 1, 2), r"\[1\] appear more than once"),
    ((0, -1, 2, 3), "negative"),
    ("0123", "sequence of integers"),
])
def test_bundle_indices_validated_at_construction(indices, words):
    with pytest.raises(ValueError, match=words):
        cfg(pipeline_parallel_size=2, tensor_parallel_size=2, bundle_indices=indices)


def test_bundle_indices_out_of_range():
    with pytest.raises(ValueError, match=r"\[8\] are out of range .* 8 bundles"):
        check_bundle_indices_in_range((0, 2, 4, 8), 8)
    check_bundle_indices_in_range((0, 2, 4, 7), 8)


def test_nccl_and_overlap_need_gpus():
    with pytest.raises(ValueError, match="nccl needs GPU workers"):
        cfg(device="cpu", channel="nccl")
    with pytest.raises(ValueError, match="overlap_comm"):
        cfg(channel="shm", overlap_comm=True)


def test_frozen_and_copies_inputs():
    kwargs = {"a": 1}
    c = cfg(worker_kwargs=kwargs, bundle_indices=[0])
    kwargs["a"] = 2
    assert c.worker_kwargs == {"a": 1} and c.bundle_indices == (0,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.channel = "shm"
    assert c.replace(channel="shm").channel == "shm" and c.channel == "auto"
    with pytest.raises(ValueError):
        c.replace(channel="bogus")


def test_unknown_keys_rejected_with_suggestion():
    with pytest.raises(ValueError, match=r"'tensor_paralel_size' \(did you mean "
                                         r"'tensor_parallel_size'\?\)"):
        ExecutorConfig.from_dict({"worker_cls": Worker, "tensor_paralel_size": 2})
    with pytest.raises(TypeError):
        ExecutorConfig(worker_cls=Worker, bogus=1)


def test_from_env_overrides_defaults_and_explicit_wins(monkeypatch):
    monkeypatch.setenv("RAYEXEC_CHANNEL", "shm")
    monkeypatch.setenv("RAYEXEC_BUNDLE_INDICES", "0,2,4,6")
    monkeypatch.setenv("RAYEXEC_PIPELINE_PARALLEL_SIZE", "2")
    monkeypatch.setenv("RAYEXEC_TENSOR_PARALLEL_SIZE", "2")
    monkeypatch.setenv("RAYEXEC_RPC_TIMEOUT_S", "none")
    monkeypatch.setenv("RAYEXEC_CPU_BIND", "off")
    c = ExecutorConfig.from_env(worker_cls=Worker, tensor_parallel_size=2)
    assert c.channel == "shm" and c.bundle_indices == (0, 2, 4, 6)
    assert c.pipeline_parallel_size == 2 and c.rpc_timeout_s is None and c.cpu_bind is False
    c = ExecutorConfig.from_env(worker_cls=Worker, channel="auto", bundle_indices=None)
    assert c.channel == "auto"


def test_env_values_that_do_not_parse_name_the_variable():
    with pytest.raises(ValueError, match=r"RAYEXEC_BUNDLE_INDICES='0,x' is invalid"):
        config_overrides({"RAYEXEC_BUNDLE_INDICES": "0,x"})
    with pytest.raises(ValueError, match=r"RAYEXEC_PG_READY_TIMEOUT_S='soon'"):
        config_overrides({"RAYEXEC_PG_READY_TIMEOUT_S": "soon"})
    with pytest.raises(ValueError, match="RAYEXEC_CPU_BIND"):
        config_overrides({"RAYEXEC_CPU_BIND": "maybe"})


def test_timeout_from_env_is_a_number():
    assert config_overrides({"RAYEXEC_PG_READY_TIMEOUT_S": "2.5"}) == {"pg_ready_timeout_s": 2.5}
    assert config_overrides({"RAYEXEC_INIT_TIMEOUT_S": "30"}) == {"init_timeout_s": 30.0}
    assert config_overrides({"RAYEXEC_IDLE_PARK_S": "none"}) == {"idle_park_s": None}
    assert config_overrides({"RAYEXEC_IDLE_PARK_S": "0.5"}) == {"idle_park_s": 0.5}


def test_every_env_var_names_a_real_field():
    fields = {f.name for f in dataclasses.fields(ExecutorConfig)}
    assert {field for field, _, _ in CONFIG_VARS.values()} <= fields


def test_nccl_without_managed_visibility_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"channel='nccl'.*visibility variable.*manage_vis"):
        cfg(channel="nccl", manage_visibility=False)
    assert cfg(channel="auto", manage_visibility=False).channel == "auto"
    assert cfg(channel="gloo").channel == "gloo"
