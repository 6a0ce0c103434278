"""WeightState: which states let steps run, and what the refusal says (no Ray)."""

from __future__ import annotations

import pytest

from rayexec.errors import ExecutorAsleepError, WeightSyncError
from rayexec.weights.sync import WeightState


def test_seeded_and_synced_serve_mixed_and_dropped_refuse():
    state = WeightState()
    state.check_servable()  # the workers' own weights
    state.set("synced", 3)
    state.check_servable()
    state.set("mixed", 4, "weight sync to version 4 failed midway")
    with pytest.raises(WeightSyncError, match="steps are refused: weight sync to version 4"):
        state.check_servable()


def test_asleep_is_named_before_the_weights():
    state = WeightState()
    state.asleep = 2
    with pytest.raises(ExecutorAsleepError, match=r"asleep \(level 2\); call wake_up"):
        state.check_servable()


def test_a_restart_drops_a_synced_version_but_not_the_seeded_one():
    state = WeightState()
    state.workers_rebuilt()
    state.check_servable()
    state.set("synced", 7)
    state.session = (("a",), "g", 1)
    state.workers_rebuilt()
    assert state.session is None
    with pytest.raises(WeightSyncError, match="no longer hold version 7; call update_weights"):
        state.check_servable()
