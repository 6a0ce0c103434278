"""rayexec's direct weight path into vLLM (rayexec.integrations.vllm.update_weights),
checked against vLLM's own `mp` backend.

Each rayexec engine runs in a subprocess (tests/vllm/run_direct.py) with a trainer
group (HfTrainerWorker, two DP ranks) next to it: generate, one optimizer step on
the generated sequences, update_weights, generate again. The part of every
full-shaped tensor a vLLM rank did not receive is filled with NaN there, so a
loader that read beyond its slice would wreck the tokens. The trainer saves the
weights it sent; a fresh `mp` engine started from that checkpoint (run_engine.py,
same settings; the exactness argument is test_vllm_backend.py's) must generate
the same greedy ids as the updated engine, which must differ from its ids before.
Routes: TP=2 syncs through the object store with the NaN fill (every piece copied
into a NaN-filled full tensor), PP=2 over gloo with the fill, TP=2 x PP=2 through the
object store without it (each rank hands vLLM whole tensors mapped from the store).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm.test_vllm_backend import ENGINE_TIMEOUT_S, MAX_TOKENS, PROMPTS, run_engine

pytestmark = pytest.mark.vllm

RUNNER = Path(__file__).with_name("run_direct.py")
ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2xpp2": (2, 2)}
ROUTE = {"tp2": ("object_store", "--via", "auto"),
         "pp2": ("process_group", "--via", "process_group"),
         "tp2xpp2": ("object_store", "--via", "object_store", "--no-fill")}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from benchmarks.vllm_engines import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(path)
    return path


def engine_env() -> dict[str, str]:
    env = dict(os.environ, RAY_ADDRESS="local", RAYEXEC_NUM_DEVICES_PER_WORKER="0.5",
               RAYEXEC_CPU_THREADS_PER_WORKER="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    return env


def run_direct(model: Path, out_dir: Path, tp: int, pp: int, *extra: str) -> dict:
    out, save = out_dir / f"direct-tp{tp}-pp{pp}.json", out_dir / f"trained-tp{tp}-pp{pp}"
    cmd = [sys.executable, str(RUNNER), "--model", str(model), "--tp", str(tp), "--pp",
           str(pp), "--prompts", str(PROMPTS), "--max-tokens", str(MAX_TOKENS), "--save",
           str(save), "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=engine_env(), capture_output=True, text=True,
                          timeout=ENGINE_TIMEOUT_S)
    assert proc.returncode == 0 and out.exists(), (
        f"direct-path engine (TP={tp}, PP={pp}) failed with exit code {proc.returncode}:\n"
        f"{proc.stderr[-6000:]}")
    result = json.loads(out.read_text())
    result["checkpoint"] = save
    return result


@pytest.fixture(scope="module")
def tp2_with_errors(tiny_llama, tmp_path_factory) -> dict:
    return run_direct(tiny_llama, tmp_path_factory.mktemp("direct-tp2"), 2, 1, "--errors")


@pytest.fixture
def direct_run(request, tiny_llama, tmp_path, tp2_with_errors) -> dict:
    tp, pp = LAYOUTS[request.param]
    if (tp, pp) == (2, 1):
        return tp2_with_errors  # the same engine also runs the error cases
    return run_direct(tiny_llama, tmp_path, tp, pp, *ROUTE[request.param][1:])


@pytest.mark.slow  # an engine start each: 89-96 s here on 2026-12-07 night, four workers more
@pytest.mark.parametrize("direct_run", list(LAYOUTS), indirect=True)
def test_direct_update_matches_a_fresh_mp_engine(direct_run, tmp_path):
    ours = direct_run
    tp, pp = ours["tp"], ours["pp"]
    layout_name = next(k for k, v in LAYOUTS.items() if v == (tp, pp))
    assert ours["update"]["route"] == ROUTE[layout_name][0]
    reference = run_engine(ours["checkpoint"], tmp_path, "mp", tp, pp)

    assert ours["token_ids_after"] != ours["token_ids_before"]  # the update took effect
    assert ours["batches"][1] == reference["batches"][0]  # same steps, so same bits
    assert ours["token_ids_after"] == reference["token_ids"]
    # Each vLLM rank received only what its shard loads: with TP, half of every
    # projection and of the (evenly split) vocab; with PP, only its stage's layers.
    layouts = ours["layouts"]
    total = ours["update"]["bytes"]
    per_rank = ours["update"]["bytes_by_destination_rank"]
    assert len(per_rank) == tp * pp
    for rank, layout in enumerate(layouts):
        stage, tp_rank = divmod(rank, tp)
        layers = {int(n.split(".")[2]) for n in layout if n.startswith("model.layers.")}
        # The tiny Llama's 4 layers, split evenly over the stages.
        assert layers == set(range(stage * 4 // pp, (stage + 1) * 4 // pp)), (rank, layers)
        assert ("model.embed_tokens.weight" in layout) == (stage == 0)
        assert ("lm_head.weight" in layout) == (stage == pp - 1)
        split = {n.split(".")[-2]: spec for n, spec in layout.items() if n.endswith("proj.weight")}
        assert split["q_proj"] == ([0, tp, tp_rank] if tp > 1 else [None, 1, 0])
        assert split["o_proj"] == ([1, tp, tp_rank] if tp > 1 else [None, 1, 0])
    if tp * pp > 1:
        assert max(per_rank.values()) < 0.6 * total


def test_failed_updates_keep_serving_the_previous_weights(tp2_with_errors):
    result = tp2_with_errors
    served = result["token_ids_after"]
    errors = result["errors"]

    rename = errors["rename"]["error"]
    assert rename.startswith("ValueError") and "q_proj.weight" in rename
    assert "destination ranks [0, 1]" in rename and "query.weight" in rename
    reshape = errors["reshape"]["error"]
    assert reshape.startswith("ValueError") and "model.layers.1.mlp.down_proj.weight" in reshape
    assert "[255, 512]" in reshape and "destination rank 0" in reshape
    die = errors["die"]["error"]
    assert die.startswith("WeightSyncError") and "source rank 1 died" in die
    assert "update_weights(timeout=120s)" in die  # the bound that kept it from hanging
    for fault, outcome in errors.items():
        assert outcome["token_ids"] == served, fault  # the engine kept its weights


def test_colocated_trainer_and_engine_share_bundles(tiny_llama, tmp_path):
    result = run_direct(tiny_llama, tmp_path, 2, 1, "--colocate")
    trainer, vllm = result["bundles"]["trainer"], result["bundles"]["vllm"]

    assert trainer[0][0] is not None and {pg for pg, _ in trainer + vllm} == {trainer[0][0]}
    assert sorted(b for _, b in trainer) == sorted(b for _, b in vllm) == [0, 1]
    assert result["token_ids_after"] != result["token_ids_before"]  # the loop worked
    assert min(result["trainer_freed_bytes"]) > 0  # gradients freed before the rollout


def test_engine_core_in_its_own_process_is_refused_with_the_reason(tiny_llama, tmp_path):
    result = run_direct(tiny_llama, tmp_path, 1, 1, "--engine-process")

    assert result["refusal"].startswith("TypeError")
    assert "its own process" in result["refusal"]
    assert "VLLM_ENABLE_V1_MULTIPROCESSING=0" in result["refusal"]


def test_example_rl_loop_runs_and_matches_mp(tmp_path):
    env = engine_env()
    env.pop("RAYEXEC_CPU_THREADS_PER_WORKER")  # the example sets it for --check
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "vllm_rl.py"), "--tp", "2",
                           "--iterations", "2", "--check", "--workdir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = proc.stdout.splitlines()
    iterations = [line for line in lines if line.startswith("iteration ")]
    assert len(iterations) == 2 and all(" ms (" in line for line in iterations), lines
    assert "check: ids equal a fresh mp engine's from the same weights: True" in lines
