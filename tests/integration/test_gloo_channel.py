"""channel="gloo": CPU stage edges through Ray's accelerator-channel path (metadata
over shared memory, tensors by gloo send/recv). The reference decoder's greedy ids
equal the single-process model's for PP2xTP1, PP2xTP2, PP4xTP1, with the hidden
states measured going through gloo; and once across simulated nodes."""

from __future__ import annotations

import pytest
import ray
import torch

from rayexec import RayDistributedExecutor
from rayexec.gloo import gloo_traffic
from rayexec.models import ReferenceModel, decoder_executor_config, generate, make_prompts
from tests.helpers import assert_no_leaks, cluster_snapshot

SEED = 0
PROMPTS = make_prompts(4, 8, 4096, seed=SEED)
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def reference():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return generate(ReferenceModel("small", seed=SEED), PROMPTS, NEW_TOKENS)
    finally:
        torch.set_num_threads(before)


def run_gloo(pp: int, tp: int, **fields):
    cfg = decoder_executor_config(pp, tp, model="small", seed=SEED, device="cpu",
                                  channel="gloo", **fields)
    with RayDistributedExecutor(cfg) as ex:
        got = generate(ex, PROMPTS, NEW_TOKENS)
        hints = ex._parts.dag.edge_type_hints()
        traffic = [ray.get(a.__ray_call__.remote(gloo_traffic)) for a in ex.workers]
        transport = ex.transport
    return got, hints, traffic, transport


@pytest.mark.parametrize(("pp", "tp"), [(2, 1), (2, 2), (4, 1)])
def test_gloo_channel_gives_the_single_process_greedy_ids(local_ray, reference, pp, tp):
    before = cluster_snapshot()
    got, hints, traffic, transport = run_gloo(pp, tp, num_devices_per_worker=0.5)
    assert got.token_ids == reference.token_ids
    assert transport == "gloo"
    assert len(hints) == (pp - 1) * tp
    assert all(h.transport == "accelerator" and
               type(h.get_custom_communicator()).__name__ == "GlooCommunicator" for h in hints)
    # Every stage but the last sent hidden states over gloo; every stage but the
    # first received them.
    for rank, t in enumerate(traffic):
        stage = rank // tp
        assert (t["sent"] > 0) == (stage < pp - 1), (rank, t)
        assert (t["received"] > 0) == (stage > 0), (rank, t)
    assert sum(t["sent"] for t in traffic) == sum(t["received"] for t in traffic)
    assert_no_leaks(before)
