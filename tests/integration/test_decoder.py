"""The reference decoder served by the executor on a local Ray: every PP x TP layout
greedy-generates exactly what the single-process model does, keeps PP micro-batches
in flight, frees the KV cache of finished requests on every worker; and the
`rayexec generate` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rayexec import RayDistributedExecutor
from rayexec.cli import main as cli_main
from rayexec.models import (
    ReferenceModel,
    StepBatch,
    decoder_executor_config,
    generate,
    make_decode_batch,
    make_prompts,
)
from tests.helpers import assert_no_leaks, cluster_snapshot

SEED = 0
PROMPTS = make_prompts(4, 8, 4096, seed=SEED)
NEW_TOKENS = 5
# float32 logits of two layouts differ only by summation order (all-reduce vs one
# matmul, batch composition); measured differences are ~1e-6.
LOGITS_ATOL = 1e-4
LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1)]


@pytest.fixture(scope="module")
def reference():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers use the cores; one thread here is faster
    try:
        return generate(ReferenceModel("small", seed=SEED), PROMPTS, NEW_TOKENS,
                        micro_batches=1, return_logits=True)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", params=LAYOUTS, ids=[f"pp{p}xtp{t}" for p, t in LAYOUTS])
def decoder_ex(request, local_ray):
    pp, tp = request.param
    before = cluster_snapshot()
    cfg = decoder_executor_config(pp, tp, model="small", seed=SEED, device="cpu",
                                  num_devices_per_worker=0.5)
    with RayDistributedExecutor(cfg) as ex:
        yield ex
    assert_no_leaks(before)


class CountInFlight:
    """Wraps an executor; records the most steps submitted and not yet consumed."""

    def __init__(self, ex):
        self.ex, self.config, self.pending, self.most = ex, ex.config, 0, 0

    def execute_model(self, batch, non_block=False):
        future = self.ex.execute_model(batch, non_block=non_block)
        if not non_block:
            return future
        self.pending += 1
        self.most = max(self.most, self.pending)
        wrapper = self

        class Counted:
            def result(self, timeout=None):
                wrapper.pending -= 1
                return future.result(timeout)
        return Counted()


def test_greedy_tokens_and_final_logits_equal_the_single_process_model(decoder_ex, reference):
    counted = CountInFlight(decoder_ex)
    got = generate(counted, PROMPTS, NEW_TOKENS, return_logits=True)
    assert got.token_ids == reference.token_ids
    for a, b in zip(got.final_logits, reference.final_logits):
        torch.testing.assert_close(a, b, atol=LOGITS_ATOL, rtol=0)
    # One micro-batch per stage, each with one step in flight.
    assert counted.most == decoder_ex.config.pipeline_parallel_size


def test_each_rank_holds_its_stage_layers_and_tp_slice(decoder_ex):
    pp, tp = decoder_ex.config.pipeline_parallel_size, decoder_ex.config.tensor_parallel_size
    infos = decoder_ex.collective_rpc("shard_info")
    layers_per_stage = 8 // pp
    for rank, info in enumerate(infos):
        stage = rank // tp
        assert (info["pp_rank"], info["tp_rank"]) == (stage, rank % tp)
        assert info["layers"] == list(range(stage * layers_per_stage,
                                            (stage + 1) * layers_per_stage))
        assert info["local_heads"] == 8 // tp
        assert info["embed"] == (stage == 0)
        assert info["head"] == (stage == pp - 1 and rank % tp == 0)


def test_requests_finishing_early_free_their_kv_cache_on_every_worker(decoder_ex):
    empty = {"requests": 0, "tokens": 0, "bytes": 0}
    assert decoder_ex.collective_rpc("kv_cache_stats") == [empty] * decoder_ex.world_size
    # Step by step: two requests cached everywhere, then one finishes.
    decoder_ex.execute_model(StepBatch.prefill([9001, 9002], PROMPTS[:2]))
    both = decoder_ex.collective_rpc("kv_cache_stats")
    assert [s["requests"] for s in both] == [2] * decoder_ex.world_size
    out = decoder_ex.execute_model(StepBatch.decode([9002], [7], [len(PROMPTS[1])],
                                                    finished=[9001]))
    assert out.request_ids == (9002,)
    one = decoder_ex.collective_rpc("kv_cache_stats")
    assert all(s["requests"] == 1 and s["bytes"] < b["bytes"] for s, b in zip(one, both))
    decoder_ex.execute_model(StepBatch.free_only([9002]))
    assert decoder_ex.collective_rpc("kv_cache_stats") == [empty] * decoder_ex.world_size
    # Through the engine, with budgets that end at different steps.
    result = generate(decoder_ex, PROMPTS, [1, 4, 2, 3])
    assert [len(t) for t in result.token_ids] == [1, 4, 2, 3]
    assert decoder_ex.collective_rpc("kv_cache_stats") == [empty] * decoder_ex.world_size


def test_benchmark_decode_batch_repeats_the_same_step(decoder_ex):
    local = ReferenceModel("small", seed=SEED)
    want = local.execute_model(make_decode_batch(local, num_requests=8, context_len=12))
    batch = make_decode_batch(decoder_ex, num_requests=8, context_len=12)
    outs = [decoder_ex.execute_model(batch) for _ in range(3)]
    assert all(o.next_token_ids == want.next_token_ids for o in outs)
    assert {s["tokens"] for s in decoder_ex.collective_rpc("kv_cache_stats")} == {8 * 13}
    decoder_ex.execute_model(StepBatch.free_only(batch.request_ids))
    assert {s["requests"] for s in decoder_ex.collective_rpc("kv_cache_stats")} == {0}


def test_cli_generate_prints_and_writes_json(local_ray, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAYEXEC_NUM_DEVICES_PER_WORKER", "0.5")
    path = tmp_path / "gen.json"
    before = cluster_snapshot()
    code = cli_main(["generate", "--pp", "2", "--tp", "1", "--prompts", "3", "--prompt-len", "6",
                     "--max-new-tokens", "4", "--device", "cpu", "--forward", "rpc",
                     "--seed", "3", "--json", str(path)])
    assert code == 0
    assert_no_leaks(before)
    record = json.loads(path.read_text())
    want = generate(ReferenceModel("small", seed=3), make_prompts(3, 6, 4096, seed=3), 4)
    assert record["token_ids"] == want.token_ids
    assert [(r["rank"], r["pp_rank"], r["tp_rank"]) for r in record["layout"]] == [
        (0, 0, 0), (1, 1, 0)]
    assert all(r["node_ip"] for r in record["layout"])
    for key in ("tokens_per_s", "ttft_s", "step_ms_median"):
        assert isinstance(record[key], float) and record[key] > 0
    printed = capsys.readouterr()
    assert "rank  pp  tp" in printed.out and "tokens/s:" in printed.out
    assert "time to first token" in printed.out and "p90" in printed.out
    assert f"first generated ids (prompt 0): {want.token_ids[0]}" in printed.out
    assert "12/12 tokens" in printed.err  # the progress line


def test_python_dash_m_rayexec_has_the_generate_command():
    done = subprocess.run([sys.executable, "-m", "rayexec", "generate", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for flag in ("--pp", "--tp", "--prompts", "--max-new-tokens", "--seed", "--device",
                 "--forward", "--channel", "--num-devices-per-worker", "--json"):
        assert flag in done.stdout
