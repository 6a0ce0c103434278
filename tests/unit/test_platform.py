"""Device kinds and device="auto" (pure)."""

import pytest

from rayexec.platform import CPU, CUDA, NPU, ROCM, get_platform, resolve_platform


def test_platform_facts_match_ray_names():
    assert (CUDA.resource_key, CUDA.visibility_var, CUDA.noset_var) == (
        "GPU", "CUDA_VISIBLE_DEVICES", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES")
    assert (ROCM.visibility_var, ROCM.torch_backend) == ("HIP_VISIBLE_DEVICES", "nccl")
    assert (NPU.resource_key, NPU.visibility_var, NPU.torch_backend) == (
        "NPU", "ASCEND_RT_VISIBLE_DEVICES", "hccl")
    assert (CPU.resource_key, CPU.visibility_var, CPU.torch_backend) == ("CPU", None, "gloo")
    assert not CPU.is_accelerator and CUDA.is_accelerator


def test_noset_names_exist_in_ray():
    from ray._private.accelerators import amd_gpu, npu, nvidia_gpu

    assert CUDA.noset_var == nvidia_gpu.NOSET_CUDA_VISIBLE_DEVICES_ENV_VAR
    assert ROCM.noset_var == amd_gpu.NOSET_HIP_VISIBLE_DEVICES_ENV_VAR
    assert NPU.noset_var == npu.NOSET_ASCEND_RT_VISIBLE_DEVICES_ENV_VAR


def test_auto_resolution():
    assert resolve_platform("auto", {"CPU": 8}) is CPU
    assert resolve_platform("auto", {"CPU": 8, "GPU": 2}) is CUDA
    assert resolve_platform("auto", {"GPU": 2}, torch_is_hip=True) is ROCM
    assert resolve_platform("auto", {"NPU": 8}) is NPU
    assert resolve_platform("cpu", {"GPU": 8}) is CPU


def test_unknown_kind():
    with pytest.raises(ValueError, match="device='tpu' is not a known device kind"):
        get_platform("tpu")
