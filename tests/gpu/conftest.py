"""GPU tests share one fixture: a local Ray that detects the machine's real GPUs."""

import pytest


@pytest.fixture
def gpu_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
