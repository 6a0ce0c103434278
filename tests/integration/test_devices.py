"""rayexec owns the device: on a fake-GPU cluster (Ray told num_gpus=4; CUDA calls
recorded by tests.fakes.RecordingPlatform), every thread that runs a worker's code
(its constructor, collective_rpc, a compiled-graph step, an rpc step, Ray's own
__ray_call__ where it builds NCCL communicators) has the rank's local_rank as its
current device, although the worker never sets one."""

from __future__ import annotations

import threading

import pytest
import ray

from rayexec import ExecutorConfig, RayDistributedExecutor
from tests.fakes import current_device, recording_cuda
from tests.workers import DeviceWorker


@pytest.fixture(scope="module")
def fake_gpus():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=8, num_gpus=4, include_dashboard=False,
             logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def fake_gpu_config(**kw) -> ExecutorConfig:
    kw = {"pipeline_parallel_size": 2, "tensor_parallel_size": 2, "channel": "shm", **kw}
    return ExecutorConfig(device="cuda", worker_cls=DeviceWorker, idle_park_s=None, **kw)


def on_ray_call_thread(actor):
    """(thread name, current device) on the thread that runs actor.__ray_call__."""
    return ray.get(actor.__ray_call__.remote(
        lambda self: (threading.current_thread().name, current_device())))


@pytest.mark.parametrize("forward", ["dag", "rpc"])
def test_every_thread_that_runs_worker_code_has_the_rank_device(fake_gpus, forward):
    with RayDistributedExecutor(fake_gpu_config(forward=forward), platform=recording_cuda()) \
            as ex:
        local_ranks = [p.local_rank for p in ex.layout]
        assert sorted(local_ranks) == [0, 1, 2, 3]  # one node: four distinct devices
        for step in range(3):
            assert ex.execute_model(step) == [0, 2]  # stage 0 tp 0, then stage 1 tp 0
        ex.collective_rpc("touch")
        seen = ex.collective_rpc("get_seen")
        ray_call = [on_ray_call_thread(a) for a in ex.workers]
    for rank, (records, local_rank) in enumerate(zip(seen, local_ranks)):
        kinds = {what.split(":")[0] for what, _, _ in records}
        assert kinds == {"__init__", "collective_rpc", "execute_model"}, records
        wrong = [r for r in records if r[2] != local_rank]
        assert not wrong, f"rank {rank} (local_rank {local_rank}) ran on other devices: {wrong}"
        assert ray_call[rank][1] == local_rank, (rank, ray_call[rank])
    if forward == "dag":
        # The compiled graph runs steps on a thread of its own: a second thread was set.
        step_threads = {t for what, t, _ in seen[0] if what.startswith("execute_model")}
        init_threads = {t for what, t, _ in seen[0] if what == "__init__"}
        assert step_threads and step_threads.isdisjoint(init_threads), seen[0]


def test_a_multi_device_worker_uses_the_device_ray_channels_use(fake_gpus):
    """Two GPUs per worker: local_rank, the device rayexec sets and the device Ray's
    channels pick (position of ray.get_gpu_ids()[0] in the visibility list) agree."""
    cfg = fake_gpu_config(tensor_parallel_size=1, num_devices_per_worker=2)
    with RayDistributedExecutor(cfg, platform=recording_cuda()) as ex:
        env = ex.collective_rpc(lambda w: __import__("os").environ["CUDA_VISIBLE_DEVICES"])
        reports = [ray.get(a.device_report.remote()) for a in ex.workers]
        layout = ex.layout
    assert env == ["0,1,2,3"] * 2
    assert sorted(p.local_rank for p in layout) == [0, 2]
    for plan, report in zip(layout, reports):
        assert len(report["ray_gpu_ids"]) == 2
        ray_index = env[0].split(",").index(report["ray_gpu_ids"][0])
        assert plan.local_rank == report["device_index"] == ray_index == report["current"]
        assert report["channel_device"] == f"cuda:{plan.local_rank}"


def cupy_stub(tmp_path, missing_on_rank: int) -> dict:
    """A runtime_env whose workers import a stand-in `cupy` that fails on one rank
    (RANK is set before rayexec asks), as on a node where cupy is not installed."""
    pkg = tmp_path / "cupy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import os\n"
        f"if os.environ.get('RANK') == '{missing_on_rank}':\n"
        "    raise ImportError('No module named cupy (simulated)')\n")
    import os

    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def test_auto_channel_without_cupy_on_a_worker_uses_shm_naming_the_rank(fake_gpus, tmp_path,
                                                                         caplog):
    cfg = fake_gpu_config(channel="auto", runtime_env=cupy_stub(tmp_path, 1))
    with caplog.at_level("WARNING", logger="rayexec.dag"), \
            RayDistributedExecutor(cfg, platform=recording_cuda()) as ex:
        assert ex.transport == "shm"
        assert ex.execute_model(0) == [0, 2]
    assert "rank(s) [1]" in caplog.text and "cupy" in caplog.text


def test_nccl_channel_without_cupy_on_a_worker_fails_naming_rank_and_install(fake_gpus,
                                                                             tmp_path):
    cfg = fake_gpu_config(channel="nccl", runtime_env=cupy_stub(tmp_path, 2))
    with pytest.raises(ImportError, match=r"rank\(s\) \[2\].*pip install cupy-cuda"):
        RayDistributedExecutor(cfg, platform=recording_cuda())


def test_manage_visibility_false_leaves_the_device_to_the_worker(fake_gpus):
    cfg = fake_gpu_config(channel="auto", manage_visibility=False, forward="rpc",
                          tensor_parallel_size=1)
    with RayDistributedExecutor(cfg, platform=recording_cuda()) as ex:
        reports = [ray.get(a.device_report.remote()) for a in ex.workers]
    assert [r["device_index"] for r in reports] == [None, None]
