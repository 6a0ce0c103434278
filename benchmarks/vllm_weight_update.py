"""Seconds per weight update of a vLLM engine, by path, on rayexec's backend and vLLM's `mp`.

    python benchmarks/vllm_weight_update.py                 # tiny and 0.5 GiB Llama, TP=2
    python benchmarks/vllm_weight_update.py --quick         # tiny model, one repeat

Rows (per model; every engine TP=2, engine core in-process, eager):
  collective_rpc/mp       `llm.collective_rpc` into a `worker_extension_cls` method that
                          calls `model_runner.reload_weights(weights_iterator=...)`,
                          the full HF-named state dict passed as the call's argument
                          (each worker keeps its shard), on vLLM's `mp` backend;
  collective_rpc/rayexec  the same call, same weights, on `RayexecExecutor`;
  collective_rpc/*+numpy  the same two with each tensor passed as a numpy view of its
                          bytes (rebuilt as a tensor in the worker): a diagnostic of
                          how much of a path's time is torch's own pickling of tensors
                          (which Ray uses; vLLM's mp queue sends tensor bytes out of
                          band) rather than the executor;
  direct/rayexec          `rayexec.integrations.vllm.update_weights(llm, trainer)`: the
                          weights move from a trainer WorkerGroup (one worker holding the
                          state dict, every name replicated) straight into the vLLM
                          workers; "not available" when that function is not importable;
  weight_transfer/<name>  each engine of vLLM's `weight_transfer_config` registry, with
                          the reason it does not run here (weight_transfer_rows).
Each update flips its engine between two weight sets A (the checkpoint) and B (A plus
noise), and the engine then generates: the ids must differ from A's after B, equal
A's again after A, and equal whatever B's ids were the first time (on either
engine). Paths take turns within a repeat and the order reverses every repeat
(A B C, C B A); a warm-up update per path is not measured; PAUSE_S between turns
lets the engine that just ran stop polling. Seconds are medians; GB/s is the
model's bytes over the seconds (with collective_rpc each of the TP workers receives
all of them).

Both engines keep the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0):
the arguments then go straight to each executor's collective_rpc, which is the
like-for-like comparison (across vLLM's engine-core socket, tensors in a dict do not
arrive as tensors). Threads as in the token tests (docs/vllm-exactness.md): mp's
workers bound one core each, rayexec's one thread each.

Targets (printed as a verdict): collective_rpc on rayexec within 10% of mp's
(median of per-repeat ratios <= 1.10); direct/rayexec at least 2x faster than
collective_rpc/mp on the large model. Writes results/latest/vllm_weight_update.json
(the published run: results/vllm_weight_update.json), prints a table and ends with
one JSON line. Not here: trainer-side costs (optimizer steps,
gathering shards), GPU transports.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

RESULT = ROOT / "results" / "latest" / "vllm_weight_update.json"
TP = 2
# Weights travel in the engine's dtype on every path (the direct path requires it; the
# tiny checkpoint is float32, which vLLM on CPU would serve as bfloat16 anyway).
DTYPE = "bfloat16"
PROMPTS, PROMPT_LEN, MAX_TOKENS = 3, 12, 8
CHILD_TIMEOUT_S = 1800
EXTENSION = "benchmarks.vllm_weight_update.ReloadExtension"
PATHS = ("collective_rpc/mp", "collective_rpc/rayexec", "collective_rpc/mp+numpy",
         "collective_rpc/rayexec+numpy", "direct/rayexec")
RPC_TARGET_RATIO = 1.10  # collective_rpc rayexec / mp, at most
DIRECT_TARGET_SPEEDUP = 2.0  # collective_rpc/mp over direct/rayexec, large model, at least
# A 12-layer Llama with 0.5 GiB of bf16 weights (267M parameters): big enough that
# moving bytes dominates an update, small enough for vLLM's CPU worker to load in
# seconds and for two TP=2 engines plus the trainer to fit in a few GiB.
LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
             num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
             max_position_embeddings=512)
# Why each of vLLM's weight_transfer_config engines cannot run on a CPU-only machine
# (read from vllm/distributed/weight_transfer/); weight_transfer_rows adds what a
# probe on this machine says.
TRANSFER_NEEDS = {
    "nccl": "NCCL broadcast (PyNcclCommunicator) on CUDA streams",
    "sparse_nccl": "NCCL broadcast (PyNcclCommunicator) of sparse patches on CUDA streams",
    "nccl_m2n": "NCCL M2N resharding (PyNcclCommunicator)",
    "ipc": "CUDA IPC handles (torch.cuda, rebuild_cuda_tensor), trainer on the same GPU",
    "sharded_rdt": "Ray Direct Transport over NIXL into CUDA buffers (CUDA streams/events) "
                   "and distributed_executor_backend='ray', which vLLM's CPU platform refuses",
    "modelexpress": "the external ModelExpress package (GPU transfer service)",
}


# ---- inside the engines' workers and the trainer's actor ------------------------------
class ReloadExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): reload the given weights in
    place, re-running vLLM's post-load processing (a bare `model.load_weights` fails
    on CPU, where vLLM has repacked the linear weights)."""

    def bench_reload_weights(self, weights: dict[str, Any]) -> int:
        self.model_runner.reload_weights(
            weights_iterator=((n, as_tensor(v)) for n, v in weights.items()))
        return len(weights)


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


# ---- models ----------------------------------------------------------------------------
def build_large_llama(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LARGE)).to(torch.bfloat16)
    model.save_pretrained(path)


def write_b(model_dir: Path, out: Path, seed: int = 1) -> None:
    """Weights B: A plus noise of A's init scale, so greedy ids change."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    a = load_state(checkpoint_files(model_dir))
    save_file({n: (t.float() + 0.02 * torch.randn(t.shape, generator=gen)).to(t.dtype)
               for n, t in a.items()}, str(out))


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


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.vllm_engines import PAUSE_S

    model = args.model
    weights = {"a": load_state(checkpoint_files(Path(model)), DTYPE),
               "b": load_state([args.b], DTYPE)}
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
        paths = ["collective_rpc/mp", "collective_rpc/rayexec", "collective_rpc/mp+numpy",
                 "collective_rpc/rayexec+numpy"]
        if update is None:
            result["rows"]["direct/rayexec"] = {"status": "not available", "reason": why}
        else:
            trainer = start_trainer(model, args.b)
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
        for r in range(args.repeats):
            for path in (paths if r % 2 == 0 else list(reversed(paths))):
                time.sleep(PAUSE_S)  # the engine that just ran stops polling
                result["rows"][path]["seconds"].append(turn(path))
            print(f"progress: repeat {r + 1}/{args.repeats}: " + ", ".join(
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
    # StateDictTrainer imported by name: run as a script, this module is __main__,
    # which Ray's workers cannot import.
    from benchmarks.vllm_weight_update import StateDictTrainer
    from rayexec import ResourceConfig, WorkerGroup

    return WorkerGroup.from_config(
        StateDictTrainer, {"files": {"a": checkpoint_files(Path(model)), "b": [b]}},
        ResourceConfig(num_workers=1, cpus_per_worker=0.5))


# ---- the parent: models, children, table, verdict ---------------------------------------
def run_model(name: str, model_dir: Path, b: Path, repeats: int) -> dict[str, Any]:
    """run_child in a child process (vLLM spawns processes; each model gets a clean
    one): its result, or {"status": "failed" | "timeout", "error"}."""
    from benchmarks.vllm_engines import root_cause

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", "--model", str(model_dir), "--b", str(b),
               "--repeats", str(repeats), "--out", str(out)]
        # Workers (mp's processes, Ray's actors) import this module by name.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        with open(Path(tmp) / "stderr.txt", "w+") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                    env=env)
            timer = threading.Timer(CHILD_TIMEOUT_S, proc.kill)
            timer.start()
            try:
                for line in proc.stdout:
                    if line.startswith("progress: "):
                        print(f"[{name}] {line[10:]}", end="", flush=True)
                code = proc.wait()
            finally:
                timer.cancel()
            stderr.seek(0)
            errors = stderr.read()
        if code == 0 and out.exists():
            return {"status": "ok", **json.loads(out.read_text())}
        if code == -signal.SIGKILL:
            return {"status": "timeout", "error": f"no result within {CHILD_TIMEOUT_S}s"}
        return {"status": "failed", "error": root_cause(errors)}


def weight_transfer_rows() -> dict[str, dict[str, str]]:
    """Every engine in vLLM's weight_transfer_config registry: whether it can run
    here and why not (its needs, and what a probe on this machine says)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    rows = {}
    for name, load in WeightTransferEngineFactory._registry.items():
        needs = TRANSFER_NEEDS.get(name, "unknown to this benchmark")
        try:
            load()
            probe = probe_transfer(name)
        except ImportError as e:
            probe = f"import fails: {str(e)[:160]}"
        rows[name] = {"status": "not run", "reason": f"needs {needs}; here: {probe}"}
    return rows


def probe_transfer(name: str) -> str:
    if name in ("nccl", "sparse_nccl", "nccl_m2n"):
        try:
            from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

            NCCLLibrary()
        except Exception as e:
            return f"loading NCCL raises {type(e).__name__}: {e}"
    if name == "sharded_rdt":
        try:
            import nixl  # noqa: F401
        except ImportError as e:
            return f"{type(e).__name__}: {e}; torch.cuda.is_available()={torch.cuda.is_available()}"
    return f"torch.cuda.is_available()={torch.cuda.is_available()}"


def summarize(model: dict[str, Any]) -> None:
    """Medians, GB/s and the paired ratios, in place."""
    model["rows"] = rows = {p: model["rows"][p] for p in PATHS if p in model["rows"]}
    for row in rows.values():
        if row.get("status") == "ok" and row["seconds"]:
            s = row["seconds"]
            row.update(median_s=statistics.median(s), min_s=min(s), max_s=max(s),
                       gb_per_s=model["bytes"] / statistics.median(s) / 1e9)
    model["ratios"] = {}
    pairs = {"rpc_rayexec_over_mp": ("collective_rpc/rayexec", "collective_rpc/mp"),
             "rpc_rayexec_over_mp_numpy": ("collective_rpc/rayexec+numpy",
                                           "collective_rpc/mp+numpy"),
             "rpc_mp_over_direct": ("collective_rpc/mp", "direct/rayexec")}
    for key, (num, den) in pairs.items():
        a, b = rows.get(num, {}), rows.get(den, {})
        if "median_s" in a and "median_s" in b:
            by_repeat = [x / y for x, y in zip(a["seconds"], b["seconds"])]
            model["ratios"][key] = {"paired_median": statistics.median(by_repeat),
                                    "by_repeat": by_repeat,
                                    "of_medians": a["median_s"] / b["median_s"]}


def verdict(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, model in doc["models"].items():
        r = model.get("ratios", {}).get("rpc_rayexec_over_mp")
        out.append({"target": f"{name}: collective_rpc rayexec/mp <= {RPC_TARGET_RATIO}",
                    "value": r and r["paired_median"],
                    "status": "not measured" if r is None else
                    "met" if r["paired_median"] <= RPC_TARGET_RATIO else "missed"})
    if "large" in doc["models"]:
        r = doc["models"]["large"].get("ratios", {}).get("rpc_mp_over_direct")
        out.append({"target": f"large: direct >= {DIRECT_TARGET_SPEEDUP}x faster than "
                              "collective_rpc/mp",
                    "value": r and r["paired_median"],
                    "status": "not measured" if r is None else
                    "met" if r["paired_median"] >= DIRECT_TARGET_SPEEDUP else "missed"})
    return out


def table(doc: dict[str, Any]) -> str:
    head = (f"{'model':<6} {'path':<28} {'median s':>9} {'min-max s':>15} {'GB/s':>6} "
            f"{'ids ok':>6}  note")
    lines = [head, "-" * len(head)]
    for name, model in doc["models"].items():
        if model["status"] != "ok":
            lines.append(f"{name:<6} {model['status']}: {model['error'][:100]}")
            continue
        mib = model["bytes"] / 2**20
        for path, row in model["rows"].items():
            if "median_s" not in row:
                lines.append(f"{name:<6} {path:<28} {'-':>9} {'':>15} {'':>6} {'':>6}  "
                             f"{row.get('reason', row['status'])[:110]}")
                continue
            lines.append(f"{name:<6} {path:<28} {row['median_s']:>9.3f} "
                         f"{row['min_s']:>7.3f}-{row['max_s']:<7.3f} {row['gb_per_s']:>6.2f} "
                         f"{row['ids_as_expected']!s:>6}  {mib:.0f} MiB, "
                         f"{len(row['seconds'])} repeats")
        for key, r in model["ratios"].items():
            lines.append(f"{name:<6} {key:<28} paired {r['paired_median']:.2f}, "
                         f"of medians {r['of_medians']:.2f}")
    for engine, row in doc["weight_transfer_engines"].items():
        lines.append(f"{'-':<6} {'weight_transfer/' + engine:<28} {'-':>9}  not run: "
                     f"{row['reason'][:150]}")
    lines.append("verdict: " + "; ".join(
        f"{v['target']}: {v['status']}" + (f" ({v['value']:.2f})" if v["value"] else "")
        for v in doc["verdict"]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.vllm_engines import build_tiny_llama
    from benchmarks.vllm_throughput import versions

    doc: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {"tp": TP, "repeats": args.repeats, "prompts": PROMPTS,
                     "max_tokens": MAX_TOKENS, "engine_core": "in-process",
                     "models": args.models},
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
        "versions": versions(), "models": {},
        "weight_transfer_engines": weight_transfer_rows()}
    builders = {"tiny": build_tiny_llama, "large": build_large_llama}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_dir, b = Path(tmp) / name, Path(tmp) / f"{name}-b.safetensors"
            builders[name](model_dir)
            write_b(model_dir, b)
            print(f"[{name}] model built; starting the engines ...", flush=True)
            doc["models"][name] = model = run_model(name, model_dir, b, args.repeats)
            if model["status"] == "ok":
                summarize(model)
    doc["machine"]["load_avg_at_end"] = os.getloadavg()
    doc["verdict"] = verdict(doc)
    return doc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,large",
                        type=lambda s: [x for x in s.split(",") if x],
                        help="comma-separated, from tiny, large")
    parser.add_argument("--repeats", type=int, default=5, help="measured updates per path")
    parser.add_argument("--quick", action="store_true", help="tiny model, one repeat")
    parser.add_argument("--out", default=str(RESULT))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--b", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.repeats = ["tiny"], 1
    if bad := [m for m in args.models if m not in ("tiny", "large")]:
        parser.error(f"--models {bad}: expected tiny and/or large")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: expected at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        Path(args.out).write_text(json.dumps(run_child(args)))
        return 0
    doc = run(args)
    print(table(doc))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(json.dumps({"vllm_weight_update": {
        name: {p: r.get("median_s", r.get("status")) for p, r in m.get("rows", {}).items()}
        for name, m in doc["models"].items()},
        "verdict": {v["target"]: v["status"] for v in doc["verdict"]}, "result": str(out)}))
    ok = all(m["status"] == "ok" and all(r.get("ids_as_expected", True)
                                         for r in m["rows"].values())
             for m in doc["models"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
