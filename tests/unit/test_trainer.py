"""The reference trainer computes the serving decoder's function (no Ray): its
logits equal ReferenceModel's, and one SGD step lowers the loss."""

from __future__ import annotations

import torch

from rayexec.models.batch import StepBatch
from rayexec.models.reference import ReferenceModel
from rayexec.models.rl import TINY
from rayexec.models.trainer import TrainerWorker, TrainModel

IDS = [5, 17, 300, 42, 7, 99, 256, 3]


def test_training_forward_matches_the_serving_decoder():
    model = TrainModel(ReferenceModel(TINY).model, seed=0, tp_rank=0, tp=1)
    ours = model.logits(torch.tensor(IDS)).detach()
    ref = ReferenceModel(TINY)
    out = ref.decode_step(StepBatch.prefill([1], [IDS], return_logits=True))
    torch.testing.assert_close(ours[-1], out.logits[0], rtol=1e-4, atol=1e-4)


def test_one_step_lowers_the_loss_and_weight_shards_describe_it():
    trainer = TrainerWorker(0, 0, 1, 0, 0, "tcp://127.0.0.1:1", model=TINY, lr=0.1)
    trainer.init_device()
    first = trainer.train_step([IDS, IDS[::-1]])
    second = trainer.train_step([IDS, IDS[::-1]])
    assert second < first
    shards = trainer.weight_shards()
    tensor, spec = shards["layers.0.q_proj"]
    assert spec.dim is None and tuple(tensor.shape) == spec.shape == (64, 64)
    assert not tensor.requires_grad
