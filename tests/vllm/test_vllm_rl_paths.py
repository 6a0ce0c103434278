"""vLLM's own weight-update paths on rayexec's backend, checked against vLLM's `mp`.

For TP=2, PP=2 and TP2xPP2, a rayexec engine started from an OLD checkpoint
generates, reloads a NEW one through `collective_rpc` into
`WeightReloadExtension` (vLLM's `worker_extension_cls` + `reload_weights`), and
generates again; its ids must equal those of a fresh `mp` engine started from
NEW, with the same layout, and differ from its ids before the update. Then
updates that must be refused (a wrong shape, a wrong name, and with the engine
core in-process a stalled and a killed trainer) each fail with an error naming
what was wrong and where, and the engine goes on generating NEW's ids.

Both places of vLLM's engine core are covered, each in its own engine:
- in the test's engine process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the new
  weights come as a Ray ObjectRef from a trainer actor in the engine's Ray; all
  prompts in one generate, so the batches are the same as `mp`'s by
  construction (docs/vllm-exactness.md);
- in vLLM's engine process: the new weights cross vLLM's engine-core socket as a
  safetensors path (refused ones as safetensors bytes); one prompt per generate,
  because there a multi-prompt generate's batches depend on timing.
The `mp` reference runs in-process and records both kinds of generate.

Then one engine with vLLM's `weight_transfer_config` (sharded_rdt, the one
engine whose needs rayexec must meet at actor creation) records what rayexec
gave it. The engines themselves are GPU-only (tests/gpu/test_vllm_weight_transfer.py).
Engines run in subprocesses (tests/vllm/run_weight_update.py).
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

RUNNER = Path(__file__).with_name("run_weight_update.py")
PROMPTS, MAX_TOKENS = 3, 12
ENGINE_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """OLD: the tiny Llama of the token tests; NEW: OLD after a random step of the
    size of its weights' spread (what a training step does, larger)."""
    import torch
    from transformers import LlamaForCausalLM

    old, new = tmp_path_factory.mktemp("old"), tmp_path_factory.mktemp("new")
    build_tiny_llama(old)
    model = LlamaForCausalLM.from_pretrained(old)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(new)
    return old, new


def run(model: Path, out: Path, backend: str, tp: int, pp: int, *extra: str,
        in_process: bool = True) -> dict:
    cmd = [sys.executable, str(RUNNER), "--model", str(model), "--backend", backend,
           "--tp", str(tp), "--pp", str(pp), "--prompts", str(PROMPTS),
           "--max-tokens", str(MAX_TOKENS), "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=engine_env(backend, tp, pp, in_process),
                          capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    assert proc.returncode == 0 and out.exists(), (
        f"{backend} engine (TP={tp}, PP={pp}, in_process={in_process}) failed with exit "
        f"code {proc.returncode}:\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def assert_refused(errors: dict[str, str | None], in_process: bool) -> None:
    shape = errors["wrong_shape"]
    assert shape is not None and "nothing was loaded" in shape, errors
    assert "'model.norm.weight' has shape (255,), the engine's checkpoint has (256,)" in shape
    name = errors["wrong_name"]
    assert name is not None and "model.layers.0.mlp.gate_prj.weight" in name, errors
    assert "missing weight(s) ['model.layers.0.mlp.gate_proj.weight']" in name
    for text in (shape, name):
        assert "rank " in text, text
    if in_process:
        assert "within timeout_s=2.0 s" in (errors["stalled_trainer"] or ""), errors
        killed = errors["killed_trainer"] or ""
        assert "fetching the weights failed" in killed and "died" in killed, errors


@pytest.mark.slow  # three engines per layout
@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_collective_rpc_reload_matches_a_fresh_mp_engine_with_the_new_weights(
        checkpoints, tmp_path, tp, pp):
    old, new = checkpoints
    reference = run(new, tmp_path / "mp.json", "mp", tp, pp)
    in_proc = run(old, tmp_path / "inproc.json", "rayexec", tp, pp, "--new", str(new))
    own_proc = run(old, tmp_path / "ownproc.json", "rayexec", tp, pp, "--new", str(new),
                   in_process=False)

    assert [len(t) for t in reference["token_ids"]] == [MAX_TOKENS] * PROMPTS
    for result, expected in ((in_proc, reference["token_ids"]),
                             (own_proc, reference["token_ids_single"])):
        assert result["after"] != result["before"]  # the update changed the model
        assert result["after"] == expected  # ... into exactly NEW
        assert [s["rank"] for s in result["summary"]] == list(range(tp * pp))
        assert {s["tensors"] for s in result["summary"]} == {4 * 9 + 3}  # every weight
        assert_refused(result["errors"], result["in_process"])
        assert result["after_refused"] == expected  # still NEW after every refusal
    assert in_proc["in_process"] and not own_proc["in_process"]


def test_sharded_rdt_gets_tensor_transport_actors_and_its_trainer_setup(checkpoints, tmp_path):
    old, _ = checkpoints
    report = run(old, tmp_path / "rdt.json", "rayexec", 2, 1,
                 "--weight-transfer", "sharded_rdt")["weight_transfer"]

    assert report["tensor_transport"] == [True, True]
    assert report["engines"] == ["ShardedRDTWeightTransferEngine"] * 2
    # LLM.init_weight_transfer_engine reached vLLM's engine on the workers, which
    # looked for the (absent) trainer actor by the name it was given.
    assert "no-such-trainer" in (report["init_error"] or ""), report
