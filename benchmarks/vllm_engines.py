"""The vLLM engines that benchmarks/vllm_throughput.py measures, run in a child process.

Here: the tiny model, the prompts, the environment and settings of an engine per
backend, and the two ways a child process runs engines:
- `run_one` (--mode separate): one engine, one backend; a warm-up generate, then
  --repeats generates of one token (time to first token) and --repeats of
  --max-tokens (tokens/s).
- `run_interleaved` (--mode interleaved): every backend's engine open in this one
  process at once, taking turns. Each round gives every backend (in alternating
  order) a turn: a pause of PAUSE_S, a warm-up generate, then the same generates as
  `run_one`. The pause is longer than the 1 s after which both vLLM's `mp` workers
  and rayexec's parked workers stop polling, so the engine that waits takes no CPU
  from the one that runs; and turns a few seconds apart see about the same machine,
  where engines started minutes apart do not.
Not here: comparing backends, tables and files (vllm_throughput.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PAUSE_S = 1.5
PROGRESS = "progress: "  # lines the parent shows among vLLM's own output


def build_tiny_llama(path: Path) -> None:
    """A random-weight 4-layer Llama (no hub access); the vLLM tests use it too."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=4096,
                         max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(path)


def prompt_ids(count: int, length: int) -> list[list[int]]:
    return [[(37 * i + 11 * j) % 4000 + 5 for j in range(length)] for i in range(count)]


def micro_batch_settings(prompts: int, prompt_len: int, micro_batches: int) -> dict[str, int]:
    """vLLM engine settings that split `prompts` prompts of `prompt_len` tokens into
    `micro_batches` batches (the vLLM tests use this too).

    vLLM keeps up to PP batches in flight, but a request already in flight is not
    scheduled again, so one batch of every request leaves all but one stage idle.
    A token budget of one micro-batch's prompts splits the prefill into
    `micro_batches` batches of prompts / micro_batches requests; decode then keeps
    them apart (each batch is rescheduled when its own step returns), so with
    micro_batches = PP every stage has a batch to work on, as PP serving runs."""
    if micro_batches <= 1:
        return {}
    per_batch = -(-prompts // micro_batches)
    return {"max_num_batched_tokens": per_batch * prompt_len}


def mp_thread_bind(world_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for vLLM's mp backend, which needs one core list per
    local worker with TP or PP > 1: round-robin over this process's cores."""
    cores = sorted(os.sched_getaffinity(0))
    return "|".join(str(cores[i % len(cores)]) for i in range(world_size))


def backend_env(backend: str, world_size: int, base: dict[str, str]) -> dict[str, str]:
    """The environment an engine of `backend` starts with (vLLM's engine process and
    workers inherit it), from `base`."""
    env = dict(base)
    # A fresh local Ray for each engine, never a cluster that happens to run here;
    # such a Ray has the machine's CPUs, so CPU workers book half of one each.
    env.setdefault("RAY_ADDRESS", "local")
    env.setdefault("RAYEXEC_NUM_DEVICES_PER_WORKER", "0.5")
    env.pop("VLLM_USE_RAY_V2_EXECUTOR_BACKEND", None)
    env.pop("RAYEXEC_FORWARD", None)
    if backend == "ray-v2":
        env["VLLM_USE_RAY_V2_EXECUTOR_BACKEND"] = "1"
    if backend == "rayexec-rpc":  # steps as plain Ray actor calls instead of the DAG
        env["RAYEXEC_FORWARD"] = "rpc"
    if backend == "mp" and "VLLM_CPU_OMP_THREADS_BIND" not in base:
        env["VLLM_CPU_OMP_THREADS_BIND"] = mp_thread_bind(world_size)
    return env


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """os.environ is `env` inside (for the processes an engine spawns), as before after."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def root_cause(stderr: str) -> str:
    """The most telling error line of a failed engine's output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for marker in ("ValueError:", "NotImplementedError:", "RuntimeError:", "Error:"):
        hits = [line for line in lines if marker in line]
        if hits:
            return hits[0][-400:]
    return lines[-1][-400:] if lines else "no output"

def run_child(cmd: list[str], out: Path, timeout: float, show: str = "",
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a benchmark child that writes its JSON result to `out`, showing only its
    progress lines (prefixed with `show`), killed after `timeout` s: the result, or
    {"status": "failed" | "timeout", "error"}."""
    import json
    import signal
    import subprocess
    import threading

    with open(out.with_name(out.name + ".stderr"), "w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:  # vLLM's logs; only the progress lines are shown
                if line.startswith(PROGRESS):
                    print(show + line[len(PROGRESS):], end="", flush=True)
            code = proc.wait()
        finally:
            timer.cancel()
        stderr.seek(0)
        errors = stderr.read()
    if code == 0 and out.exists():
        return {"status": "ok", **json.loads(out.read_text())}
    if code == -signal.SIGKILL:
        return {"status": "timeout", "error": f"no result within {timeout}s"}
    return {"status": "failed", "error": root_cause(errors)}



@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """File descriptor 2 goes to `path` inside, and with it the stderr of every
    process started inside (vLLM's engine process reports why it failed there)."""
    sys.stderr.flush()
    saved, fd = os.dup(2), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(fd)
        os.close(saved)


class Engine:
    """One backend's `LLM` with the benchmark's settings and load."""

    def __init__(self, backend: str, args: Any) -> None:
        from vllm import LLM

        executor: Any = {"ray-v2": "ray"}.get(backend, backend)
        if backend.startswith("rayexec"):
            from rayexec.integrations.vllm import RayexecExecutor

            executor = RayexecExecutor
        # In eager mode vLLM 0.32's mp backend fails with PP > 1 on CPU (later stages
        # lack their receive buffers), so PP layouts use one Dynamo trace run eagerly
        # (no Inductor build) for every backend alike.
        mode = ({"enforce_eager": True} if args.pp == 1 else
                {"enforce_eager": False, "compilation_config": {"mode": 2, "backend": "eager"}})
        self.args = args
        start = time.perf_counter()
        with environ(backend_env(backend, args.tp * args.pp, dict(os.environ))):
            self.llm = LLM(model=args.model, skip_tokenizer_init=True, seed=0, **mode,
                           tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
                           distributed_executor_backend=executor,
                           max_model_len=args.prompt_len + args.max_tokens + 8,
                           max_num_seqs=args.prompts,
                           **micro_batch_settings(args.prompts, args.prompt_len,
                                                  args.micro_batches),
                           kv_cache_memory_bytes=64 << 20)
        self.start_s = time.perf_counter() - start

    def generate(self, max_tokens: int) -> tuple[float, list[list[int]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=p)
                   for p in prompt_ids(self.args.prompts, self.args.prompt_len)]
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outputs]

    def measure(self) -> dict[str, Any]:
        """A warm-up generate (not measured), then --repeats TTFT and tokens/s runs."""
        self.generate(self.args.max_tokens)
        ttft = [self.generate(1)[0] for _ in range(self.args.repeats)]
        runs = [self.generate(self.args.max_tokens) for _ in range(self.args.repeats)]
        tokens = sum(len(t) for t in runs[-1][1])
        return {"ttft_s": ttft, "tokens_per_s": [tokens / s for s, _ in runs],
                "generated_tokens": tokens, "token_ids": runs[-1][1],
                "load_avg_1min": os.getloadavg()[0]}

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def run_one(args: Any) -> dict[str, Any]:
    engine = Engine(args.backend, args)
    try:
        return {"start_s": engine.start_s, **engine.measure()}
    finally:
        engine.close()


def run_interleaved(args: Any) -> dict[str, Any]:
    """{backend: {"status", "start_s", "rounds": [one `measure()` per round]} or
    {"status": "failed", "error"}} for every backend in args.backends."""
    engines: dict[str, Engine] = {}
    results: dict[str, dict[str, Any]] = {}
    logs = tempfile.TemporaryDirectory()
    try:
        for backend in args.backends:
            log = Path(logs.name) / f"{backend}.stderr"
            try:
                with stderr_to(log):
                    engines[backend] = Engine(backend, args)
            except Exception as e:  # vLLM's Ray backends refuse the CPU platform
                # The exception only says "see root cause above": in the engine's log.
                results[backend] = {"status": "failed", "error": root_cause(
                    log.read_text(errors="replace") + f"\n{type(e).__name__}: {e}")}
                continue
            results[backend] = {"status": "ok", "start_s": engines[backend].start_s,
                                "rounds": []}
            print(f"{PROGRESS}  {backend}: engine started in {engines[backend].start_s:.1f} s",
                  flush=True)
        for round_index in range(args.rounds):
            order = list(engines) if round_index % 2 == 0 else list(reversed(engines))
            for backend in order:
                time.sleep(PAUSE_S)  # the engine that just ran stops polling
                try:
                    result = engines[backend].measure()
                except Exception as e:
                    results[backend] = {"status": "failed",
                                        "error": f"{type(e).__name__}: {e}"}
                    engines.pop(backend).close()
                    continue
                results[backend]["rounds"].append(result)
                print(f"{PROGRESS}  round {round_index + 1}/{args.rounds} {backend}: "
                      f"{sorted(result['tokens_per_s'])[len(result['tokens_per_s']) // 2]:.0f} "
                      "tok/s", flush=True)
    finally:
        for engine in engines.values():
            engine.close()
        logs.cleanup()
    return results
