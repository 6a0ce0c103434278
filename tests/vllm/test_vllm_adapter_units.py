"""The vLLM adapter's small parts, without starting an engine.

The helpers in `rayexec.integrations.vllm` need no vLLM; the executor module's
config mapping and future wrappers need vLLM installed (marked `vllm`).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from rayexec.errors import ExecutorTimeoutError, WorkerDiedError


# ---- no vLLM needed --------------------------------------------------------------------
@pytest.mark.parametrize(("cores", "text"), [
    ([0], "0"), ([1, 0], "0-1"), ([0, 1, 2, 3, 8], "0-3,8"), ([3, 5, 6, 7, 10, 11], "3,5-7,10-11"),
])
def test_cpu_ids_are_written_the_way_vllm_reads_them(cores, text):
    from rayexec.integrations.vllm.cpu_env import format_cpu_ids

    assert format_cpu_ids(cores) == text


def test_env_prefixes_are_added_once_after_rayexecs_own():
    from rayexec.integrations.vllm.cpu_env import VLLM_ENV_PREFIXES, merge_prefixes

    merged = merge_prefixes(("NCCL_", "VLLM_"), VLLM_ENV_PREFIXES)
    assert merged[:2] == ("NCCL_", "VLLM_")
    assert sorted(merged) == sorted({"NCCL_", *VLLM_ENV_PREFIXES})


def test_the_facade_names_what_it_lacks_and_how_to_install_vllm(monkeypatch):
    import rayexec.integrations.vllm as facade

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        facade.Nope  # noqa: B018

    def no_vllm(name):
        raise ImportError("No module named 'vllm'", name="vllm")

    monkeypatch.setattr(facade, "importlib", SimpleNamespace(import_module=no_vllm))
    with pytest.raises(ImportError, match=r"RayexecExecutor needs vLLM.*pip install"):
        facade.RayexecExecutor  # noqa: B018


# ---- with vLLM -------------------------------------------------------------------------
def fake_vllm_config(tp=2, pp=2, dp=1, world_size=None, kv_transfer=None):
    parallel = SimpleNamespace(
        tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
        world_size=world_size or tp * pp, placement_group=None)
    return SimpleNamespace(parallel_config=parallel, kv_transfer_config=kv_transfer,
                           ec_transfer_config=None, weight_transfer_config=None)


@pytest.mark.vllm
def test_config_follows_vllms_layout_and_copies_its_variables(monkeypatch):
    from rayexec.integrations.vllm import RayexecExecutor, VllmWorker
    from rayexec.integrations.vllm.executor import build_config

    assert RayexecExecutor.supports_pp and not RayexecExecutor.uses_ray
    assert RayexecExecutor.supports_async_scheduling()  # steps run in submission order
    monkeypatch.setenv("RAYEXEC_CHANNEL", "shm")
    monkeypatch.setenv("RAYEXEC_PIPELINE_PARALLEL_SIZE", "7")  # vLLM's layout wins
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    vllm_config = fake_vllm_config(tp=2, pp=2)
    config = build_config(vllm_config)

    assert (config.pipeline_parallel_size, config.tensor_parallel_size) == (2, 2)
    assert config.worker_cls is VllmWorker and config.device == "cpu"
    assert config.channel == "shm"  # RAYEXEC_* still sets the rest
    assert config.worker_kwargs == {"vllm_config": vllm_config, "cpu_bind": True}
    assert "VLLM_" in config.env_prefixes_to_copy and "NCCL_" in config.env_prefixes_to_copy


@pytest.mark.vllm
def test_vllms_nobind_turns_cpu_pinning_off(monkeypatch):
    from rayexec.integrations.vllm.executor import build_config

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    config = build_config(fake_vllm_config())
    assert config.cpu_bind is False and config.worker_kwargs["cpu_bind"] is False


@pytest.mark.vllm
@pytest.mark.parametrize(("kwargs", "named"), [
    ({"dp": 2}, "data_parallel_size=2"),
    ({"world_size": 8}, "world_size=8"),
    ({"kv_transfer": object()}, "KV/EC transfer connector"),
])
def test_layouts_beyond_pp_x_tp_are_refused_with_the_reason(kwargs, named):
    from rayexec.integrations.vllm.executor import check_supported

    with pytest.raises(NotImplementedError, match="distributed_executor_backend='mp'") as info:
        check_supported(fake_vllm_config(**kwargs))
    assert named in str(info.value)


@pytest.mark.vllm
def test_rpc_timeouts_surface_as_timeout_error_and_other_errors_unchanged():
    from rayexec.integrations.vllm.executor import _RpcResult

    inner: Future = Future()
    outer = _RpcResult(inner)
    inner.set_exception(ExecutorTimeoutError("collective_rpc('x')", [1], 2.0, "timeout"))
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\]"):
        outer.result()

    inner, died = Future(), WorkerDiedError([0], ["10.0.0.1"])
    outer = _RpcResult(inner)
    inner.set_exception(died)
    assert outer.exception() is died


@pytest.mark.vllm
def test_step_results_are_unpickled_once_and_errors_kept():
    from rayexec.integrations.vllm.executor import _StepResult

    step: Future = Future()
    step.set_result(pickle.dumps({"sampled": [[7]]}))
    result = _StepResult(step)
    assert result.result() == {"sampled": [[7]]}
    assert result.result() is result.result()  # settled once, not unpickled again

    failed: Future = Future()
    failed.set_exception(WorkerDiedError([1], ["10.0.0.2"]))
    with pytest.raises(WorkerDiedError, match="rank 1"):
        _StepResult(failed).result()


@pytest.mark.vllm
def test_the_serve_launcher_finds_vllms_server_pieces():
    # --help exits after every vLLM import the launcher needs and the parser build.
    proc = subprocess.run([sys.executable, "-m", "rayexec.integrations.vllm.serve", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--pipeline-parallel-size" in proc.stdout


@pytest.mark.vllm
def test_small_stage_outputs_cross_as_bytes_and_come_back_exact():
    import torch
    from vllm.sequence import IntermediateTensors

    from rayexec import wire
    from rayexec.integrations.vllm.edges import (
        SMALL_EDGE_BYTES,
        pack_for_next_stage,
        unpack_from_previous_stage,
    )

    torch.manual_seed(0)
    sent = {"hidden_states": torch.randn(4, 256).bfloat16(),
            "residual": torch.randn(256, 4).t(),  # not contiguous
            "positions": torch.arange(4)}
    packed = pack_for_next_stage(IntermediateTensors(dict(sent)))
    assert isinstance(packed, bytes)
    # rayexec frames it with the batch into one bytes message, which Ray passes as is.
    frame = wire.pack((9, b"batch", packed))
    assert isinstance(frame, bytes) and wire.unpack(frame) == (9, b"batch", packed)
    got = unpack_from_previous_stage(wire.unpack(frame)[2])
    assert isinstance(got, IntermediateTensors)
    for name, tensor in sent.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    got["positions"].add_(1)  # writable: the runner owns its copies
    assert torch.equal(unpack_from_previous_stage(packed)["positions"], torch.arange(4))

    # Larger outputs keep the edge's tensor transport, as they are.
    large = IntermediateTensors({"hidden_states": torch.zeros(SMALL_EDGE_BYTES // 4 + 1)})
    assert pack_for_next_stage(large) is large
    assert unpack_from_previous_stage(large) is large


def test_the_throughput_benchmark_pairs_rounds_and_says_what_they_resolve():
    from benchmarks.vllm_throughput import paired_ratio, summarize, table

    def ok(*rates: float) -> dict:
        return {"status": "ok", "tokens_per_s": list(rates), "ttft_s": [0.01], "start_s": 1.0,
                "load_avg_1min": 1.0, "generated_tokens": 8, "token_ids": [[1]]}
    # Round 2 is slow for both engines: pairing cancels it, pooling would not.
    ours = [ok(110, 120, 130), ok(60), {"status": "failed", "error": "x"}, ok(105)]
    mp = [ok(100), ok(50), ok(100), ok(100)]
    paired = paired_ratio(ours, mp)
    assert paired["by_round"] == pytest.approx([1.2, 1.2, 1.05])  # the failed round left out
    assert paired["median"] == pytest.approx(1.2)
    # Resampled medians of [1.2, 1.2, 1.05] are 1.05 in 7/27 of draws, else 1.2.
    assert paired["ci90"] == pytest.approx([1.05, 1.2])
    assert paired_ratio([ok(1)], [{"status": "failed"}]) == {"by_round": []}

    doc = {"layouts": {"tp2": {"tokens_agree": True, "backends": {
        "rayexec": summarize(ours) | {"vs_mp": paired}, "mp": summarize(mp)}}}}
    text = table(doc)
    assert "paired (90% CI)" in text and "1.20 (" in text


def test_the_throughput_benchmark_pairs_turns_within_engine_sets_and_resamples_the_sets():
    from benchmarks.vllm_throughput import paired_ratio, split_rounds, table

    def ok(rate: float, engine: int, round_index: int) -> dict:
        return {"status": "ok", "tokens_per_s": [rate], "engine": engine, "round": round_index}
    # Two fresh starts of both engines: ours is ahead in the first, behind in the second.
    ours = [ok(110, 0, i) for i in range(4)] + [ok(95, 1, i) for i in range(4)]
    mp = [ok(100, 0, i) for i in range(4)] + [ok(100, 1, i) for i in (0, 1, 3)]  # one missing
    paired = paired_ratio(ours, mp)
    assert paired["by_round"] == pytest.approx([1.1] * 4 + [0.95] * 3)  # paired by (set, round)
    assert paired["by_engine_set"] == pytest.approx([1.1, 0.95])
    # A quarter of the resamples draw the second set twice: the interval reaches 0.95,
    # so one good engine start cannot pass for "at least mp".
    assert paired["ci90"] == pytest.approx([0.95, 1.1])
    doc = {"layouts": {"tp2": {"tokens_agree": True, "backends": {"rayexec": {
        "tokens_per_s": 100.0, "tokens_per_s_min": 95, "tokens_per_s_max": 110,
        "tokens_per_s_by_round": [110, 95], "ttft_s": 0.01, "start_s": 1.0, "vs_mp": paired}}}}}
    assert "engine sets 1.10 0.95" in table(doc)

    assert split_rounds(30, 3) == [10, 10, 10]
    assert split_rounds(10, 3) == [4, 3, 3]
    assert split_rounds(2, 5) == [1, 1]  # never an engine set without rounds
    assert split_rounds(4, 0) == [4]


@pytest.mark.vllm
def test_a_step_result_read_from_two_threads_is_settled_once():
    import threading

    from rayexec.futures import StepQueue
    from rayexec.integrations.vllm.executor import _StepResult

    fetches = []
    release = threading.Event()
    queue = StepQueue()
    step = queue.submit(lambda: (fetches.append(1), release.wait(10))[1] and pickle.dumps(7))
    result = _StepResult(step)
    with pytest.raises(TimeoutError):
        result.result(timeout=0.1)  # not settled: still fetchable
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(result.result(timeout=10)))
               for _ in range(2)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(10)
    assert outs == [7, 7] and fetches == [1]
