"""GPU tests share one fixture: a local Ray that detects the machine's real GPUs."""

import pytest

# Why a test marked gpu(n, why=NCCL_PER_GPU) cannot run on fewer GPUs: two workers
# sharing one GPU (num_devices_per_worker=0.5) are valid for shm and rpc, not NCCL.
NCCL_PER_GPU = ("NCCL needs one GPU per rank; ranks sharing a GPU (fractional GPUs) are "
                "not valid for NCCL")


@pytest.fixture
def gpu_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
