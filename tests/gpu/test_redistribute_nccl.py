"""Redistribution plans over NCCL for CUDA tensors (skipped without 2 CUDA devices)."""

from __future__ import annotations

import pytest

from rayexec import ExecutorConfig, RayDistributedExecutor
from rayexec.redistribute import Tracker, plan_broadcast, plan_gather_scatter
from rayexec.transfer import execute_plan, held_tensors
from tests.gpu.conftest import NCCL_PER_GPU
from tests.integration.test_redistribute import KEYS, TIMEOUT_S, check_values, seed


def seed_cuda(worker, holdings):
    seed(worker, holdings)
    held = held_tensors(worker)
    for item, tensor in held.items():
        held[item] = tensor.to(worker.device)  # CudaWorker.init_device sets .device


def dump_cpu(worker):
    return {i: (t.device.type, t.cpu()) for i, t in held_tensors(worker).items()}


@pytest.mark.gpu(2, why=NCCL_PER_GPU)
def test_plans_run_over_nccl_for_cuda_tensors(gpu_ray):
    from tests.workers import CudaWorker

    holdings = {0: [(0, k) for k in KEYS], 1: [(1, k) for k in KEYS]}
    config = ExecutorConfig(worker_cls=CudaWorker, tensor_parallel_size=2, device="cuda",
                            forward="rpc")
    with RayDistributedExecutor(config) as executor:
        executor.collective_rpc(seed_cuda, args=(holdings,))
        tracker = Tracker(holdings)
        execute_plan(executor, plan_broadcast(tracker, {1: [0]}, nodes=executor.layout),
                     tracker, timeout=TIMEOUT_S)
        execute_plan(executor, plan_gather_scatter(tracker, {0: [1]}, root=0), tracker,
                     timeout=TIMEOUT_S)
        dumps = executor.collective_rpc(dump_cpu)
    everything = {(d, k) for d in (0, 1) for k in KEYS}
    assert [set(tracker.items(r)) for r in (0, 1)] == [everything, everything]
    for held in dumps:
        assert {device for device, _ in held.values()} == {"cuda"}
    check_values([{i: t for i, (_, t) in held.items()} for held in dumps],
                 [everything, everything])
