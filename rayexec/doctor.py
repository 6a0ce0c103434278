"""`rayexec doctor --gpu`: check a GPU machine end to end in one bounded command.

Steps, each a child process with its own timeout (a hung step is killed, recorded,
and the next one runs), all inside one overall budget (default 300 s):
  versions   driver, CUDA, NCCL, cupy, Ray, torch, Python, the GPU list;
  pytest     `pytest -m gpu tests/gpu` (tests needing more GPUs skip with the reason);
  latency    benchmarks/pp_tp_latency.py --quick rows: dag over nccl and shm, and rpc;
  generate   `rayexec generate` at 1x1 and at the largest PP x TP that fits; the
             greedy ids must be equal.
With one GPU, the two stages of the latency and generate steps share it
(num_devices_per_worker=0.5) over shm and rpc; NCCL between two ranks on one GPU is
refused by NCCL, so the nccl row is skipped with that reason. Nothing is installed:
a missing piece (pytest, the tests or benchmarks of a source checkout) skips its
step with the reason. Everything goes to a log in `--out DIR`; the last line
printed is one summary. `--dry-run` prints the plan without running anything.

Not here: the checks themselves (tests/gpu, the benchmark, the CLI's generate).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # a source checkout: tests/, benchmarks/
BUDGET_S = 300.0
# Per-step caps (seconds); each step also stops at the overall budget.
CAPS = {"versions": 30.0, "pytest": 110.0, "latency": 60.0, "generate-1x1": 45.0,
        "generate": 50.0}
GENERATE_ARGS = ["--prompts", "4", "--prompt-len", "8", "--max-new-tokens", "8", "--seed", "0",
                 "--device", "cuda"]

VERSIONS_CODE = r"""
import json, subprocess, sys
info = {"python": sys.version.split()[0]}
try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    info["gpus_smi"] = out.stdout.strip().splitlines()
    info["driver"] = info["gpus_smi"][0].split(",")[2].strip() if info["gpus_smi"] else None
except Exception as e:
    info["driver"] = f"nvidia-smi failed: {e!r}"
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    info["gpu_count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(info["gpu_count"])]
    info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if info["gpu_count"] else None
except Exception as e:
    info["torch"] = f"failed: {e!r}"
    info["gpu_count"] = 0
try:
    import cupy
    info["cupy"] = cupy.__version__
    info["cupy_cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
except Exception as e:
    info["cupy"] = f"failed: {e!r}"
try:
    import ray
    info["ray"] = ray.__version__
    info["ray_path"] = ray.__file__
except Exception as e:
    info["ray"] = f"failed: {e!r}"
print("DOCTOR_VERSIONS " + json.dumps(info))
"""


@dataclass
class Step:
    name: str
    argv: list[str] | None
    """The child process to run; None for a step decided without one."""
    cap_s: float
    note: str = ""
    """What the step covers."""
    left_out: str = ""
    """What it leaves out on this machine, and why."""
    skip: str | None = None
    """Why the step does not run at all."""


@dataclass
class Outcome:
    name: str
    status: str  # passed | failed | timeout | skipped
    seconds: float = 0.0
    detail: str = ""
    output: str = field(default="", repr=False)


def generate_layout(gpus: int) -> tuple[int, int, float]:
    """(pp, tp, GPUs per worker) of the largest layout the reference decoder (8 layers,
    8 heads) runs on `gpus` GPUs; one GPU: two stages sharing it."""
    if gpus <= 1:
        return 2, 1, 0.5
    world = 1 << (min(gpus, 8).bit_length() - 1)  # 2, 4 or 8
    pp = 2
    return pp, world // pp, 1.0


def plan(gpus: int, out: Path, root: Path = ROOT, have_pytest: bool = True) -> list[Step]:
    """The doctor's steps for a machine with `gpus` GPUs (pure: no process started)."""
    py = sys.executable
    steps = [Step("versions", [py, "-c", VERSIONS_CODE], CAPS["versions"],
                  "driver, CUDA, NCCL, cupy, Ray, torch, GPU list")]
    if gpus < 1:
        why = "no CUDA GPU visible to torch"
        return steps + [Step(name, None, 0.0, skip=why)
                        for name in ("pytest", "latency", "generate-1x1", "generate")]

    tests = root / "tests" / "gpu"
    pytest_skip = None if tests.is_dir() else f"{tests} not found (needs a source checkout)"
    if pytest_skip is None and not have_pytest:
        pytest_skip = "pytest is not installed"
    steps.append(Step("pytest", [py, "-m", "pytest", "-m", "gpu", str(tests), "-q", "-rs",
                                 "-p", "no:cacheprovider"], CAPS["pytest"],
                      f"tests marked gpu; those needing more than {gpus} GPU(s) skip",
                      skip=pytest_skip))

    bench = root / "benchmarks" / "pp_tp_latency.py"
    latency = [py, str(bench), "--quick", "--pp", "2", "--tp", "1", "--modes", "dag,rpc",
               "--workloads", "echo", "--payloads", "64k,1m", "--device", "cuda", "--no-plot",
               "--iters", "30", "--max-seconds", "1", "--out", str(out / "pp_tp_latency.json")]
    if gpus >= 2:
        latency += ["--channels", "nccl,shm"]
        note = "PP=2 echo: dag over nccl, dag over shm, rpc"
    else:
        latency += ["--channels", "shm", "--gpus-per-worker", "0.5"]
        note = "PP=2 echo with both stages on the one GPU: dag over shm, rpc"
    left_out = "" if gpus >= 2 else ("latency's nccl row (NCCL refuses two ranks on one GPU; "
                                     "it needs a GPU per stage)")
    steps.append(Step("latency", latency, CAPS["latency"], note, left_out,
                      skip=None if bench.is_file() else f"{bench} not found"))

    gen = [py, "-m", "rayexec", "generate", *GENERATE_ARGS]
    steps.append(Step("generate-1x1", [*gen, "--json", str(out / "generate_1x1.json")],
                      CAPS["generate-1x1"], "the reference ids, one GPU"))
    pp, tp, share = generate_layout(gpus)
    big = [*gen, "--pp", str(pp), "--tp", str(tp), "--json", str(out / "generate_big.json")]
    note = f"PP={pp} x TP={tp}, ids must equal 1x1's"
    left_out = ""
    if share < 1:
        big += ["--num-devices-per-worker", str(share), "--channel", "shm"]
        note += " (both stages on the one GPU, over shm)"
        left_out = "generate over nccl (needs a GPU per stage)"
    steps.append(Step("generate", big, CAPS["generate"], note, left_out))
    return steps


def format_plan(steps: list[Step], gpus: int, budget_s: float) -> str:
    lines = [f"rayexec doctor --gpu: {gpus} GPU(s), budget {budget_s:g} s"]
    for s in steps:
        head = f"  {s.name:<13} cap {s.cap_s:>4g} s  {s.note}"
        if s.left_out:
            head += f"; not run: {s.left_out}"
        lines.append(head if s.skip is None else f"  {s.name:<13} SKIPPED: {s.skip}")
        if s.argv and s.skip is None and s.name != "versions":
            lines.append("                " + " ".join(s.argv))
    return "\n".join(lines)


def run_check(step: Step, timeout_s: float, env: dict[str, str], cwd: Path) -> Outcome:
    """Run one step's child process, killed with its process group after `timeout_s`."""
    if step.skip is not None:
        return Outcome(step.name, "skipped", detail=step.skip)
    if timeout_s <= 1:
        return Outcome(step.name, "skipped", detail="the overall budget ran out")
    start = time.monotonic()
    # A session of its own: on timeout the whole group (its Ray processes too, unless
    # they left it) is killed, not just the child.
    proc = subprocess.Popen(step.argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        return Outcome(step.name, "timeout", time.monotonic() - start,
                       f"killed after {timeout_s:.0f} s (the step's cap or the budget)", output)
    status = "passed" if proc.returncode == 0 else "failed"
    detail = "" if status == "passed" else f"exit code {proc.returncode}: {_last_line(output)}"
    return Outcome(step.name, status, time.monotonic() - start, detail, output)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def parse_versions(output: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith("DOCTOR_VERSIONS "):
            return json.loads(line[len("DOCTOR_VERSIONS "):])
    return {}


def compare_ids(out: Path) -> Outcome:
    """The generate step passes only when its ids equal the 1x1 run's."""
    try:
        one = json.loads((out / "generate_1x1.json").read_text())["token_ids"]
        big = json.loads((out / "generate_big.json").read_text())["token_ids"]
    except (OSError, ValueError, KeyError) as e:
        return Outcome("ids", "skipped", detail=f"no ids to compare ({e})")
    if one == big:
        return Outcome("ids", "passed", detail=f"{sum(map(len, one))} greedy ids equal 1x1's")
    return Outcome("ids", "failed", detail=f"ids differ from 1x1's: {big[0][:8]} vs {one[0][:8]}")


def summary_line(outcomes: list[Outcome], log: Path | None) -> str:
    failed = [o for o in outcomes if o.status in ("failed", "timeout")]
    skipped = [o for o in outcomes if o.status == "skipped"]
    verdict = "FAILED" if failed else "PASSED"
    parts = [f"{o.name}={o.status}" for o in outcomes]
    why = "; ".join(f"{o.name}: {o.detail}" for o in failed + skipped)
    tail = f" | {why}" if why else ""
    return f"rayexec doctor {verdict}: {' '.join(parts)}{tail}" + (f" | log {log}" if log else "")


def run(gpus: int | None, out: Path | None, dry_run: bool, budget_s: float = BUDGET_S) -> int:
    """The command: returns 0 when nothing failed."""
    have_pytest = _importable("pytest")
    if dry_run:
        where = out or Path(tempfile.gettempdir()) / "rayexec-doctor-<time>"
        steps = plan(gpus if gpus is not None else 0, where, have_pytest=have_pytest)
        print(format_plan(steps, gpus or 0, budget_s))
        print("rayexec doctor DRY RUN: nothing was run")
        return 0
    out = out or Path(tempfile.mkdtemp(prefix="rayexec-doctor-"))
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    env = dict(os.environ)
    # The checkout's rayexec, tests and benchmarks first; the rest (e.g. a Ray
    # installed with --target) stays as the caller set it.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    log_path = out / "doctor.log"
    outcomes: list[Outcome] = []
    with open(log_path, "w") as log:
        def record(o: Outcome, argv: list[str] | None = None) -> None:
            outcomes.append(o)
            line = f"[{o.name}] {o.status} in {o.seconds:.1f} s" + (f": {o.detail}"
                                                                     if o.detail else "")
            print(line, flush=True)
            log.write(f"==== {line}\n" + (f"$ {' '.join(argv)}\n" if argv else "") + o.output
                      + "\n")
            log.flush()

        first = plan(0, out, have_pytest=have_pytest)[0]
        versions = run_check(first, min(first.cap_s, deadline - time.monotonic()), env, ROOT)
        info = parse_versions(versions.output)
        if versions.status == "passed":
            versions.detail = _format_versions(info)
        record(versions, first.argv)
        detected = int(info.get("gpu_count") or 0)
        steps = plan(detected if gpus is None else gpus, out, have_pytest=have_pytest)[1:]
        log.write(format_plan(steps, detected, budget_s) + "\n")
        for step in steps:
            left = deadline - time.monotonic()
            outcome = run_check(step, min(step.cap_s, left), env, ROOT)
            if outcome.status == "passed" and step.name in ("pytest", "latency"):
                outcome.detail = _last_line(outcome.output)  # counts / the result line
            record(outcome, step.argv)
        if any(o.name == "generate" and o.status == "passed" for o in outcomes):
            record(compare_ids(out))
        line = summary_line(outcomes, log_path)
        left_out = [s.left_out for s in steps if s.left_out]
        if left_out:
            line += " | not run: " + "; ".join(left_out)
        log.write(line + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"versions": info, "outcomes": [{k: v for k, v in vars(o).items() if k != "output"}
                                        for o in outcomes]}, indent=1))
    print(line, flush=True)
    return 1 if any(o.status in ("failed", "timeout") for o in outcomes) else 0


def _format_versions(info: dict[str, Any]) -> str:
    keys = ("driver", "cuda", "nccl", "cupy", "ray", "torch", "python")
    gpus = ", ".join(info.get("gpus") or []) or "none"
    return " ".join(f"{k}={info.get(k)}" for k in keys) + f" gpus=[{gpus}]"


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
