"""An RL-shaped loop on rayexec: vLLM generates, a trainer group takes an optimizer
step on the generated sequences, and rayexec's direct path pushes the new weights
into vLLM's workers, actor to actor; K times.

    python examples/vllm_rl.py --tp 2 --iterations 3 --check

The model is a tiny random Llama written with `save_pretrained` (no download).
Each iteration prints the trainer's loss and the update's time and bytes. With
`--check`, the trainer saves its weights at the end and a fresh vLLM engine on
vLLM's own `mp` backend, started from that checkpoint, generates the same prompts:
the example prints whether its greedy ids equal the updated engine's. (For the
ids to be comparable bit for bit, both engines run one thread per worker on the
same cores; docs/vllm-exactness.md says why.)

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), which
the direct path needs; the trainer and vLLM's workers share this process's Ray.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)
PROMPT_LEN, PROMPTS = 12, 4


def build_tiny_llama(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=4096,
                         max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(path)


def prompts() -> list[list[int]]:
    return [[(37 * i + 11 * j) % 4000 + 5 for j in range(PROMPT_LEN)] for i in range(PROMPTS)]


def make_llm(model: Path, tp: int, pp: int, backend: object):
    from vllm import LLM

    # With PP, vLLM 0.32's CPU workers need the warm-up run that eager mode skips.
    compile_args = ({"enforce_eager": True} if pp == 1 else
                    {"enforce_eager": False,
                     "compilation_config": {"mode": 2, "backend": "eager"}})
    return LLM(model=str(model), skip_tokenizer_init=True, seed=0, tensor_parallel_size=tp,
               pipeline_parallel_size=pp, distributed_executor_backend=backend,
               max_model_len=128, max_num_seqs=8, max_num_batched_tokens=256,
               kv_cache_memory_bytes=32 << 20, **compile_args)


def generate(llm, max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts()], params,
                           use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=2, help="trainer ranks")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vllm-rl-"))
    # The direct path reaches vLLM's workers from the engine core's process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    world = args.tp * args.pp
    if args.check:
        # Same threads and cores per rank on both engines (see the docstring).
        cores = sorted(os.sched_getaffinity(0))
        os.environ["RAYEXEC_CPU_THREADS_PER_WORKER"] = "1"
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                              "|".join(str(cores[i % len(cores)]) for i in range(world)))
        print(f"check mode: RAYEXEC_CPU_THREADS_PER_WORKER=1, VLLM_CPU_OMP_THREADS_BIND="
              f"{os.environ['VLLM_CPU_OMP_THREADS_BIND']}")

    import ray

    from rayexec.group import WorkerGroup
    from rayexec.integrations.vllm import HfTrainerWorker, RayexecExecutor, update_weights
    from rayexec.resources import ResourceConfig

    model = workdir / "tiny-llama"
    build_tiny_llama(model)
    # Logical CPUs for every worker: vLLM's (half a CPU each, as rayexec's vLLM tests
    # run them) and the trainer's, which only works while vLLM waits.
    os.environ.setdefault("RAYEXEC_NUM_DEVICES_PER_WORKER", "0.5")
    ray.init(num_cpus=max(2, world))
    trainer = WorkerGroup.from_config(HfTrainerWorker,
                                      {"model": str(model), "dp": args.dp, "lr": args.lr},
                                      ResourceConfig(num_workers=args.dp, cpus_per_worker=0.1))
    try:
        trainer.run("init_device")
        llm = make_llm(model, args.tp, args.pp, RayexecExecutor)
        ids = generate(llm, args.max_tokens)
        for it in range(1, args.iterations + 1):
            sequences = [p + o for p, o in zip(prompts(), ids)]
            losses = trainer.run("train_step", (sequences,))
            trainer.run("sleep", (1,))  # gradients freed while vLLM works
            start = time.perf_counter()
            report = update_weights(llm, trainer, version=it)
            seconds = time.perf_counter() - start
            new_ids = generate(llm, args.max_tokens)
            print(f"iteration {it}: loss {sum(losses) / len(losses):.4f}, update "
                  f"{seconds * 1000:.0f} ms ({report.bytes / 2**20:.2f} MiB, per vLLM rank "
                  f"{sorted(report.bytes_by_destination_rank.values())} bytes), ids changed: "
                  f"{new_ids != ids}", flush=True)
            ids = new_ids
        if args.check:
            checkpoint = workdir / "trained"
            trainer.run("save", (str(checkpoint),), ranks=[0])
            close(llm)
            reference = make_llm(checkpoint, args.tp, args.pp, "mp")
            expected = generate(reference, args.max_tokens)
            close(reference)
            print(f"check: ids equal a fresh mp engine's from the same weights: "
                  f"{expected == ids}", flush=True)
        else:
            close(llm)
    finally:
        trainer.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
