"""What RayDistributedExecutor.update_weights / sleep / wake_up do, apart from the
executor so that its module stays about steps and lifecycle.

Lock order: `WeightState.lock` (one sync or sleep/wake at a time), then the
executor's step lock (`StepQueue.lock`: in-flight steps are fetched first, new
steps wait until the sync ends). Steps check `WeightState.check_servable` under the
step lock, so a step never starts between a failed sync and its verdict.

Not here: the sync itself (sync.py).
"""

from __future__ import annotations

import logging
from typing import Any

from rayexec.futures import StepQueue
from rayexec.group import WorkerGroup
from rayexec.weights.sync import DEFAULT_BUCKET_BYTES, SyncReport, WeightState, sync_weights

logger = logging.getLogger(__name__)


def update(state: WeightState, steps: StepQueue, dst: WorkerGroup, src: Any, *,
           version: Any = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES, stage: bool = False,
           timeout: float, via: str = "auto") -> SyncReport:
    if not isinstance(src, WorkerGroup):
        raise TypeError(f"update_weights(source=...) takes a WorkerGroup or a "
                        f"RayDistributedExecutor, got {type(src).__name__}")
    if not src.actors:
        raise ValueError("update_weights: the source WorkerGroup has no workers (shut down?)")
    if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"update_weights(bucket_bytes={bucket_bytes!r}): expected a positive "
                         f"byte count (default {DEFAULT_BUCKET_BYTES})")
    with state.lock, steps.lock:
        steps.fetch_all()
        if version is None:
            version = state.version + 1 if isinstance(state.version, int) else 1
        report = sync_weights(state, dst, src, version=version, bucket_bytes=bucket_bytes,
                              stage=stage, timeout=timeout, via=via)
        logger.info("weights now at version %r (%.1f MiB in %.3fs, %s)", version,
                    report.bytes / 2**20, report.seconds, report.route)
        return report


def sleep(state: WeightState, steps: StepQueue, group: WorkerGroup, level: int,
          timeout: float) -> list[Any]:
    """Every rank's sleep(level) (when its class has one); steps refused until wake_up."""
    if level not in (1, 2):
        raise ValueError(f"sleep(level={level!r}): expected 1 (free caches) or 2 (caches and "
                         f"weights)")
    with state.lock, steps.lock:
        steps.fetch_all()
        out = group.run("sleep", (level,), timeout=timeout)
        state.asleep = max(state.asleep, level)
        if level == 2:
            state.set("dropped", state.version, "sleep(level=2) freed the weights; call "
                      "wake_up() and then update_weights() before the next step")
        return out


def wake_up(state: WeightState, steps: StepQueue, group: WorkerGroup, timeout: float) -> None:
    with state.lock, steps.lock:
        group.run("wake_up", timeout=timeout)
        state.asleep = 0
