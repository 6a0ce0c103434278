"""SPMD training on a rayexec WorkerGroup: DistributedDataParallel over gloo on CPU.

    python examples/ddp_train.py [--steps 5] [--workers 2]

Each worker (one Ray actor) gets rank, world_size and distributed_init_method from
rayexec, joins one torch.distributed process group, wraps the same small model in
DDP and trains a few SGD steps on its equal shard of a fixed global batch. DDP
averages the gradients over ranks; with a mean loss per rank on equal shards that
average is the gradient of the mean loss over the whole global batch, so the
trained parameters equal those of one process trained on the global batch
(`train_single`), up to float32 rounding. The script prints the losses and whether
the ranks' parameters agree with each other and with the single-process run.

The worker class lives here, importable as `examples.ddp_train.DDPTrainer`, so that
tests and the Ray workers can import it. Not a training framework: no data loader,
no checkpoints.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from torch import nn

IN_FEATURES, HIDDEN = 8, 16
ATOL = 1e-6
"""How close DDP and single-process parameters must be (float32: the two sum the
same gradients in a different order)."""

logger = logging.getLogger(__name__)


def make_model(seed: int) -> nn.Module:
    """The same initial weights for the same seed, in any process."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def global_batch(batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed regression batch: (inputs [batch, IN_FEATURES], targets [batch, 1])."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, IN_FEATURES, generator=gen)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(batch_size, 1, generator=gen)
    return x, y


def shard(batch_size: int, rank: int, world_size: int) -> slice:
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} does not split evenly over world_size="
                         f"{world_size}: DDP equals single-process training only with equal "
                         f"shards; use a multiple of {world_size}")
    n = batch_size // world_size
    return slice(rank * n, (rank + 1) * n)


def train_single(steps: int, batch_size: int = 16, seed: int = 0, lr: float = 0.1
                 ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The reference: one process, no DDP, mean loss over the whole global batch.
    Returns (loss per step, final parameters)."""
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = global_batch(batch_size, seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.named_parameters()}


class DDPTrainer:
    """One rank of the DDP job, built by rayexec with its rank kwargs."""

    def __init__(self, rank: int, local_rank: int, world_size: int, pp_rank: int, tp_rank: int,
                 distributed_init_method: str, batch_size: int = 16, seed: int = 0,
                 lr: float = 0.1) -> None:
        self.rank, self.world_size = rank, world_size
        self.init_method = distributed_init_method
        self.batch_size, self.seed, self.lr = batch_size, seed, lr
        self.rows = shard(batch_size, rank, world_size)

    def init_device(self) -> None:
        """Join the process group; every rank must call this at the same time."""
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=self.init_method, rank=self.rank,
                                world_size=self.world_size)

    def load_model(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's weights at construction; the seed makes them equal
        # anyway, and equal to train_single's.
        self.model = DistributedDataParallel(make_model(self.seed))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=self.lr)

    def train(self, steps: int) -> list[float]:
        """`steps` SGD steps on this rank's shard; this rank's loss per step."""
        x, y = global_batch(self.batch_size, self.seed)
        x, y = x[self.rows], y[self.rows]
        losses = []
        for _ in range(steps):
            self.opt.zero_grad()
            loss = nn.functional.mse_loss(self.model(x), y)
            loss.backward()  # DDP all-reduces (averages) the gradients here
            self.opt.step()
            losses.append(loss.item())
        return losses

    def parameters(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.module.named_parameters()}

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def train_ddp(steps: int, num_workers: int = 2, batch_size: int = 16, seed: int = 0,
              lr: float = 0.1) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Train on a WorkerGroup of `num_workers` CPU workers (joins or starts Ray).
    Returns (global mean loss per step, each rank's final parameters)."""
    from rayexec.group import WorkerGroup
    from rayexec.resources import ResourceConfig

    group = WorkerGroup.from_config(
        DDPTrainer, {"batch_size": batch_size, "seed": seed, "lr": lr},
        ResourceConfig(num_workers=num_workers, cpus_per_worker=0.5))
    try:
        group.run("init_device")
        group.run("load_model")
        per_rank = group.run("train", args=(steps,))
        params = group.run("parameters")
        group.run("close")
    finally:
        group.shutdown()
    # Equal shards: the mean of the ranks' mean losses is the global batch's mean loss.
    losses = [sum(step) / len(step) for step in zip(*per_rank)]
    return losses, params


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    losses, params = train_ddp(args.steps, args.workers, args.batch_size)
    ref_losses, ref_params = train_single(args.steps, args.batch_size)
    for step, (loss, ref) in enumerate(zip(losses, ref_losses)):
        print(f"step {step}: ddp loss {loss:.6f}  single-process loss {ref:.6f}")
    ranks_agree = all(torch.equal(p[k], params[0][k]) for p in params for k in p)
    diff = max_difference(params[0], ref_params)
    print(f"parameters identical on all {len(params)} ranks: {ranks_agree}")
    print(f"max |ddp - single-process| parameter difference: {diff:.2e} (atol {ATOL:g}): "
          f"{'match' if diff <= ATOL else 'MISMATCH'}")
    return 0 if ranks_agree and diff <= ATOL else 1


if __name__ == "__main__":
    # As a script, DDPTrainer is __main__.DDPTrainer: Ray pickles it by value, so the
    # workers need not import `examples` (they may run from another directory).
    sys.exit(main())
