"""Run one vLLM engine in this process and write what it generated as JSON.

    python tests/vllm/run_engine.py --model DIR --backend rayexec --tp 2 --pp 1 --out out.json

The tests start this script in a subprocess per engine: vLLM spawns processes on
CPU, so engines must never live in the pytest process, and each run must start
from a clean process. `--backend rayexec` passes the class object
`rayexec.integrations.vllm.RayexecExecutor`; any other value is vLLM's own name.

It also records the worker processes' family (workers, their parent, the parent's
other children: Ray's raylet and agents, or vLLM's engine process) and, after
shutdown, which of them are still running (`leftover_pids`).

The same goes for /dev/shm: `leftover_shm` lists the names there after shutdown
that were not there before the engine started.

`--micro-batches N` splits the prompts into N batches (with PP, N steps of real
work are then in flight at once).

In-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0, the token tests'
setting): every prompt is queued before the first step, so the steps' batches do
not depend on when requests reach the engine; `batches` records, per generate,
each step's {prompt index: tokens scheduled}, and `worker_threads` each worker's
torch thread count and cores (what two backends must share to compute the same
bits). With vLLM's default engine process instead, the first step starts as soon
as the first request arrives, and the batches vary from run to run.

`--idle-check` sits idle after the first generate (IDLE_SETTLE_S, then
IDLE_MEASURE_S), records the CPU the worker processes used in the second part
(`idle_worker_cores`, one per worker) and generates again (`token_ids_after_idle`).

`--kill-rank R` checks failure handling instead of generation: after one normal
generate, it kills worker R's process with SIGKILL while no request runs, records
whether (and after how long) the engine declared itself dead without being asked,
and what the next generate raised.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.vllm_engines import micro_batch_settings, prompt_ids  # noqa: E402

# Greedy decoding from fixed token-id prompts: the same on every backend.
PROMPT_LEN = 12
IDLE_SETTLE_S = 2.0  # both backends' workers stop polling after 1 s idle
IDLE_MEASURE_S = 1.0


def worker_pid(worker) -> int:
    return os.getpid()


def worker_process_family(worker, engine_pid: int) -> list[int]:
    """This worker's pid, its parent's (Ray's raylet, or vLLM's engine process)
    and the parent's other children (Ray's agents, the other workers). Only the
    worker when its parent is `engine_pid`, the process running this script (an
    in-process engine core's `mp` workers): that one is still alive at the end."""
    import psutil

    parent = psutil.Process(os.getppid())
    if parent.pid == engine_pid:
        return [os.getpid()]
    return sorted({os.getpid(), parent.pid, *(c.pid for c in parent.children())})


def worker_threads(worker) -> dict:
    """The torch (OpenMP) thread count and the cores of this worker: both backends
    must run every rank with the same ones to compute the same bits."""
    import torch

    return {"threads": torch.get_num_threads(), "cores": sorted(os.sched_getaffinity(0))}


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm"))


def alive(pids: list[int]) -> list[int]:
    import psutil

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in pids if running(p)]


def describe(pid: int) -> str:
    import psutil

    try:
        return f"{pid} {' '.join(psutil.Process(pid).cmdline())[:200]}"
    except psutil.NoSuchProcess:
        return f"{pid} (gone)"


def engine_env(backend: str, tp: int, pp: int, in_process: bool = True) -> dict[str, str]:
    """The environment the vLLM tests start an engine script with:
    - RAY_ADDRESS=local: the engine's Ray is a fresh local one, never another
      cluster that happens to run on this machine;
    - RAYEXEC_NUM_DEVICES_PER_WORKER=0.5: four CPU workers on a 2-core box each
      book half of one logical CPU;
    - one thread per worker on both backends (RAYEXEC_CPU_THREADS_PER_WORKER=1,
      and for `mp` VLLM_CPU_OMP_THREADS_BIND, which vLLM requires with TP or PP > 1);
    - the engine core in this process or in vLLM's engine process (`in_process`)."""
    from benchmarks.vllm_engines import mp_thread_bind

    env = dict(os.environ, RAY_ADDRESS="local", RAYEXEC_NUM_DEVICES_PER_WORKER="0.5",
               RAYEXEC_CPU_THREADS_PER_WORKER="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0" if in_process else "1")
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    if backend == "mp":
        env["VLLM_CPU_OMP_THREADS_BIND"] = mp_thread_bind(tp * pp)
    return env


def make_llm(args, **engine_kwargs):
    """The engine for `args`; `engine_kwargs` go to vLLM's LLM as they are."""
    from vllm import LLM

    backend = args.backend
    if backend == "rayexec":
        from rayexec.integrations.vllm import RayexecExecutor

        backend = RayexecExecutor
    if args.mode == "eager":
        compile_args = {"enforce_eager": True}
    else:
        # One Dynamo trace, run eagerly: no Inductor build, but the start-up
        # warm-up run happens (with enforce_eager, vLLM 0.32's CPU workers skip it
        # and later PP stages then lack their intermediate-tensor buffers).
        compile_args = {"enforce_eager": False,
                        "compilation_config": {"mode": 2, "backend": "eager"}}
    batching = {"max_num_batched_tokens": 256} | micro_batch_settings(
        args.prompts, PROMPT_LEN, args.micro_batches)
    return LLM(
        model=args.model, skip_tokenizer_init=True, seed=0, **compile_args,
        tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
        distributed_executor_backend=backend, max_model_len=128, max_num_seqs=8,
        kv_cache_memory_bytes=32 << 20, **batching, **engine_kwargs,
    )


def generate(llm, count: int, max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids(count, PROMPT_LEN)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def record_batches(llm) -> list[list[dict[int, int]]] | None:
    """Wrap the executor's execute_model to record each step's batch as
    {prompt index: tokens scheduled}; returns the list of generates' lists that
    `generate` appends to. None with vLLM's engine process (the executor lives there)."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # InprocClient's
    if core is None:
        return None
    executor, generates = core.model_executor, [[]]
    execute_model = executor.execute_model

    def recording(scheduler_output, non_block=False):
        generates[-1].append(dict(scheduler_output.num_scheduled_tokens))
        return execute_model(scheduler_output, non_block)

    executor.execute_model = recording
    return generates


def by_prompt(steps: list[dict[str, int]]) -> list[dict[int, int]]:
    """Request ids ("<counter>-<suffix>") as prompt indices within their generate."""
    counters = {rid: int(rid.split("-")[0]) for step in steps for rid in step}
    first = min(counters.values(), default=0)
    return [{counters[rid] - first: n for rid, n in sorted(step.items())} for step in steps]


def idle_worker_cores(llm) -> list[float]:
    """Cores each worker process uses while the engine has nothing to do."""
    from benchmarks.idle_park import cpu_seconds

    pids = llm.collective_rpc(worker_pid)
    time.sleep(IDLE_SETTLE_S)
    before = cpu_seconds(pids)
    time.sleep(IDLE_MEASURE_S)
    return [round((after - b) / IDLE_MEASURE_S, 3) for after, b in zip(cpu_seconds(pids), before)]


def kill_and_watch(llm, rank: int, count: int, max_tokens: int, wait_s: float) -> dict:
    pids = llm.collective_rpc(worker_pid)
    resources = llm.llm_engine.engine_core.resources
    os.kill(pids[rank], signal.SIGKILL)
    killed_at = time.monotonic()
    while not resources.engine_dead and time.monotonic() - killed_at < wait_s:
        time.sleep(0.1)
    report = {"worker_pids": pids, "killed_pid": pids[rank],
              "engine_dead_unprompted": bool(resources.engine_dead),
              "seconds_to_engine_dead": round(time.monotonic() - killed_at, 2)}
    try:
        generate(llm, count, max_tokens)
        report["generate_error"] = None
    except Exception as e:
        report["generate_error"] = f"{type(e).__name__}: {e}"
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="rayexec")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--mode", choices=["eager", "dynamo"], default="eager")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="split the prompts into this many batches (PP: one per stage)")
    parser.add_argument("--idle-check", action="store_true")
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--wait-s", type=float, default=60.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # The collective_rpc calls below send functions to the engine process, which
    # vLLM allows only with pickle-based serialization (a test-only need).
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"

    result: dict = {"backend": args.backend, "tp": args.tp, "pp": args.pp}
    shm_before = shm_names()
    start = time.monotonic()
    llm = make_llm(args)
    result["start_s"] = round(time.monotonic() - start, 2)
    batches = record_batches(llm)
    result["worker_threads"] = llm.collective_rpc(worker_threads)
    result["token_ids"] = generate(llm, args.prompts, args.max_tokens)
    family = sorted({p for ps in llm.collective_rpc(worker_process_family, args=(os.getpid(),))
                     for p in ps})
    if args.idle_check:
        result["idle_worker_cores"] = idle_worker_cores(llm)
        if batches is not None:
            batches.append([])
        result["token_ids_after_idle"] = generate(llm, args.prompts, args.max_tokens)
    if batches is not None:
        result["batches"] = [by_prompt(steps) for steps in batches]
    if args.kill_rank is not None:
        result["kill"] = kill_and_watch(llm, args.kill_rank, args.prompts, args.max_tokens,
                                        args.wait_s)
    # Explicit, so that workers (and a Ray this engine started) are gone before exit.
    llm.llm_engine.engine_core.shutdown()
    deadline = time.monotonic() + 30
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.2)
    result["leftover_pids"] = alive(family)
    result["leftover"] = [describe(p) for p in result["leftover_pids"]]
    result["leftover_shm"] = sorted(shm_names() - shm_before)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
