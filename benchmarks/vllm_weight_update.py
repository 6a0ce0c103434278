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
A's again after A, and equal B's ids of that engine's first B (and both engines must
agree: ids_agree_across_engines). Paths take turns within a repeat and the order
reverses every repeat (A B C, C B A); a warm-up update per path is not measured;
PAUSE_S between turns lets the engine that just ran stop polling. Seconds are medians; GB/s is the
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
one JSON line. The engines, the update paths and what runs in the workers live in
weight_update_engines.py. Not here: trainer-side costs (optimizer steps, gathering
shards), GPU transports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.weight_update_engines import (  # noqa: E402
    MAX_TOKENS,
    PATHS,
    PROMPTS,
    TP,
    checkpoint_files,
    load_state,
    run_engines,
)

RESULT = ROOT / "results" / "latest" / "vllm_weight_update.json"
CHILD_TIMEOUT_S = 1800
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


# ---- the parent: models, children, table, verdict ---------------------------------------
def run_model(name: str, model_dir: Path, b: Path, repeats: int) -> dict[str, Any]:
    """run_engines in a child process (vLLM spawns processes; each model gets a clean
    one): its result, or {"status": "failed" | "timeout", "error"}."""
    from benchmarks.vllm_engines import run_child

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", "--model", str(model_dir), "--b", str(b),
               "--repeats", str(repeats), "--out", str(out)]
        # Workers (mp's processes, Ray's actors) import this module by name.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        return run_child(cmd, out, CHILD_TIMEOUT_S, show=f"[{name}] ", env=env)


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
             "rpc_mp_over_direct": ("collective_rpc/mp", "direct/rayexec"),
             # The most any path into rayexec's workers could gain over collective_rpc/mp:
             # vLLM's reload_weights from weights already in the worker, no transfer.
             "rpc_mp_over_reload_only": ("collective_rpc/mp", "reload_only/rayexec")}
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
        Path(args.out).write_text(json.dumps(run_engines(args.model, args.b, args.repeats)))
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
