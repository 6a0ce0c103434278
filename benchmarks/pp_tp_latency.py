"""pp_tp_latency: what one forward step costs through rayexec's compiled DAG, next to
plain Ray calls, a no-Ray shared-memory floor and the compute alone, across PP x TP
layouts, payloads and channels, measured side by side in one run.

    python benchmarks/pp_tp_latency.py                       # the full grid (minutes)
    python benchmarks/pp_tp_latency.py --quick               # a smoke run
    python benchmarks/pp_tp_latency.py --pp 2 --tp 2 --payloads 4k,1m --modes dag,rpc,floor

Modes (runners.py): dag, bare (plain Ray, no rayexec code), rpc, floor, local.
Workloads: echo (a tensor of each
payload size passed through every stage; echo_worker.py) and model (the reference
decoder's decode step, batch 8). Each configuration is warmed up, then timed step by
step; the records give median / p90 / p99, steps/s and, for echo, MB/s. Prints a
table and a verdict (what each target means, met or not, and why not), writes
results/latest/pp_tp_latency.json (git-ignored: a run changes no tracked file; the
published run is results/pp_tp_latency.json) and a .png next to it when matplotlib
is importable, and ends with one machine-readable line.

Ray: a private local cluster (never another program's running on the same machine)
unless RAY_ADDRESS names one. rayexec's workers run at niceness 0 (it sets
RAY_worker_niceness in their runtime env; Ray's default is 15), and the floor's
processes at the niceness measured in such a worker, so priorities match. On a
machine shared with other work, --repeat N runs the plan N times and pools the
steps, so that load drifting over time weighs on every mode.

Not here: the modes themselves (runners.py, floor.py) or the formatting (report.py).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable as a package
    sys.path.insert(0, str(ROOT))

from benchmarks import echo_worker, report  # noqa: E402
from benchmarks.bare import VARIANTS as BARE_VARIANTS  # noqa: E402
from benchmarks.runners import (  # noqa: E402
    MODES,
    WORKLOADS,
    Settings,
    Workload,
    merge_rounds,
    run_configuration,
)
from benchmarks.soak import object_store_mb  # noqa: E402

logger = logging.getLogger("pp_tp_latency")

DEFAULT_OUT = ROOT / "results" / "latest" / "pp_tp_latency.json"
FULL = {"pp": [1, 2, 4], "tp": [1, 2], "payloads": [4 << 10, 64 << 10, 1 << 20, 16 << 20],
        "iters": 300, "warmup": 20, "max_seconds": 3.0, "repeat": 1}
# --quick: enough warm-up after each fresh compile for the first steps' outliers to
# pass (30 timed steps after 5 warm-up ones gave dag 2.56 ms at PP=2 x TP=1, 4 KiB, where
# 300 steps alone gave 0.32 ms), and two passes in opposite mode order (ABBA), because a
# graph torn down earlier in the driver process inflates the next mode's tail.
QUICK = {"pp": [2], "tp": [1, 2], "payloads": [4 << 10, 64 << 10, 1 << 20],
         "iters": 100, "warmup": 30, "max_seconds": 1.0, "repeat": 2}
UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
         "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20}
# Cheap modes first, so a cell's Ray-free references are in before the Ray runs.
MODE_ORDER = ("local", "floor", "rpc", "bare", "dag")
# A cell takes about a minute at most here, setup included; one still running after
# this prints its threads' stacks (a stall then says where it sits).
CELL_STACKS_AFTER_S = 300.0
# Ray 2.60 never frees a torn-down compiled graph's channel buffers (ray-project/ray
# #43836): a PP=2 x TP=2 executor leaves about 108 MiB in the object store, and a full
# run here had 5.5 of 7.4 GB in use by its 39th configuration, after which the driver
# sat for minutes in the kernel (mmap and madvise waiting on its memory map; every
# stall came late in a full run). So before each configuration that uses Ray, an
# embedded Ray whose store is more than this full is restarted (a few seconds; listed
# in the JSON).
STORE_RESTART_FRACTION = 0.4


def parse_size(text: str) -> int:
    """'4k' -> 4096, '1m' -> 1048576 (binary units), '100' -> 100."""
    t = text.strip().lower()
    digits = t.rstrip("kmib")
    try:
        value = int(digits) * UNITS[t[len(digits):]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"payload {text!r} is not a size; use bytes or k/m suffixes, e.g. 4k,1m,16m"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"payload {text!r} must be at least 1 byte")
    return value


def _list(kind: Any, allowed: tuple[str, ...] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        items = [kind(x) for x in text.split(",") if x.strip()]
        bad = [x for x in items if allowed is not None and x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of "
                                             f"{list(allowed) if allowed else 'values'}")
        return items
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: defaults become {QUICK}")
    p.add_argument("--pp", type=_list(int), help=f"pipeline sizes (default {FULL['pp']})")
    p.add_argument("--tp", type=_list(int), help=f"tensor-parallel sizes (default {FULL['tp']})")
    p.add_argument("--payloads", type=_list(parse_size), help="echo payload sizes, e.g. "
                   "4k,1m,16m (default)")
    p.add_argument("--modes", type=_list(str, MODES), default=list(MODES),
                   help=f"subset of {','.join(MODES)}")
    p.add_argument("--workloads", type=_list(str, WORKLOADS), default=list(WORKLOADS),
                   help=f"subset of {','.join(WORKLOADS)}")
    p.add_argument("--channels", "--channel", type=_list(str, ("auto", "shm", "gloo", "nccl")),
                   help="DAG edge transports, one row each (default: shm,gloo without GPUs, "
                        "nccl,shm with)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="workers' device; auto = cuda when the Ray cluster has GPUs")
    p.add_argument("--gpus-per-worker", type=float, default=1.0,
                   help="GPUs each worker reserves on cuda (0.5: two stages share one GPU; "
                        "nccl then cannot run)")
    p.add_argument("--iters", type=int, help=f"timed steps per configuration "
                   f"(default {FULL['iters']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps first (default {FULL['warmup']})")
    p.add_argument("--max-seconds", type=float, help="stop timing a configuration after this "
                   f"long (default {FULL['max_seconds']})")
    p.add_argument("--repeat", type=int, help="run the whole plan this many times, every "
                   "other pass in the opposite mode order, and pool each configuration's steps "
                   "(default 1; --quick: 2)")
    p.add_argument("--max-workers", type=int, default=4,
                   help="skip layouts with more workers (default 4: a 2-core box)")
    p.add_argument("--floor-niceness", type=int, help="niceness of the floor's processes "
                   "(default: what Ray gives its workers, so priorities match)")
    p.add_argument("--driver-threads", type=int, help="torch threads of this driver process "
                   "(default: torch's). Ray turns returned tensors back into torch tensors "
                   "with an OpenMP copy that stalls on a busy CPU; 1 avoids it")
    p.add_argument("--store-restart-fraction", type=float, default=STORE_RESTART_FRACTION,
                   help="restart the embedded Ray before a configuration when its object "
                   "store is more than this full of buffers Ray 2.60 never frees (default "
                   f"{STORE_RESTART_FRACTION}; 0: before every one; 1: never)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result path (the plot "
                   "goes next to it as .png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the .png")
    p.add_argument("-v", "--verbose", action="store_true", help="log rayexec's INFO messages")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if (args.iters < 1 or args.warmup < 0 or args.max_seconds <= 0 or args.max_workers < 1
            or args.repeat < 1 or (args.driver_threads is not None and args.driver_threads < 1)):
        p.error(f"need --iters >= 1, --warmup >= 0, --max-seconds > 0, --max-workers >= 1, "
                f"--repeat >= 1, --driver-threads >= 1; got {args.iters}, {args.warmup}, "
                f"{args.max_seconds}, {args.max_workers}, {args.repeat}, {args.driver_threads}")
    if not 0 <= args.store_restart_fraction <= 1:
        p.error(f"--store-restart-fraction must be within 0..1 (a fraction of the object "
                f"store); got {args.store_restart_fraction}")
    return args


def layouts(args: argparse.Namespace) -> tuple[list[tuple[int, int]], list[str]]:
    """(pp, tp) cells to run, and why the others are skipped."""
    cells, skipped = [], []
    for pp in args.pp:
        for tp in args.tp:
            if pp * tp > args.max_workers:
                skipped.append(f"PP={pp} x TP={tp}: {pp * tp} workers > --max-workers "
                               f"{args.max_workers}")
            else:
                cells.append((pp, tp))
    return cells, skipped


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0],
                            "cpu_count": os.cpu_count(),
                            "cores_available": len(os.sched_getaffinity(0)),
                            "load_avg_start": os.getloadavg()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                                  if line.startswith("model name")), None)
        meminfo = Path("/proc/meminfo").read_text().split()
        info["mem_total_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError, StopIteration):
        pass
    return info


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("rayexec", "ray", "torch", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def start_ray(args: argparse.Namespace, cells: list[tuple[int, int]]
              ) -> tuple[bool, str, int | None]:
    """Join RAY_ADDRESS or start a private local Ray with seats for the largest layout;
    (we started it, the workers' device, the niceness rayexec's workers get)."""
    import ray
    import ray.cloudpickle

    import benchmarks
    from rayexec import ExecutorConfig, envs
    from rayexec.placement import ensure_ray

    # Ship this package's classes (EchoWorker) to Ray workers by value: a worker
    # started for a run from another directory lacks the repository root on sys.path.
    ray.cloudpickle.register_pickle_by_value(benchmarks)
    started = not ray.is_initialized()
    biggest = max(pp * tp for pp, tp in cells)
    if started and not envs.ray_address():
        # address="local": a private cluster, never a test's cluster that happens to
        # run on this machine. Seats for two layouts, as killed actors free theirs late.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2 * biggest),
                 include_dashboard=False, logging_level=logging.WARNING)
    else:
        ensure_ray(ExecutorConfig(worker_cls=echo_worker.EchoWorker,
                                  tensor_parallel_size=biggest,
                                  device="cpu" if args.device == "cpu" else "auto"))
    # Measured in a process started the way rayexec starts its workers.
    like_rayexec = {"env_vars": {"RAY_worker_niceness": "0"}}
    niceness = ray.get(ray.remote(num_cpus=0, runtime_env=like_rayexec)(_niceness).remote())
    device = args.device
    if device == "auto":
        gpus = ray.cluster_resources().get("GPU", 0)
        device = "cuda" if gpus >= biggest * args.gpus_per_worker else "cpu"
    return started, device, niceness


def store_fraction() -> float:
    """How full the connected Ray's object store is (0..1; NaN when Ray does not say)."""
    import ray

    capacity = ray.cluster_resources().get("object_store_memory", 0)
    return object_store_mb() * (1 << 20) / capacity if capacity else 0.0


def variants(mode: str, workload: str, channels: list[str]) -> list[str | None]:
    """The channels (dag) or Ray-only variants (bare, echo only) a mode runs with."""
    if mode == "dag":
        return list(channels)
    if mode == "bare":
        return list(BARE_VARIANTS) if workload == "echo" else []
    return [None]


def _niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration; the JSON document."""
    cells, skipped = layouts(args)
    for why in skipped:
        print(f"not run: {why}", file=sys.stderr)
    if not cells:
        raise SystemExit(f"no layout fits --max-workers {args.max_workers}: {skipped}")
    modes = [m for m in MODE_ORDER if m in args.modes]
    uses_ray = any(m in ("dag", "rpc") for m in modes)
    started_ray, device, ray_niceness = start_ray(args, cells) if uses_ray else (
        False, "cuda" if args.device == "cuda" else "cpu", None)
    floor_niceness = args.floor_niceness
    if floor_niceness is None:
        floor_niceness = ray_niceness if ray_niceness is not None else 0
    settings = Settings(args.iters, args.warmup, args.max_seconds, floor_niceness)
    # rayexec's CPU graph raises this process's malloc thresholds (host_memory.py);
    # set it before any mode runs, so that every mode's driver reads its outputs alike.
    from rayexec import host_memory

    keeps_freed_memory = host_memory.keep_freed_memory()
    import torch

    if args.driver_threads:
        torch.set_num_threads(args.driver_threads)
    channels = args.channels or (["nccl", "shm"] if device == "cuda" else ["shm", "gloo"])
    doc: dict[str, Any] = {
        "benchmark": "pp_tp_latency", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(), "versions": versions(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": device, "channels": channels, "skipped": skipped,
        "ray_worker_niceness": ray_niceness, "floor_niceness": floor_niceness,
        "driver_torch_threads": torch.get_num_threads(),
        "driver_keeps_freed_memory": keeps_freed_memory,
        "results": [], "errors": [], "ray_restarts": [],
    }
    plan = [(w, pp, tp, m, c) for r in range(args.repeat) for w in args.workloads
            for pp, tp in cells for m in (modes if r % 2 == 0 else modes[::-1])
            for c in variants(m, w, channels)]
    raw: list[dict[str, Any]] = []
    try:
        for i, (name, pp, tp, mode, channel) in enumerate(plan, 1):
            workload = Workload(name, tuple(args.payloads), device, args.gpus_per_worker)
            what = f"{mode} {name} PP={pp} x TP={tp}" + (f" [{channel}]" if channel else "")
            if started_ray and mode in ("dag", "rpc", "bare"):
                full = store_fraction()
                if full > args.store_restart_fraction:
                    print(f"[{i}/{len(plan)}] restarting the embedded Ray: its object store "
                          f"is {100 * full:.0f}% full of channel buffers Ray never frees "
                          f"(ray-project/ray#43836)", file=sys.stderr, flush=True)
                    import ray

                    ray.shutdown()
                    start_ray(args, cells)
                    doc["ray_restarts"].append({"before": i, "store_fraction": full})
            # A cell still running after CELL_STACKS_AFTER_S prints every thread's Python
            # stack to stderr (and again each period), so a stall says where it sits.
            faulthandler.dump_traceback_later(CELL_STACKS_AFTER_S, repeat=True)
            try:
                records = run_configuration(mode, workload, pp, tp, channel or channels[0],
                                            settings)
            except Exception as e:
                logger.exception("[%d/%d] %s failed", i, len(plan), what)
                doc["errors"].append({"mode": mode, "workload": name, "pp": pp, "tp": tp,
                                      "channel": channel, "error": f"{type(e).__name__}: {e}"})
                continue
            finally:
                faulthandler.cancel_dump_traceback_later()
            for r in records:
                print(f"[{i}/{len(plan)}] {what} {report.human_bytes(r['payload_bytes'])}: "
                      f"median {r['median_us']:.0f} us, p90 {r['p90_us']:.0f}, p99 "
                      f"{r['p99_us']:.0f} ({r['iters']} steps, load {r['load_1m']:.1f})",
                      file=sys.stderr, flush=True)
            raw.extend(records)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    doc["machine"]["load_avg_end"] = os.getloadavg()
    doc["results"] = raw
    _check_digests(doc)
    doc["results"] = merge_rounds(raw)
    doc["comparisons"] = report.compare(doc["results"])
    doc["targets"] = report.evaluate_targets(doc["comparisons"], channels[0])
    return doc


def _check_digests(doc: dict[str, Any]) -> None:
    """Every mode and layout must choose the same next tokens for the decode step."""
    model = [r for r in doc["results"] if "output_digest" in r]
    ref = next((r for r in model if r["mode"] == "local"), model[0] if model else None)
    for r in model:
        if r["output_digest"] != ref["output_digest"]:
            msg = (f"{r['mode']} PP={r['pp']} x TP={r['tp']} chose tokens {r['output_digest']} "
                   f"but {ref['mode']} PP={ref['pp']} x TP={ref['tp']} chose "
                   f"{ref['output_digest']}")
            logger.warning(msg)
            doc["errors"].append({"mode": r["mode"], "workload": "model", "pp": r["pp"],
                                  "tp": r["tp"], "channel": r["channel"], "error": msg})


def _loads(loads: tuple[float, ...]) -> str:
    return "/".join(f"{x:.1f}" for x in loads)


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pp_tp_latency").setLevel(logging.INFO)
    doc = run(args)
    print(report.format_table(doc["comparisons"]))
    m = doc["machine"]
    print(f"machine: {m['cores_available']} cores available, load average "
          f"{_loads(m['load_avg_start'])} at the start, {_loads(m['load_avg_end'])} at the end")
    report.write_json(args.out, doc)
    png = args.out.with_suffix(".png")
    no_plot = "no plot: --no-plot" if args.no_plot else report.plot(doc["results"], png)
    print(f"results: {_shown(args.out)}" + (f", plot: {_shown(png)}" if no_plot is None else ""))
    if no_plot is not None:
        print(no_plot)
    if doc["errors"]:
        print(f"{len(doc['errors'])} configuration(s) failed; see \"errors\" in the results")
    print(report.format_verdict(doc["targets"], m["cores_available"],
                                max(m["load_avg_start"][0], m["load_avg_end"][0])))
    summary = {"results": len(doc["results"]), "errors": len(doc["errors"]),
               "targets_met": sum(t["met"] is True for t in doc["targets"]),
               "targets_missed": sum(t["met"] is False for t in doc["targets"]),
               "json": str(args.out), "plot": str(png) if no_plot is None else None,
               "plot_skipped": no_plot}
    print("pp_tp_latency " + json.dumps(summary))
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
