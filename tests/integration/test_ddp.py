"""The SPMD proof: examples/ddp_train.py trains with DistributedDataParallel (gloo,
CPU) on a WorkerGroup of 2 workers; afterwards every rank holds the same parameters
and they equal a single process trained on the same global batch from the same
initial weights.

Tolerance: float32, atol 1e-6 (examples.ddp_train.ATOL), rtol 0. DDP averages the
ranks' gradients of per-shard mean losses over equal shards, which is the gradient
of the global mean loss, but summed in another order; measured difference ~1e-8.
"""

from __future__ import annotations

import pytest
import torch

from examples.ddp_train import ATOL, make_model, shard, train_ddp, train_single

STEPS = 5


def test_ddp_parameters_agree_across_ranks_and_with_single_process(local_ray, no_leaks):
    losses, params = train_ddp(STEPS, num_workers=2)
    ref_losses, ref_params = train_single(STEPS)

    assert len(params) == 2 and params[0].keys() == ref_params.keys()
    for name in ref_params:
        # The same all-reduced gradients on every rank: bit-identical parameters.
        assert torch.equal(params[0][name], params[1][name]), name
    initial = dict(make_model(0).named_parameters())
    moved = max((params[0][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3, "training did not change the parameters: the comparison proves nothing"
    torch.testing.assert_close(params[0], ref_params, atol=ATOL, rtol=0)
    assert losses == pytest.approx(ref_losses, abs=ATOL)
    assert losses[-1] < losses[0]


def test_uneven_shards_are_refused_with_the_fix():
    assert shard(16, 1, 2) == slice(8, 16)
    with pytest.raises(ValueError, match="batch_size=10 does not split evenly over world_size=3"):
        shard(10, 0, 3)
