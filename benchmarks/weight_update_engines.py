"""The engines benchmarks/vllm_weight_update.py measures, run in a child process,
and what runs inside their workers.

Here: the vLLM worker extension that reloads weights (`ReloadExtension`), the trainer
that only holds weights (`StateDictTrainer`), one small function per update path,
the two engines of one model (`mp` and rayexec, TP=2, engine core in this process)
and `run_engines`, which gives every path its turns and checks the ids after each
update. The workers import this module by name, so it imports only torch at the top.
Not here: building models, tables, ratios, the verdict (vllm_weight_update.py).
"""

from __future__ import annotations

import glob
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

TP = 2
# Weights travel in the engine's dtype on every path (the direct path requires it; the
# tiny checkpoint is float32, which vLLM on CPU would serve as bfloat16 anyway).
DTYPE = "bfloat16"
PROMPTS, PROMPT_LEN, MAX_TOKENS = 3, 12, 8
EXTENSION = "benchmarks.weight_update_engines.ReloadExtension"
PATHS = ("collective_rpc/mp", "collective_rpc/rayexec", "collective_rpc/mp+numpy",
         "collective_rpc/rayexec+numpy", "direct/rayexec", "reload_only/rayexec")


# ---- inside the engines' workers and the trainer's actor ------------------------------
class ReloadExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): reload the given weights in
    place, re-running vLLM's post-load processing (a bare `model.load_weights` fails
    on CPU, where vLLM has repacked the linear weights)."""

    def bench_reload_weights(self, weights: dict[str, Any]) -> int:
        self.model_runner.reload_weights(
            weights_iterator=((n, as_tensor(v)) for n, v in weights.items()))
        return len(weights)

    def bench_stash(self, key: str, weights: dict[str, Any]) -> None:
        """Keep a private copy of a weight set in this worker (not timed)."""
        stash = self.__dict__.setdefault("_bench_stash", {})
        stash[key] = {n: as_tensor(v).clone() for n, v in weights.items()}

    def bench_reload_stashed(self, key: str) -> int:
        """reload_weights from a set already in this worker: what any update path pays
        after its transfer (the floor under every row)."""
        return self.bench_reload_weights(self.__dict__["_bench_stash"][key])


def as_arrays(weights: dict[str, torch.Tensor]) -> dict[str, tuple[Any, str]]:
    """Each tensor as (numpy view of its bytes, dtype name): no copy here, and both Ray
    and mp pickle numpy arrays out of band."""
    return {n: (t.contiguous().view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."))
            for n, t in weights.items()}


def as_tensor(value: Any) -> torch.Tensor:
    """A tensor from either form update_by_rpc sends."""
    if isinstance(value, torch.Tensor):
        return value
    array, dtype = value
    with warnings.catch_warnings():
        # The arrays arrive read-only (Ray's object store, mp's shared memory);
        # reload_weights only copies from them.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).view(getattr(torch, dtype))


class StateDictTrainer:
    """A trainer rank that only holds weights: the full HF-named state dicts A and B
    (safetensors files), every name replicated. `select` picks the one it sends."""

    def __init__(self, rank: int, local_rank: int, world_size: int, pp_rank: int,
                 tp_rank: int, distributed_init_method: str, *, files: dict[str, list[str]]
                 ) -> None:
        self.sets = {key: load_state(paths, DTYPE) for key, paths in files.items()}
        self.current = next(iter(self.sets))

    def select(self, key: str) -> None:
        if key not in self.sets:
            raise ValueError(f"StateDictTrainer.select({key!r}): have {sorted(self.sets)}")
        self.current = key

    def weight_shards(self) -> dict[str, tuple[torch.Tensor, Any]]:
        from rayexec.weights.plan import WeightSpec
        from rayexec.weights.transport import dtype_name

        return {n: (t, WeightSpec(tuple(t.shape), dtype_name(t.dtype)))
                for n, t in self.sets[self.current].items()}


def load_state(paths: list[str], dtype: str | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in paths:
        state.update(load_file(path))
    if dtype is not None:
        state = {n: t.to(getattr(torch, dtype)) for n, t in state.items()}
    return state


# ---- the update paths (one small function each) ---------------------------------------
def update_by_rpc(llm: Any, weights: dict[str, Any]) -> None:
    """vLLM's documented way on any backend: every worker gets the whole dict."""
    llm.collective_rpc("bench_reload_weights", args=(weights,))


def direct_update_fn() -> tuple[Any, str]:
    """rayexec's direct path, or None and why it is not available."""
    try:
        from rayexec.integrations.vllm import update_weights
    except (ImportError, AttributeError) as e:
        return None, f"not available: {type(e).__name__}: {e}"
    return update_weights, ""


def checkpoint_files(model_dir: Path) -> list[str]:
    return sorted(glob.glob(str(model_dir / "*.safetensors")))


# ---- the child: both engines of one model, taking turns ----------------------------------
def make_engine(backend: str, model: str) -> tuple[Any, float]:
    from vllm import LLM

    from benchmarks.vllm_engines import backend_env, environ

    executor: Any = backend
    if backend == "rayexec":
        from rayexec.integrations.vllm import RayexecExecutor

        executor = RayexecExecutor
    env = backend_env(backend, TP, dict(os.environ))
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", RAYEXEC_CPU_THREADS_PER_WORKER="1")
    start = time.perf_counter()
    with environ(env):
        llm = LLM(model=model, skip_tokenizer_init=True, seed=0, enforce_eager=True, dtype=DTYPE,
                  tensor_parallel_size=TP, distributed_executor_backend=executor,
                  worker_extension_cls=EXTENSION, max_model_len=64, max_num_seqs=PROMPTS,
                  kv_cache_memory_bytes=32 << 20)
    return llm, time.perf_counter() - start


def generate(llm: Any) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from benchmarks.vllm_engines import prompt_ids

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p)
                            for p in prompt_ids(PROMPTS, PROMPT_LEN)], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


class Turns:
    """Per engine: which weight set it holds, and the ids each set gave it first."""

    def __init__(self) -> None:
        self.holds: dict[str, str] = {}
        self.ids: dict[tuple[str, str], list[list[int]]] = {}

    def check(self, engine: str, ids: list[list[int]]) -> bool:
        """These ids (just generated) are what `engine`'s current set gave before."""
        return ids == self.ids.setdefault((engine, self.holds[engine]), ids)

    def changed(self, engine: str) -> bool:
        return self.ids[(engine, "a")] != self.ids.get((engine, "b"), self.ids[(engine, "a")])

    def agree(self) -> bool:
        """Both engines generated the same ids from each set (exact settings)."""
        return all(self.ids.get(("mp", s)) == self.ids.get(("rayexec", s)) for s in "ab")


def run_engines(model: str, b: str, repeats: int) -> dict[str, Any]:
    """Both engines of the checkpoint `model` (weight set A; B in the file `b`), every
    update path's warm-up and `repeats` turns: the per-path rows, unsummarized."""
    from benchmarks.vllm_engines import PAUSE_S

    weights = {"a": load_state(checkpoint_files(Path(model)), DTYPE),
               "b": load_state([b], DTYPE)}
    arrays = {key: as_arrays(state) for key, state in weights.items()}
    result: dict[str, Any] = {"bytes": sum(t.numel() * t.element_size()
                                           for t in weights["a"].values()),
                              "params": sum(t.numel() for t in weights["a"].values()),
                              "engines": {}, "rows": {}}
    engines: dict[str, Any] = {}
    trainer = None
    turns = Turns()
    try:
        for backend in ("mp", "rayexec"):
            engines[backend], start_s = make_engine(backend, model)
            result["engines"][backend] = {"start_s": round(start_s, 2)}
            turns.holds[backend] = "a"
            turns.check(backend, generate(engines[backend]))
            print(f"progress: {backend} engine started in {start_s:.1f} s", flush=True)
        update, why = direct_update_fn()
        for key, state in weights.items():
            engines["rayexec"].collective_rpc("bench_stash", args=(key, state))
        paths = ["collective_rpc/mp", "collective_rpc/rayexec", "collective_rpc/mp+numpy",
                 "collective_rpc/rayexec+numpy", "reload_only/rayexec"]
        if update is None:
            result["rows"]["direct/rayexec"] = {"status": "not available", "reason": why}
        else:
            trainer = start_trainer(model, b)
            paths.append("direct/rayexec")
        version = 0

        def turn(path: str) -> float:
            nonlocal version
            engine = engine_of(path)
            target = "b" if turns.holds[engine] == "a" else "a"
            version += 1
            if path == "direct/rayexec":
                trainer.run("select", (target,))
                t0 = time.perf_counter()
                update(engines[engine], trainer, version=version)
            elif path == "reload_only/rayexec":
                t0 = time.perf_counter()
                engines[engine].collective_rpc("bench_reload_stashed", args=(target,))
            else:
                t0 = time.perf_counter()
                update_by_rpc(engines[engine], (arrays if "+numpy" in path else weights)[target])
            seconds = time.perf_counter() - t0
            turns.holds[engine] = target
            row = result["rows"].setdefault(path, {"status": "ok", "seconds": [], "checks": 0,
                                                   "ids_as_expected": True})
            row["checks"] += 1
            row["ids_as_expected"] &= turns.check(engine, generate(engines[engine]))
            return seconds

        for path in paths:  # warm-up, not measured
            turn(path)
        for r in range(repeats):
            for path in (paths if r % 2 == 0 else list(reversed(paths))):
                time.sleep(PAUSE_S)  # the engine that just ran stops polling
                result["rows"][path]["seconds"].append(turn(path))
            print(f"progress: repeat {r + 1}/{repeats}: " + ", ".join(
                f"{p} {result['rows'][p]['seconds'][-1]:.3f} s" for p in paths), flush=True)
        for path in paths:
            result["rows"][path]["ids_changed"] = turns.changed(engine_of(path))
        result["ids_agree_across_engines"] = turns.agree()
    finally:
        if trainer is not None:
            trainer.shutdown()
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()
    return result


def engine_of(path: str) -> str:
    return path.split("/")[1].split("+")[0]


def start_trainer(model: str, b: str) -> Any:
    from rayexec import ResourceConfig, WorkerGroup

    return WorkerGroup.from_config(
        StateDictTrainer, {"files": {"a": checkpoint_files(Path(model)), "b": [b]}},
        ResourceConfig(num_workers=1, cpus_per_worker=0.5))
