"""rayexec owns the device, on real GPUs: a worker with no init_device computes on
its own GPU on every thread, stage inputs arrive on the receiving worker's GPU
(nccl, shm and rpc), and Ray's NCCL communicators are built on each worker's GPU
(with PP >= 2 and two GPU workers per node they would otherwise all land on GPU 0).

One GPU runs what fits on one: two stages sharing it (num_devices_per_worker=0.5)
over shm and rpc. NCCL between stages needs a GPU per stage (NCCL refuses two ranks
on one device), so those tests need 2 or 4 GPUs and skip with that reason."""

from __future__ import annotations

import pytest
import ray

from rayexec import ExecutorConfig, RayDistributedExecutor
from tests.gpu.conftest import NCCL_PER_GPU
from tests.workers import CudaDeviceWorker


def run_steps(pp: int, tp: int, **kw):
    cfg = ExecutorConfig(pipeline_parallel_size=pp, tensor_parallel_size=tp, device="cuda",
                         worker_cls=CudaDeviceWorker, idle_park_s=None, **kw)
    with RayDistributedExecutor(cfg) as ex:
        outs = [ex.execute_model(step) for step in range(3)]
        ex.collective_rpc("touch")
        seen = ex.collective_rpc("get_seen")
        local_ranks = [p.local_rank for p in ex.layout]
        reports = [ray.get(a.device_report.remote()) for a in ex.workers]
        transport = ex.transport
    for step, out in enumerate(outs):
        assert out["ranks"] == [s * tp for s in range(pp)]
        assert out["t"].device.type == "cuda" and float(out["t"][0]) == step
    for rank, (records, local_rank) in enumerate(zip(seen, local_ranks)):
        wrong = [r for r in records if r[2] != local_rank]
        assert not wrong, f"rank {rank} (local_rank {local_rank}) ran on other GPUs: {wrong}"
    for report, local_rank in zip(reports, local_ranks):
        assert report["current"] == report["device_index"] == local_rank
        assert report["channel_device"] == f"cuda:{local_rank}"
    return transport, local_ranks


@pytest.mark.gpu(1)
@pytest.mark.parametrize("forward", ["dag", "rpc"])
def test_two_stages_sharing_one_gpu(gpu_ray, forward):
    transport, local_ranks = run_steps(2, 1, forward=forward, channel="auto",
                                       num_devices_per_worker=0.5)
    assert local_ranks == [0, 0]
    assert transport == ("shm" if forward == "dag" else None)  # nccl needs whole GPUs


@pytest.mark.gpu(2, why=NCCL_PER_GPU)
def test_each_stage_on_its_own_gpu_over_nccl(gpu_ray):
    transport, local_ranks = run_steps(2, 1, channel="nccl")
    assert sorted(local_ranks) == [0, 1] and transport == "nccl"


@pytest.mark.gpu(2, why="a stage's input moves between two GPUs only where there are two")
def test_rpc_moves_the_stage_input_onto_the_receiving_gpu(gpu_ray):
    transport, local_ranks = run_steps(2, 1, forward="rpc")
    assert sorted(local_ranks) == [0, 1] and transport is None


@pytest.mark.gpu(4, why=NCCL_PER_GPU)
def test_pp2_tp2_over_nccl_without_init_device(gpu_ray):
    # Four GPU workers on one node and no worker-side set_device: each NCCL edge's
    # communicator must be built on its own GPUs, not all on GPU 0.
    transport, local_ranks = run_steps(2, 2, channel="nccl")
    assert transport == "nccl" and sorted(local_ranks) == [0, 1, 2, 3]


@pytest.mark.gpu(4, why=NCCL_PER_GPU)
def test_two_gpus_per_worker_use_the_first_ray_lists(gpu_ray):
    transport, local_ranks = run_steps(2, 1, channel="nccl", num_devices_per_worker=2)
    assert transport == "nccl" and sorted(local_ranks) == [0, 2]
