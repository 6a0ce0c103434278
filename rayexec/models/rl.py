"""The reference RL loop: generate with the executor, train one step on the
generated sequences, sync the trainer's weights into the executor, generate again,
and check the result against a single-process ReferenceModel holding the trainer's
full weights.

    with RLSetup.start(train_dp=2, train_tp=1, serve_pp=2, serve_tp=1) as rl:
        for i in range(3):
            print(rl.iteration(i + 1))

`colocate=True` puts the trainer and the executor on the same bundles of one
placement group (each actor takes half a bundle's CPUs); the executor sleeps
(level 1, caches freed) while the trainer trains. Not here: the sync (weights/).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray

from rayexec.executor import RayDistributedExecutor
from rayexec.group import WorkerGroup
from rayexec.models.config import DecoderConfig
from rayexec.models.engine import generate, make_prompts
from rayexec.models.reference import ReferenceModel
from rayexec.models.trainer import TrainerWorker, full_weights
from rayexec.models.worker import decoder_executor_config
from rayexec.placement import ensure_ray
from rayexec.resources import ResourceConfig

logger = logging.getLogger(__name__)

LOGITS_ATOL = 1e-4
TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 4,
        "num_heads": 4}


@dataclass
class RLSetup:
    trainer: WorkerGroup
    executor: RayDistributedExecutor
    model: DecoderConfig
    prompts: list[list[int]]
    max_new_tokens: int
    colocate: bool
    placement_group: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)
    via: str = "auto"
    """The weight sync's route (RayDistributedExecutor.update_weights(via=))."""

    @classmethod
    def start(cls, train_dp: int = 1, train_tp: int = 1, serve_pp: int = 1, serve_tp: int = 1,
              *, model: DecoderConfig | Mapping[str, Any] | str = "small",
              colocate: bool = False, num_prompts: int = 4, prompt_len: int = 8,
              max_new_tokens: int = 8, lr: float = 0.05, seed: int = 0,
              forward: str = "dag") -> RLSetup:
        config = DecoderConfig.from_any(model)
        n_train, n_serve = train_dp * train_tp, serve_pp * serve_tp
        pg = None
        train_kwargs = {"dp": train_dp, "tp": train_tp, "model": config, "seed": seed, "lr": lr}
        # Join RAY_ADDRESS or start the embedded Ray as the executor would, before
        # a placement group is made.
        ensure_ray(decoder_executor_config(serve_pp, serve_tp, model=config, device="cpu"))
        if colocate:
            from ray.util.placement_group import placement_group

            pg = placement_group([{"CPU": 1.0}] * max(n_train, n_serve))
            ray.get(pg.ready(), timeout=60)
            trainer = WorkerGroup.from_placement_group(
                TrainerWorker, train_kwargs, pg, bundle_indices=list(range(n_train)),
                device="cpu", num_devices_per_worker=0.5)
            serve_fields = {"placement_group": pg, "bundle_indices": tuple(range(n_serve)),
                            "num_devices_per_worker": 0.5}
        else:
            trainer = WorkerGroup.from_config(
                TrainerWorker, train_kwargs, ResourceConfig(num_workers=n_train,
                                                            cpus_per_worker=0.5))
            serve_fields = {"num_devices_per_worker": 0.5}
        try:
            trainer.run("init_device")
            executor = RayDistributedExecutor(decoder_executor_config(
                serve_pp, serve_tp, model=config, seed=seed, device="cpu", forward=forward,
                num_cpus_per_worker=0, **serve_fields))
        except BaseException:
            trainer.shutdown()
            if pg is not None:
                ray.util.remove_placement_group(pg)
            raise
        prompts = make_prompts(num_prompts, prompt_len, config.vocab_size, seed)
        return cls(trainer, executor, config, prompts, max_new_tokens, colocate, pg)

    def iteration(self, version: int) -> dict[str, Any]:
        """One generate -> train -> sync -> generate round; the check of the second
        generation against the reference."""
        first = generate(self.executor, self.prompts, self.max_new_tokens)
        sequences = [p + out for p, out in zip(self.prompts, first.token_ids)]
        freed = None
        if self.colocate:
            freed = sum(r["rss_before"] - r["rss_after"] for r in self.executor.sleep(1)
                        if r["rss_before"] is not None)
        loss = self.trainer.run("train_step", (sequences,))[0]
        if self.colocate:
            self.executor.wake_up()
        report = self.executor.update_weights(self.trainer, version=version, via=self.via)
        out = generate(self.executor, self.prompts, self.max_new_tokens, return_logits=True)
        reference = ReferenceModel(self.model, device="cpu")
        # The check gathers the full weights through the driver; the sync never does.
        reference.shard.load_named(full_weights(self.trainer.run("weight_shards")))
        ref = generate(reference, self.prompts, self.max_new_tokens, return_logits=True)
        diff = max(float((a - b).abs().max()) for a, b in zip(out.final_logits,
                                                               ref.final_logits))
        record = {
            "version": self.executor.weights_version, "loss": loss, "sync_s": report.seconds,
            "bytes": report.bytes, "bytes_by_source_rank": report.bytes_by_source_rank,
            "route": report.route,
            "ids": out.token_ids, "reference_ids": ref.token_ids,
            "max_logit_diff": diff,
            "identical": out.token_ids == ref.token_ids and diff <= LOGITS_ATOL,
        }
        if freed is not None:
            record["sleep_rss_freed_bytes"] = freed
        self.history.append(record)
        return record

    def shutdown(self) -> None:
        try:
            self.executor.shutdown()
        finally:
            self.trainer.shutdown()
            if self.placement_group is not None:
                ray.util.remove_placement_group(self.placement_group)

    def __enter__(self) -> RLSetup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def run_rl(train_dp: int, train_tp: int, serve_pp: int, serve_tp: int, iterations: int,
           **options: Any) -> list[dict[str, Any]]:
    """Start, run `iterations` rounds (versions 1..K), shut down; the per-round records."""
    start = time.perf_counter()
    with RLSetup.start(train_dp, train_tp, serve_pp, serve_tp, **options) as rl:
        logger.info("rl: started in %.1fs", time.perf_counter() - start)
        return [rl.iteration(v) for v in range(1, iterations + 1)]
