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

The token comparison is exact by construction, not by luck. The tiny model runs in
bf16 (vLLM's CPU default for a float32 checkpoint), and its random weights give
near-uniform logits: the top two are often one bf16 step apart or tied, so any
difference in the computation flips greedy tokens. Two things could differ
between engines that both compute correctly, and the token runs pin both:
- the batches: with vLLM's engine process, the first step starts as soon as the
  first request arrives, so which prompts share a step (and whether a prefill is
  split) varies from run to run. The token runs keep the engine core in the
  test's engine process (VLLM_ENABLE_V1_MULTIPROCESSING=0): `generate` queues
  every prompt before the first step, and vLLM's scheduler (with PP, its batch
  queue) then decides every step from the requests alone. The test checks that
  both backends ran the same batches;
- the threads: `mp` binds one core per worker (VLLM_CPU_OMP_THREADS_BIND), and
  rayexec runs one thread per worker on the same cores
  (RAYEXEC_CPU_THREADS_PER_WORKER=1; by default it would divide the machine's
  cores among its workers). The test checks both backends' thread counts and cores.
The engine that kills a worker keeps vLLM's engine process: only there does the
engine hear of a dead worker by itself.
Layouts with PP > 1 run in Dynamo mode on both backends: in eager mode vLLM 0.32's
own `mp` backend fails with PP on CPU (its later stages lack their receive
buffers), so there would be nothing to compare against.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.vllm_engines import build_tiny_llama
from tests.vllm.run_engine import engine_env

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
               *extra: str, in_process: bool = True) -> dict:
    out = out_dir / f"{backend}-tp{tp}-pp{pp}.json"
    env = engine_env(backend, tp, pp, in_process)
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
    """A rayexec engine at TP=2 in vLLM's engine process: it generates, then worker 1
    is killed."""
    return run_engine(tiny_llama, tmp_path_factory.mktemp("kill"), "rayexec", 2, 1,
                      "--kill-rank", "1", in_process=False)


@pytest.mark.parametrize(("tp", "pp"), [
    pytest.param(2, 1, id="tp2"), pytest.param(1, 2, id="pp2"),
    pytest.param(2, 2, id="tp2xpp2", marks=pytest.mark.slow),  # four workers a side
])
def test_rayexec_generates_the_same_tokens_as_vllm_mp(tiny_llama, tmp_path, tp, pp):
    reference = run_engine(tiny_llama, tmp_path, "mp", tp, pp)
    ours = run_engine(tiny_llama, tmp_path, "rayexec", tp, pp)

    assert [len(t) for t in reference["token_ids"]] == [MAX_TOKENS] * PROMPTS
    # The same computation on both (module docstring): same threads and cores per
    # rank, and the same batches step by step (before and after the idle pause).
    assert ours["worker_threads"] == reference["worker_threads"]
    assert ours["batches"][0] == reference["batches"][0]
    assert ours["batches"][1] == reference["batches"][0]
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
