"""vLLM throughput with rayexec's backend vs vLLM's own backends, same model and load.

    python benchmarks/vllm_throughput.py                       # tiny Llama, TP=2 and PP=2
    python benchmarks/vllm_throughput.py --layouts tp2,pp2,tp2xpp2 --max-tokens 128

For each layout and backend one engine runs in its own process (vLLM spawns
processes on CPU; engines never share one): `rayexec` (the class
`rayexec.integrations.vllm.RayexecExecutor`), vLLM's `mp`, and vLLM's own Ray
backends `ray` (compiled-graph executor) and `ray-v2` (VLLM_USE_RAY_V2_EXECUTOR_BACKEND=1),
which vLLM's CPU platform refuses; their refusal is recorded, not hidden.
`rayexec-rpc` (not run by default) is rayexec with RAYEXEC_FORWARD=rpc: steps as
plain Ray actor calls instead of the compiled DAG.

Per engine: start time (the `LLM(...)` constructor), one warm-up generate (not
measured), time to first token (a generate with max_tokens=1 over the whole batch:
prefill plus one step) and generated tokens/s (the whole batch with greedy sampling
and ignore_eos), each --repeats times. Every backend runs --rounds engines per layout
in alternating order (A B, B A, ...), because on a shared machine the load drifts
between engines; the table shows medians over all rounds and the range. Token ids
must agree across backends and rounds; a mismatch fails the run. With PP > 1 the
prompts are split into PP micro-batches by default (--micro-batches), so that
every stage has a batch in flight, which is how PP serving runs; --micro-batches 1
measures one batch going through the stages one after another.

"vs mp" divides the pooled medians; "paired" is the median over rounds of each
round's tokens/s over mp's in the same round, with a bootstrap 90% interval over
rounds: the load on a shared machine drifts between rounds more than between the
two engines of one round, so the paired ratio is the sharper comparison, and the
interval says whether the rounds resolve a difference at all.

Prints a table, writes results/vllm_throughput.json and ends with one JSON line.
Not here: accuracy, serving latency under load (`vllm bench serve` does that).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BACKENDS = ("rayexec", "mp", "ray", "ray-v2", "rayexec-rpc")
DEFAULT_BACKENDS = ("rayexec", "mp", "ray", "ray-v2")
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2xpp2": (2, 2)}
RESULT = Path(__file__).resolve().parent.parent / "results" / "vllm_throughput.json"
CHILD_TIMEOUT_S = 900


# ---- the model -------------------------------------------------------------------------
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


# ---- one engine (child process) ----------------------------------------------------------
def run_child(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    backend: Any = {"ray-v2": "ray"}.get(args.backend, args.backend)
    if backend.startswith("rayexec"):
        from rayexec.integrations.vllm import RayexecExecutor

        backend = RayexecExecutor
    # In eager mode vLLM 0.32's mp backend fails with PP > 1 on CPU (later stages
    # lack their receive buffers), so PP layouts use one Dynamo trace run eagerly
    # (no Inductor build) for every backend alike.
    mode = ({"enforce_eager": True} if args.pp == 1 else
            {"enforce_eager": False, "compilation_config": {"mode": 2, "backend": "eager"}})
    start = time.perf_counter()
    llm = LLM(model=args.model, skip_tokenizer_init=True, seed=0, **mode,
              tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
              distributed_executor_backend=backend, max_model_len=args.prompt_len +
              args.max_tokens + 8, max_num_seqs=args.prompts,
              **micro_batch_settings(args.prompts, args.prompt_len, args.micro_batches),
              kv_cache_memory_bytes=64 << 20)
    start_s = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids(args.prompts,
                                                                     args.prompt_len)]

    def generate(max_tokens: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outputs]

    generate(args.max_tokens)  # warm-up, not measured
    ttft = [generate(1)[0] for _ in range(args.repeats)]
    runs = [generate(args.max_tokens) for _ in range(args.repeats)]
    tokens = sum(len(t) for t in runs[-1][1])
    llm.llm_engine.engine_core.shutdown()
    return {"start_s": start_s, "ttft_s": ttft, "tokens_per_s": [tokens / s for s, _ in runs],
            "generated_tokens": tokens, "token_ids": runs[-1][1],
            "load_avg_1min": os.getloadavg()[0]}


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


# ---- the comparison (parent process) --------------------------------------------------
def child_env(backend: str, world_size: int) -> dict[str, str]:
    env = dict(os.environ)
    # A fresh local Ray for each engine, never a cluster that happens to run here;
    # such a Ray has the machine's CPUs, so CPU workers book half of one each.
    env.setdefault("RAY_ADDRESS", "local")
    env.setdefault("RAYEXEC_NUM_DEVICES_PER_WORKER", "0.5")
    env.pop("VLLM_USE_RAY_V2_EXECUTOR_BACKEND", None)
    if backend == "ray-v2":
        env["VLLM_USE_RAY_V2_EXECUTOR_BACKEND"] = "1"
    if backend == "rayexec-rpc":  # steps as plain Ray actor calls instead of the DAG
        env["RAYEXEC_FORWARD"] = "rpc"
    if backend == "mp" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = mp_thread_bind(world_size)
    return env


def mp_thread_bind(world_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for vLLM's mp backend, which needs one core list per
    local worker with TP or PP > 1: round-robin over this process's cores."""
    cores = sorted(os.sched_getaffinity(0))
    return "|".join(str(cores[i % len(cores)]) for i in range(world_size))


def run_engine(args: argparse.Namespace, model: Path, backend: str, tp: int,
               pp: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", "--backend", backend, "--model", str(model),
               "--tp", str(tp), "--pp", str(pp), "--out", str(out)] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("prompts", "prompt_len", "max_tokens", "repeats")] + [
            f"--micro-batches={args.micro_batches or pp}"]  # default: a batch per stage
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=child_env(backend, tp * pp), capture_output=True,
                                  text=True, timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"no result within {CHILD_TIMEOUT_S}s"}
        if proc.returncode == 0 and out.exists():
            return {"status": "ok", **json.loads(out.read_text())}
        return {"status": "failed", "wall_s": time.perf_counter() - t0,
                "error": _root_cause(proc.stderr)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One backend's engines of one layout (one per round) in one row: medians over
    every measured generate, the spread, and each round's median (to show drift)."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return {k: v for k, v in runs[0].items() if k in ("status", "error")}
    rates = [x for r in ok for x in r["tokens_per_s"]]
    ids = [r["token_ids"] for r in ok]
    return {
        "status": "ok" if len(ok) == len(runs) else f"{len(runs) - len(ok)} round(s) failed",
        "tokens_per_s": statistics.median(rates), "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "tokens_per_s_by_round": [statistics.median(r["tokens_per_s"]) for r in ok],
        "ttft_s": statistics.median(x for r in ok for x in r["ttft_s"]),
        "start_s": statistics.median(r["start_s"] for r in ok),
        "load_avg_1min_by_round": [r["load_avg_1min"] for r in ok],
        "generated_tokens": ok[0]["generated_tokens"],
        "token_ids": ids[0], "same_ids_every_round": all(i == ids[0] for i in ids),
        "errors": [r["error"] for r in runs if r["status"] != "ok"],
    }


def layout_name(tp: int, pp: int) -> str:
    return next(name for name, shape in LAYOUTS.items() if shape == (tp, pp))


def run_layout(args: argparse.Namespace, model: Path, tp: int, pp: int) -> dict[str, Any]:
    """Every backend, `rounds` times, alternating the order (A B, B A, ...) so that
    a change in the machine's load hits the backends alike. A backend that fails
    (vLLM's Ray backends on CPU) is not retried."""
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in args.backends}
    for round_index in range(args.rounds):
        order = args.backends if round_index % 2 == 0 else list(reversed(args.backends))
        for backend in order:
            if runs[backend] and all(r["status"] != "ok" for r in runs[backend]):
                continue
            print(f"[{layout_name(tp, pp)} round {round_index + 1}/{args.rounds}] {backend}: "
                  "starting an engine ...", flush=True)
            run = run_engine(args, model, backend, tp, pp)
            runs[backend].append(run)
            if run["status"] == "ok":
                print(f"  {statistics.median(run['tokens_per_s']):.0f} tok/s, start "
                      f"{run['start_s']:.1f} s", flush=True)
            else:
                print(f"  {run['status']}: {run['error'][:120]}", flush=True)
    summary = {b: summarize(r) for b, r in runs.items()}
    if "mp" in runs:
        for backend, rows in runs.items():
            if backend != "mp" and "tokens_per_s" in summary[backend]:
                summary[backend]["vs_mp"] = paired_ratio(rows, runs["mp"])
    return summary


def paired_ratio(runs: list[dict[str, Any]], baseline: list[dict[str, Any]],
                 resamples: int = 2000) -> dict[str, Any]:
    """tokens/s over the baseline's, round by round (each round's two engines ran
    one after the other, so they saw about the same machine), with the median over
    rounds and a bootstrap 90% interval of that median (resampling rounds). The
    interval says what the rounds can resolve: "at least the baseline" is shown only
    when its lower end is at least 1."""
    ratios = [statistics.median(r["tokens_per_s"]) / statistics.median(b["tokens_per_s"])
              for r, b in zip(runs, baseline) if r["status"] == b["status"] == "ok"]
    if not ratios:
        return {"by_round": []}
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios)))
                     for _ in range(resamples))
    return {"by_round": ratios, "median": statistics.median(ratios),
            "ci90": [medians[int(0.05 * resamples)], medians[int(0.95 * resamples) - 1]]}


def _root_cause(stderr: str) -> str:
    """The most telling error line of a failed engine's output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for marker in ("ValueError:", "NotImplementedError:", "RuntimeError:", "Error:"):
        hits = [line for line in lines if marker in line]
        if hits:
            return hits[0][-400:]
    return lines[-1][-400:] if lines else "no output"


def compare_tokens(results: dict[str, dict[str, Any]]) -> bool | None:
    """True when every backend that ran generated the same ids in every round
    (None: fewer than two backends ran)."""
    ran = [r for r in results.values() if "token_ids" in r]
    if len(ran) < 2:
        return None
    return all(r["same_ids_every_round"] and r["token_ids"] == ran[0]["token_ids"]
               for r in ran)


def table(doc: dict[str, Any]) -> str:
    head = (f"{'layout':<8} {'backend':<11} {'start s':>8} {'TTFT ms':>8} {'tok/s':>8} "
            f"{'(min-max)':>14} {'vs mp':>6} {'paired (90% CI)':>18}  by round")
    lines = [head, "-" * len(head)]
    for layout, row in doc["layouts"].items():
        mp_rate = row["backends"].get("mp", {}).get("tokens_per_s")
        for name, r in row["backends"].items():
            if "tokens_per_s" not in r:
                lines.append(f"{layout:<8} {name:<11} {'-':>8} {'-':>8} {'-':>8} {'':>14} "
                             f"{'':>6} {'':>18}  {r['status']}: {r['error'][:90]}")
                continue
            ratio = f"{r['tokens_per_s'] / mp_rate:.2f}" if mp_rate else "-"
            spread = f"({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f})"
            rounds = " ".join(f"{x:.0f}" for x in r["tokens_per_s_by_round"])
            paired = r.get("vs_mp", {})
            paired_text = (f"{paired['median']:.2f} ({paired['ci90'][0]:.2f}-"
                           f"{paired['ci90'][1]:.2f})" if "median" in paired else "-")
            lines.append(f"{layout:<8} {name:<11} {r['start_s']:>8.1f} {r['ttft_s'] * 1e3:>8.1f} "
                         f"{r['tokens_per_s']:>8.0f} {spread:>14} {ratio:>6} {paired_text:>18}  "
                         f"{rounds}")
        lines.append(f"{'':<8} token ids agree: {row['tokens_agree']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else Path(tmp) / "tiny-llama"
        if not args.model:
            build_tiny_llama(model)
        doc: dict[str, Any] = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
                        "python": platform.python_version()},
            "versions": versions(),
            "settings": {k: getattr(args, k) for k in
                         ("prompts", "prompt_len", "max_tokens", "repeats", "rounds")}
            | {"micro_batches": args.micro_batches or "PP size"},
            "model": args.model or "tiny random Llama (4 layers, hidden 256, vocab 4096)",
            "layouts": {},
        }
        for layout in args.layouts:
            tp, pp = LAYOUTS[layout]
            results = run_layout(args, model, tp, pp)
            doc["layouts"][layout] = {"tp": tp, "pp": pp, "backends": results,
                                      "tokens_agree": compare_tokens(results)}
            print(f"done {layout}: " + ", ".join(
                f"{b}={r.get('tokens_per_s', r['status'])}" for b, r in results.items()),
                flush=True)
        doc["machine"]["load_avg_at_end"] = os.getloadavg()
    return doc


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("vllm-cpu", "vllm", "ray", "torch", "rayexec"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: build a tiny Llama)")
    parser.add_argument("--layouts", default="tp2,pp2",
                        type=lambda s: [x for x in s.split(",") if x],
                        help=f"comma-separated, from {sorted(LAYOUTS)}")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        type=lambda s: [x for x in s.split(",") if x],
                        help=f"comma-separated, from {list(BACKENDS)}")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="measured generates per engine")
    parser.add_argument("--micro-batches", type=int, default=0,
                        help="batches the prompts are split into (default: the layout's PP "
                             "size, so that every pipeline stage has one; 1: one batch)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="engines per backend and layout, in alternating order")
    parser.add_argument("--out", default=str(RESULT))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="rayexec", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bad = [x for x in args.layouts if x not in LAYOUTS] + [
        x for x in args.backends if x not in BACKENDS]
    if bad:
        parser.error(f"unknown layout/backend {bad}; layouts: {sorted(LAYOUTS)}, "
                     f"backends: {list(BACKENDS)}")
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
    summary = {layout: {b: r.get("tokens_per_s") for b, r in row["backends"].items()}
               | {"tokens_agree": row["tokens_agree"]} for layout, row in doc["layouts"].items()}
    print(json.dumps({"vllm_throughput": summary, "result": str(out)}))
    return 0 if all(row["tokens_agree"] is not False for row in doc["layouts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
