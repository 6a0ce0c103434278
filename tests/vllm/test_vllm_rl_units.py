"""The pieces of vLLM's weight-update paths on rayexec that need no engine: the
extension's checks and sources, the tensor-transport option, and the config
mapping for vLLM's weight_transfer_config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rayexec.config import ExecutorConfig
from rayexec.integrations.vllm.extension import WeightUpdateError, check_weights, load_source

EXPECTED = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,)}


def test_a_complete_update_with_the_checkpoints_shapes_passes():
    check_weights(dict(EXPECTED), EXPECTED, rank=3)


@pytest.mark.parametrize(("received", "named"), [
    ({**EXPECTED, "model.norm.weight": (9,)},
     r"rank 2: .*'model.norm.weight' has shape \(9,\), the engine's checkpoint has \(8,\)"),
    ({**EXPECTED, "model.nrom.weight": (8,)}, r"rank 2: .*unknown weight name\(s\) \['model.nrom"),
    ({"model.norm.weight": (8,)}, r"rank 2: .*missing weight\(s\) \['model.embed_tokens.weight'\]"),
])
def test_a_wrong_name_or_shape_is_refused_naming_the_parameter_and_rank(received, named):
    with pytest.raises(WeightUpdateError, match=named) as info:
        check_weights(received, EXPECTED, rank=2)
    assert "nothing was loaded" in str(info.value)


def test_sources_that_cross_the_engine_socket_come_back_as_tensors(tmp_path):
    # vLLM brings safetensors; the `.[test]`-only install (GPU machines) may not have it.
    st = pytest.importorskip(
        "safetensors.torch", reason="safetensors is not installed (it comes with '.[vllm]')")

    weights = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    path = tmp_path / "w.safetensors"
    st.save_file(weights, path)
    for source in (str(path), str(tmp_path), st.save(weights)):
        got = load_source(source, rank=0)
        assert set(got) == {"a", "b"}
        assert torch.equal(got["a"], weights["a"]) and got["b"].dtype == torch.bfloat16
    with pytest.raises(WeightUpdateError, match=r"rank 1: no safetensors file at"):
        load_source(str(tmp_path / "nope.safetensors"), rank=1)
    with pytest.raises(WeightUpdateError, match=r"rank 1: weights of type dict cannot"):
        load_source(weights, rank=1)  # a dict of tensors: what does not cross the socket


def test_enable_tensor_transport_is_validated():
    with pytest.raises(ValueError, match=r"ExecutorConfig.enable_tensor_transport='yes'"):
        ExecutorConfig(worker_cls=object, enable_tensor_transport="yes")


# ---- with Ray --------------------------------------------------------------------------
class _Trainer:
    def weights(self, delay_s: float) -> dict:
        import time

        time.sleep(delay_s)
        return {"a": torch.zeros(2)}


def test_object_ref_sources_fail_clearly_when_the_trainer_dies_or_stalls(local_ray):
    ray = local_ray
    trainer = ray.remote(num_cpus=0)(_Trainer).remote()
    assert set(load_source([trainer.weights.remote(0.0)], rank=0)) == {"a"}
    with pytest.raises(WeightUpdateError, match=r"rank 0: .*within timeout_s=0.5 s"):
        load_source([trainer.weights.remote(3600.0)], rank=0, timeout_s=0.5)
    pending = trainer.weights.remote(3600.0)
    ray.kill(trainer)
    with pytest.raises(WeightUpdateError, match=r"rank 0: fetching the weights failed .*died"):
        load_source([pending], rank=0, timeout_s=60)


def test_rank_actors_get_ray_tensor_transport_when_configured(local_ray, no_leaks):
    from rayexec.executor import RayDistributedExecutor
    from tests.workers import RecordingWorker, expected

    base = dict(pipeline_parallel_size=1, tensor_parallel_size=2, device="cpu",
                num_devices_per_worker=0.5, worker_cls=RecordingWorker)
    for enabled in (True, False):
        config = ExecutorConfig(**base, enable_tensor_transport=enabled)
        with RayDistributedExecutor(config) as executor:
            actors = executor.workers
            assert [bool(a._ray_enable_tensor_transport) for a in actors] == [enabled, enabled]
            # Ray then runs the actor's tasks on background threads; steps still work.
            assert torch.equal(executor.execute_model({"x": [2.0]})["h"], expected([2.0], pp=1))


# ---- with vLLM -------------------------------------------------------------------------
def vllm_config_with(weight_transfer):
    parallel = SimpleNamespace(tensor_parallel_size=2, pipeline_parallel_size=1,
                               data_parallel_size=1, world_size=2, placement_group=None)
    return SimpleNamespace(parallel_config=parallel, kv_transfer_config=None,
                           ec_transfer_config=None, weight_transfer_config=weight_transfer)


@pytest.mark.vllm
@pytest.mark.parametrize(("backend", "transport"), [
    (None, False), ("nccl", False), ("ipc", False), ("sparse_nccl", False),
    ("nccl_m2n", False), ("sharded_rdt", True),
])
def test_the_backend_gives_sharded_rdt_tensor_transport_and_nothing_else(backend, transport):
    from vllm.config.weight_transfer import WeightTransferConfig

    from rayexec.integrations.vllm.executor import build_config

    wt = None if backend is None else WeightTransferConfig(backend=backend)
    assert build_config(vllm_config_with(wt)).enable_tensor_transport is transport
