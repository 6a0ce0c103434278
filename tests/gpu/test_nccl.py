"""GPU paths: NCCL tensor transport between stages, per-node CUDA visibility on real
devices, NCCL collectives from the rendezvous rayexec gives. Skipped (with the
reason) when the machine has fewer CUDA devices than a test needs."""

from __future__ import annotations

import pytest
import torch

from rayexec import ExecutorConfig, RayDistributedExecutor
from tests.gpu.conftest import NCCL_PER_GPU
from tests.workers import CudaWorker


def run_pp(pp: int, tp: int, **kw):
    cfg = ExecutorConfig(pipeline_parallel_size=pp, tensor_parallel_size=tp, device="cuda",
                         worker_cls=CudaWorker, **kw)
    n = 1 << 18  # 1 MiB of float32 per edge
    with RayDistributedExecutor(cfg) as ex:
        outs = [ex.execute_model({"n": n, "offset": float(i), "last_stage": pp - 1})
                for i in range(3)]
        transport, hints = ex.transport, ex._parts.dag.edge_type_hints()
    for i, out in enumerate(outs):
        expected = (torch.arange(n, dtype=torch.float32) + i) * 2 ** (pp - 1)
        assert torch.equal(out["t"], expected)
    return transport, hints


@pytest.mark.gpu(2, why=NCCL_PER_GPU)
def test_pp2_moves_a_cuda_tensor_over_nccl(gpu_ray):
    transport, hints = run_pp(2, 1, channel="nccl")
    assert transport == "nccl"
    assert all(h.transport == "accelerator" for h in hints)


@pytest.mark.gpu(2, why=NCCL_PER_GPU)
def test_auto_channel_picks_nccl_on_gpus(gpu_ray):
    transport, _ = run_pp(2, 1)
    assert transport == "nccl"


@pytest.mark.gpu(2, why=NCCL_PER_GPU)
def test_overlap_comm_on_gpus(gpu_ray):
    transport, _ = run_pp(2, 1, channel="nccl", overlap_comm=True)
    assert transport == "nccl"


@pytest.mark.gpu(4, why=NCCL_PER_GPU)
def test_pp2_tp2_over_nccl(gpu_ray):
    transport, hints = run_pp(2, 2, channel="nccl")
    assert transport == "nccl" and len(hints) == 2


@pytest.mark.gpu(2, why=NCCL_PER_GPU)
def test_each_node_sees_one_device_list_and_local_rank_is_its_device(gpu_ray):
    cfg = ExecutorConfig(tensor_parallel_size=2, device="cuda", worker_cls=CudaWorker,
                         forward="rpc")
    with RayDistributedExecutor(cfg) as ex:
        reports = ex.collective_rpc("report")
        assert len({r["CUDA_VISIBLE_DEVICES"] for r in reports}) == 1
        visible = reports[0]["CUDA_VISIBLE_DEVICES"].split(",")
        assert visible == sorted(visible, key=int) and len(visible) == 2
        for r in reports:
            assert r["device_count"] == 2
            assert r["current_device"] == r["local_rank"]
            assert visible.index(r["ray_gpu_ids"][0]) == r["local_rank"]
        assert ex.collective_rpc("all_reduce_rank") == [1.0, 1.0]
