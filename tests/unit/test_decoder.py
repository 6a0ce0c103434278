"""The reference decoder without Ray: its math against a naive float64 version,
TP and PP sharding (TP ranks simulated as threads summing through a barrier), the
KV cache, step batches and the engine loop."""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

from rayexec.models import (
    DecoderConfig,
    DecoderShard,
    KVCache,
    ReferenceModel,
    StepBatch,
    generate,
    make_decode_batch,
    make_prompts,
)
from rayexec.models.weights import full_tensor, shard_tensor, tp_slice

TINY = DecoderConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=4,
                     num_heads=4)
# float32 logits of two layouts (different summation orders) agree this closely;
# measured differences are ~1e-6.
LOGITS_ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core box run far faster single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- config -----------------------------------------------------------------------------
def test_config_validation_names_field_value_and_fix():
    with pytest.raises(ValueError, match=r"num_heads=6 is invalid: must divide hidden_size=64"):
        DecoderConfig(hidden_size=64, num_heads=6)
    with pytest.raises(ValueError, match=r"layer_split=\(1, 2\) is invalid.*num_layers=4"):
        DecoderConfig(num_layers=4, layer_split=(1, 2))
    with pytest.raises(ValueError, match="dtype='float64'"):
        DecoderConfig(dtype="float64")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide num_heads=4"):
        TINY.check_layout(1, 3)
    with pytest.raises(ValueError, match="pipeline_parallel_size=5 exceeds num_layers=4"):
        TINY.check_layout(5, 1)
    with pytest.raises(ValueError, match=r"has 2 entries but pipeline_parallel_size=3"):
        DecoderConfig(num_layers=4, layer_split=(1, 3)).check_layout(3, 1)
    with pytest.raises(ValueError, match=r"unknown DecoderConfig field\(s\) \['layers'\]"):
        DecoderConfig.from_any({"layers": 3})
    with pytest.raises(ValueError, match="unknown decoder preset 'huge'"):
        DecoderConfig.from_any("huge")


def test_presets_and_from_any():
    small = DecoderConfig.from_any("small")
    assert (small.hidden_size, small.num_layers, small.num_heads, small.vocab_size) == (
        256, 8, 8, 4096)
    assert DecoderConfig.from_any("large").hidden_size > small.hidden_size
    assert DecoderConfig.from_any({"num_layers": 2}).num_layers == 2
    assert DecoderConfig.from_any(TINY) is TINY


def test_stage_layers_even_with_remainder_and_explicit_split():
    cfg = DecoderConfig(num_layers=8)
    assert cfg.stage_layers(4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert DecoderConfig(num_layers=7).stage_layers(3) == [range(0, 3), range(3, 5),
                                                           range(5, 7)]
    uneven = DecoderConfig(num_layers=8, layer_split=(3, 5))
    assert uneven.stage_layers(2) == [range(0, 3), range(3, 8)]


# ---- weights ------------------------------------------------------------------------------
def test_weights_depend_only_on_seed_and_name():
    a = full_tensor(TINY, 7, "layers.2.q_proj")
    assert torch.equal(a, full_tensor(TINY, 7, "layers.2.q_proj"))
    assert not torch.equal(a, full_tensor(TINY, 8, "layers.2.q_proj"))
    assert not torch.equal(a, full_tensor(TINY, 7, "layers.3.q_proj"))
    assert a.shape == (64, 64) and full_tensor(TINY, 7, "layers.0.down_proj").shape == (64, 128)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_slices_partition_the_full_tensor(tp):
    for leaf, dim in [("q_proj", 0), ("gate_proj", 0), ("o_proj", 1), ("down_proj", 1)]:
        name = f"layers.1.{leaf}"
        full = full_tensor(TINY, 3, name)
        parts = [shard_tensor(TINY, 3, name, r, tp) for r in range(tp)]
        assert all(p.shape[dim] == full.shape[dim] // tp for p in parts)
        assert torch.equal(torch.cat(parts, dim=dim), full)
    embed = full_tensor(TINY, 3, "embed")
    assert torch.equal(tp_slice("embed", embed, 1, tp), embed)  # replicated


# ---- the math -------------------------------------------------------------------------------
def naive_logits(cfg: DecoderConfig, seed: int, tokens: list[int]) -> torch.Tensor:
    """Every position's logits, written out plainly in float64 with no cache."""
    def w(name):
        return full_tensor(cfg, seed, name).double()

    def norm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    n, hd, heads = len(tokens), cfg.head_dim, cfg.num_heads
    half = hd // 2
    freq = torch.tensor([cfg.rope_theta ** (-2 * j / hd) for j in range(half)], dtype=torch.double)
    angle = torch.arange(n, dtype=torch.double)[:, None, None] * freq  # [n, 1, half]

    def rope(x):  # pairs (j, j + half) rotated by angle j
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * angle.cos() - x2 * angle.sin(),
                          x2 * angle.cos() + x1 * angle.sin()], dim=-1)

    h = w("embed")[torch.tensor(tokens)]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        x = norm(h, w(p + "attn_norm"))
        q, k, v = ((x @ w(p + m).T).view(n, heads, hd) for m in ("q_proj", "k_proj", "v_proj"))
        q, k = rope(q), rope(k)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)
        h = h + attn @ w(p + "o_proj").T
        x = norm(h, w(p + "mlp_norm"))
        gate = x @ w(p + "gate_proj").T
        h = h + (gate * torch.sigmoid(gate) * (x @ w(p + "up_proj").T)) @ w(p + "down_proj").T
    return norm(h, w("final_norm")) @ w("lm_head").T


def test_model_matches_a_naive_float64_implementation():
    tokens = make_prompts(1, 12, TINY.vocab_size, seed=5)[0]
    expected = naive_logits(TINY, 11, tokens)
    model = ReferenceModel(TINY, seed=11)
    # Every prefix as its own request, all in one ragged prefill batch.
    prefixes = [tokens[:n] for n in range(1, len(tokens) + 1)]
    out = model.execute_model(StepBatch.prefill(range(100, 100 + len(prefixes)), prefixes,
                                                return_logits=True))
    assert out.logits.shape == (len(tokens), TINY.vocab_size)
    torch.testing.assert_close(out.logits.double(), expected, atol=LOGITS_ATOL, rtol=0)
    assert list(out.next_token_ids) == expected.argmax(-1).tolist()


def test_kv_cache_decode_equals_recomputing_the_whole_sequence():
    model = ReferenceModel(TINY, seed=2)
    prompt = make_prompts(1, 9, TINY.vocab_size, seed=1)[0]
    # 20 new tokens: the cache grows past its first capacity (16) on the way.
    result = generate(model, [prompt], 20, return_logits=True)
    generated = result.token_ids[0]
    assert len(generated) == 20
    fresh = ReferenceModel(TINY, seed=2)
    for k in range(len(generated)):
        out = fresh.prefill([1000 + k], [prompt + generated[:k]], return_logits=True)
        assert out.next_token_ids[0] == generated[k], f"token {k} differs"
    torch.testing.assert_close(out.logits[0], result.final_logits[0], atol=LOGITS_ATOL, rtol=0)


# ---- tensor and pipeline parallelism, simulated in one process ---------------------------------
class BarrierAllReduce:
    """An all-reduce for TP ranks running as threads: sum in rank order, in place."""

    def __init__(self, tp: int) -> None:
        self.slots: list[torch.Tensor | None] = [None] * tp
        self.barrier = threading.Barrier(tp, timeout=30)

    def for_rank(self, rank: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total += other
            self.barrier.wait()  # everyone has read every slot before any is overwritten
            return t.copy_(total)
        return all_reduce


class SimulatedLayout:
    """PP x TP DecoderShards in one process, answering execute_model like an executor."""

    def __init__(self, cfg: DecoderConfig, seed: int, pp: int, tp: int) -> None:
        cfg.check_layout(pp, tp)
        self.tp = tp
        self.pool = ThreadPoolExecutor(tp)
        self.stages = []
        for s, layers in enumerate(cfg.stage_layers(pp)):
            reduce = BarrierAllReduce(tp)
            self.stages.append([
                DecoderShard(cfg, seed, layers, tp_rank=t, tp=tp, embed=s == 0,
                             head=s == pp - 1 and t == 0,
                             all_reduce=reduce.for_rank(t) if tp > 1 else None)
                for t in range(tp)])

    def execute_model(self, batch, non_block=False):
        hidden = [None] * self.tp
        for stage in self.stages:
            hidden = list(self.pool.map(lambda a: a[0].forward(batch, a[1]),
                                        zip(stage, hidden)))
            # After every row-parallel all-reduce, the TP ranks agree bit for bit.
            assert all(torch.equal(hidden[0], h) for h in hidden[1:])
        out = self.stages[-1][0].sample(batch, hidden[0])
        if not non_block:
            return out
        future = Future()
        future.set_result(out)
        return future

    def cache_stats(self):
        return [shard.cache.stats() for stage in self.stages for shard in stage]


@pytest.mark.parametrize("pp,tp", [(1, 2), (1, 4), (2, 1), (2, 2), (4, 1), (3, 1)])
def test_sharded_layouts_compute_the_single_process_function(pp, tp):
    prompts = make_prompts(3, 10, TINY.vocab_size, seed=4)
    want = generate(ReferenceModel(TINY, seed=9), prompts, 6, return_logits=True)
    layout = SimulatedLayout(TINY, 9, pp, tp)
    got = generate(layout, prompts, 6, micro_batches=2, return_logits=True)
    assert got.token_ids == want.token_ids
    for a, b in zip(got.final_logits, want.final_logits):
        torch.testing.assert_close(a, b, atol=LOGITS_ATOL, rtol=0)
    assert all(s["requests"] == 0 and s["bytes"] == 0 for s in layout.cache_stats())


def test_uneven_layer_split_gives_the_same_function():
    cfg = DecoderConfig(**{**TINY.__dict__, "layer_split": (1, 3)})
    prompts = make_prompts(2, 8, cfg.vocab_size, seed=2)
    want = generate(ReferenceModel(cfg, seed=1), prompts, 4).token_ids
    layout = SimulatedLayout(cfg, 1, 2, 2)
    assert [len(shard.stack) for shard in (layout.stages[0][0], layout.stages[1][0])] == [1, 3]
    assert generate(layout, prompts, 4).token_ids == want


def test_shard_holds_only_its_part():
    shard = DecoderShard(TINY, 0, range(2, 4), tp_rank=1, tp=2, embed=False, head=False)
    assert shard.embed is None and not shard.has_head
    assert len(shard.stack) == 2 and shard.local_heads == 2
    assert shard.stack[0].q_proj.shape == (32, 64) and shard.stack[0].o_proj.shape == (64, 32)
    assert shard.stack[0].gate_proj.shape == (64, 64) and shard.stack[0].down_proj.shape == (64, 64)
    with pytest.raises(ValueError, match="received no hidden states"):
        shard.forward(StepBatch.prefill([1], [[1, 2]]))


# ---- KV cache ----------------------------------------------------------------------------------
def test_kv_cache_append_rewind_gap_and_free():
    cache = KVCache(num_layers=2, num_heads=2, head_dim=4)
    cache.reserve(1, 0, 3)
    k = torch.arange(24.0).view(2, 3, 4)
    keys, values = cache.write(1, 0, k, -k)
    assert torch.equal(keys, k) and torch.equal(values, -k)
    cache.reserve(1, 3, 1)  # append
    keys, _ = cache.write(1, 0, torch.full((2, 1, 4), 7.0), torch.zeros(2, 1, 4))
    assert keys.shape == (2, 4, 4) and torch.equal(keys[:, :3], k)
    cache.reserve(1, 2, 1)  # rewind: position 2 is recomputed, 3 dropped
    assert cache.length(1) == 3
    with pytest.raises(ValueError, match="starts at position 5 but its KV cache holds 3"):
        cache.reserve(1, 5, 1)
    with pytest.raises(ValueError, match="request 2: step starts at position 1 .* holds 0"):
        cache.reserve(2, 1, 1)
    cache.reserve(2, 0, 40)  # beyond the initial capacity
    stats = cache.stats()
    assert stats["requests"] == 2 and stats["tokens"] == 43 and stats["bytes"] > 0
    assert cache.free([1, 99]) == 1 and 1 not in cache and 2 in cache
    assert cache.free([2]) == 1
    assert cache.stats() == {"requests": 0, "tokens": 0, "bytes": 0}


def test_finished_requests_free_their_cache_at_the_next_step():
    model = ReferenceModel(TINY, seed=0)
    model.execute_model(StepBatch.prefill([1, 2], [[5, 6, 7], [8, 9]]))
    both = model.kv_cache_stats()
    assert both["requests"] == 2
    out = model.execute_model(StepBatch.decode([2], [3], [2], finished=[1]))
    after = model.kv_cache_stats()
    assert out.request_ids == (2,) and after["requests"] == 1 and after["bytes"] < both["bytes"]
    model.execute_model(StepBatch.free_only([2]))
    assert model.kv_cache_stats() == {"requests": 0, "tokens": 0, "bytes": 0}


def test_generate_frees_requests_that_finish_early_before_the_end():
    model = ReferenceModel(TINY, seed=0)
    seen = []  # (batch, cache requests after the step)

    class Recording:
        def execute_model(self, batch, non_block=False):
            out = model.execute_model(batch, non_block)
            seen.append((batch, model.kv_cache_stats()["requests"]))
            return out

    prompts = make_prompts(4, 6, TINY.vocab_size, seed=3)
    result = generate(Recording(), prompts, [1, 5, 2, 5], micro_batches=1)
    assert [len(t) for t in result.token_ids] == [1, 5, 2, 5]
    short = {seen[0][0].request_ids[0], seen[0][0].request_ids[2]}
    freed_at = [i for i, (b, _) in enumerate(seen) if set(b.finished) & short]
    assert freed_at and freed_at[0] < len(seen) - 1  # freed while others still decode
    assert seen[freed_at[-1]][1] == 2  # only the two long requests remain cached
    assert model.kv_cache_stats()["requests"] == 0


def test_a_failed_step_frees_every_request_and_the_error_reaches_the_caller():
    model = ReferenceModel(TINY, seed=0)
    batches = []

    class FailsOnThirdStep:
        def execute_model(self, batch, non_block=False):
            batches.append(batch)
            if len(batches) == 3:
                raise RuntimeError("step 3 failed")
            return model.execute_model(batch, non_block)

    prompts = make_prompts(4, 6, TINY.vocab_size, seed=3)
    with pytest.raises(RuntimeError, match="step 3 failed"):
        generate(FailsOnThirdStep(), prompts, 5, micro_batches=2)
    everyone = {rid for b in batches[:2] for rid in b.request_ids}
    assert len(everyone) == 4
    assert batches[-1].request_ids == () and set(batches[-1].finished) == everyone
    assert model.kv_cache_stats()["requests"] == 0


# ---- batches and the engine ----------------------------------------------------------------------
def test_step_batch_validation():
    with pytest.raises(ValueError, match="2 request_ids but 1 num_tokens"):
        StepBatch((1, 2), (1,), (5,), (0, 0))
    with pytest.raises(ValueError, match="has 3 tokens but num_tokens=\\(1, 1\\)"):
        StepBatch((1, 2), (1, 1), (5, 6, 7), (0, 0))
    with pytest.raises(ValueError, match="repeats a request"):
        StepBatch.decode([1, 1], [5, 6], [3, 3])
    with pytest.raises(ValueError, match=r"requests \[2\] are both computed and finished"):
        StepBatch.decode([2], [5], [3], finished=[2])
    b = StepBatch.prefill([4, 5], [[1, 2, 3], [9]])
    assert b.num_tokens == (3, 1) and b.positions_tensor().tolist() == [0, 1, 2, 0]


def test_generate_is_independent_of_micro_batching_and_validates_input():
    prompts = make_prompts(5, 8, TINY.vocab_size, seed=8)
    one = generate(ReferenceModel(TINY, seed=3), prompts, 4)
    three = generate(ReferenceModel(TINY, seed=3), prompts, 4, micro_batches=3)
    assert one.token_ids == three.token_ids
    summary = one.summary()
    assert summary["tokens"] == 20 and summary["decode_steps"] == 3
    assert len(one.ttft_s) == 5 and summary["tokens_per_s"] > 0
    with pytest.raises(ValueError, match="one max_new_tokens >= 1 per prompt"):
        generate(ReferenceModel(TINY), prompts, [1, 2])
    with pytest.raises(ValueError, match="at least one token"):
        generate(ReferenceModel(TINY), [[1], []], 2)


def test_make_prompts_is_deterministic():
    a = make_prompts(4, 10, 50, seed=1)
    assert a == make_prompts(4, 10, 50, seed=1) and a != make_prompts(4, 10, 50, seed=2)
    assert all(5 <= len(p) <= 10 and all(0 <= t < 50 for t in p) for p in a)


def test_decode_batch_can_be_repeated_for_benchmarks():
    model = ReferenceModel(TINY, seed=0)
    batch = make_decode_batch(model, num_requests=8, context_len=12, vocab_size=TINY.vocab_size)
    assert batch.num_requests == 8 and set(batch.start_positions) == {12}
    first = model.execute_model(batch)
    again = model.execute_model(batch)
    assert first.next_token_ids == again.next_token_ids
    assert model.kv_cache_stats()["tokens"] == 8 * 13
    model.execute_model(StepBatch.free_only(batch.request_ids))
    assert model.kv_cache_stats()["requests"] == 0
