"""Train -> serve weight sync over NCCL: a trainer holding CUDA tensors and a CUDA
executor, one GPU per rank (skipped, with the reason, on fewer GPUs). The CPU tests
(tests/integration/test_weight_sync.py) run the same planner and transport over gloo."""

from __future__ import annotations

import pytest
import torch

from rayexec import RayDistributedExecutor, ResourceConfig, WorkerGroup
from rayexec.models.engine import generate, make_prompts
from rayexec.models.reference import ReferenceModel
from rayexec.models.rl import TINY
from rayexec.models.trainer import full_weights
from rayexec.models.worker import decoder_executor_config
from tests.gpu.conftest import NCCL_PER_GPU


def server_shards_cpu(worker):
    return {n: (t.cpu(), spec) for n, (t, spec) in worker.weight_shards().items()}


def sync_and_compare(train_dp: int, train_tp: int, serve_pp: int, serve_tp: int,
                     device: str = "cuda") -> None:
    """`device="cpu"` runs the same check over gloo (how this test is checked on a
    machine without GPUs)."""
    from tests.weight_workers import CudaTrainer

    cpu = device == "cpu"
    trainer = WorkerGroup.from_config(
        CudaTrainer, {"dp": train_dp, "tp": train_tp, "model": TINY, "device": device},
        ResourceConfig(num_workers=train_dp * train_tp, accelerator=None if cpu else "GPU",
                       cpus_per_worker=0.5))
    try:
        trainer.run("init_device")
        config = decoder_executor_config(serve_pp, serve_tp, model=TINY, device=device,
                                         **({"num_devices_per_worker": 0.5} if cpu else {}))
        with RayDistributedExecutor(config) as executor:
            prompts = make_prompts(2, 6, TINY["vocab_size"])
            trainer.run("train_step", ([[*p, 1, 2] for p in prompts] * train_dp,))
            report = executor.update_weights(trainer, version=7)
            served = executor.collective_rpc(server_shards_cpu)
            after = generate(executor, prompts, 4).token_ids
            assert executor.weights_version == 7
        full = full_weights(trainer.run("cpu_shards"))
    finally:
        trainer.shutdown()
    assert report.bytes > 0 and all(b > 0 for b in report.bytes_by_source_rank.values())
    for rank, shards in enumerate(served):
        for name, (tensor, spec) in shards.items():
            want = full[name][tuple(slice(a, b) for a, b in spec.box)]
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), (rank, name)
    reference = ReferenceModel(TINY, device="cpu")
    reference.shard.load_named(full)
    assert after == generate(reference, prompts, 4).token_ids


@pytest.mark.gpu(2, why=NCCL_PER_GPU)
def test_a_gpu_trainer_syncs_into_a_gpu_executor_over_nccl(gpu_ray):
    sync_and_compare(1, 1, 1, 1)


@pytest.mark.gpu(4, why=NCCL_PER_GPU)
@pytest.mark.parametrize("train, serve", [((1, 2), (2, 1)), ((2, 1), (1, 2))],
                         ids=["tp2-to-pp2", "dp2-to-tp2"])
def test_nccl_sync_reshards_between_layouts(gpu_ray, train, serve):
    sync_and_compare(*train, *serve)
