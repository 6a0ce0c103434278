"""rayexec as vLLM's executor backend, checked against vLLM's own `mp` backend.

A random-weight tiny Llama is built with transformers (no hub access; the same one
benchmarks/vllm_throughput.py measures, from its `build_tiny_llama`). Each
engine runs in its own subprocess (tests/vllm/run_engine.py): vLLM spawns
processes on CPU and engines must not share the pytest process.

Environment given to every engine:
- RAY_ADDRESS=local: the engine's Ray is a fresh local one, never another
  cluster that happens to run on this machine (Ray would join it otherwise);
- RAYEXEC_NUM_DEVICES_PER_WORKER=0.5: such a Ray has as many logical CPUs as the
  machine, so four CPU workers on a 2-core box each book half of one;
- for `mp`, VLLM_CPU_OMP_THREADS_BIND: vLLM requires it with TP or PP > 1.
Layouts with PP > 1 run in Dynamo mode on both backends: in eager mode vLLM 0.32's
own `mp` backend fails with PP on CPU (its later stages lack their receive
buffers), so there would be nothing to compare against.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.vllm_engines import build_tiny_llama, mp_thread_bind

pytestmark = pytest.mark.vllm

RUNNER = Path(__file__).with_name("run_engine.py")
PROMPTS, MAX_TOKENS = 3, 12
ENGINE_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(path)
    return path


def run_engine(model: Path, out_dir: Path, backend: str, tp: int, pp: int,
               *extra: str) -> dict:
    out = out_dir / f"{backend}-tp{tp}-pp{pp}.json"
    env = dict(os.environ, RAY_ADDRESS="local", RAYEXEC_NUM_DEVICES_PER_WORKER="0.5")
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    if backend == "mp":
        env["VLLM_CPU_OMP_THREADS_BIND"] = mp_thread_bind(tp * pp)
    cmd = [sys.executable, str(RUNNER), "--model", str(model), "--backend", backend,
           "--tp", str(tp), "--pp", str(pp), "--mode", "dynamo" if pp > 1 else "eager",
           "--prompts", str(PROMPTS), "--max-tokens", str(MAX_TOKENS), "--out", str(out),
           # With PP, one batch per stage: PP steps of real work in flight at once,
           # whose results must come back in submission order.
           "--micro-batches", str(pp), *extra] + (["--idle-check"] if backend == "rayexec" else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=ENGINE_TIMEOUT_S)
    assert proc.returncode == 0 and out.exists(), (
        f"{backend} engine (TP={tp}, PP={pp}) failed with exit code {proc.returncode}:\n"
        f"{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def not_rays(shm_names: list[str]) -> list[str]:
    """Leave out Ray's own leftovers: its raylet leaves the semaphores (`sem.obj*`,
    `sem.hdr*`, 32 bytes each) of a compiled graph's channels when it stops."""
    return [n for n in shm_names if not n.startswith("sem.")]


@pytest.fixture(scope="module")
def rayexec_tp2_then_killed(tiny_llama, tmp_path_factory) -> dict:
    """One rayexec engine at TP=2 serves two tests (engine starts are the slow part):
    it generates, then worker 1 is killed."""
    return run_engine(tiny_llama, tmp_path_factory.mktemp("kill"), "rayexec", 2, 1,
                      "--kill-rank", "1")


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_rayexec_generates_the_same_tokens_as_vllm_mp(tiny_llama, tmp_path, request, tp, pp):
    reference = run_engine(tiny_llama, tmp_path, "mp", tp, pp)
    if (tp, pp) == (2, 1):
        ours = request.getfixturevalue("rayexec_tp2_then_killed")
    else:
        ours = run_engine(tiny_llama, tmp_path, "rayexec", tp, pp)

    assert [len(t) for t in reference["token_ids"]] == [MAX_TOKENS] * PROMPTS
    assert ours["token_ids"] == reference["token_ids"]
    # Idle, rayexec's workers sleep (parked) instead of polling Ray's channels, and
    # the first generate after the pause wakes them with the same tokens.
    assert max(ours["idle_worker_cores"]) < 0.2, ours["idle_worker_cores"]
    assert ours["token_ids_after_idle"] == reference["token_ids"]
    # Workers, their raylet and Ray's agents are gone once the engine shut down,
    # and so is the shared memory of vLLM's groups (a later engine that drew the
    # same port could not start otherwise).
    assert ours["leftover_pids"] == []
    assert not_rays(ours["leftover_shm"]) == []


def test_killing_a_worker_fails_the_engine_instead_of_hanging(rayexec_tp2_then_killed):
    result = rayexec_tp2_then_killed
    kill = result["kill"]

    assert len(result["token_ids"]) == PROMPTS  # it worked before the kill
    assert kill["killed_pid"] in kill["worker_pids"]
    # No request was running: only the failure callback can have told the engine.
    assert kill["engine_dead_unprompted"], kill
    assert kill["generate_error"] is not None and "EngineDeadError" in kill["generate_error"]
    assert result["leftover_pids"] == []
    assert not_rays(result["leftover_shm"]) == []  # not even from the killed worker
