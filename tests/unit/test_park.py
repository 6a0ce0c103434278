"""park.py's pure parts: which stage blocks on which park step, and the gate."""

from __future__ import annotations

import threading

import pytest

from rayexec.park import IdleTimer, Park, ParkGate


@pytest.mark.parametrize("pp", [1, 2, 3, 4])
def test_each_stage_blocks_on_exactly_one_park_step_last_stage_first(pp):
    blocked_on = {}
    for index in range(pp):
        for pp_rank in range(pp):
            if Park(1, index).blocks(pp_rank, pp):
                assert pp_rank not in blocked_on
                blocked_on[pp_rank] = index
    assert sorted(blocked_on) == list(range(pp))
    # A stage blocks only after passing every earlier park step on, so that the
    # stages after it have them: the last stage takes the first, stage 0 the last.
    assert blocked_on[pp - 1] == 0 and blocked_on[0] == pp - 1


def test_gate_blocks_until_woken_with_its_park_id():
    gate = ParkGate()
    done = threading.Event()
    thread = threading.Thread(target=lambda: (gate.wait(2), done.set()))
    thread.start()
    gate.wake(1)  # an older park's wake does not release park 2
    assert not done.wait(0.3) and gate.parked
    gate.wake(2)
    assert done.wait(5) and not gate.parked
    thread.join()


def test_a_wake_that_arrives_before_its_park_is_kept():
    gate = ParkGate()
    gate.wake(3)
    gate.wait(3)  # returns at once
    gate.wait(2)
    assert not gate.parked


def test_idle_timer_asks_again_after_the_returned_delay_and_stops_on_none():
    calls = []

    def park_if_idle():
        calls.append(1)
        return 0.01 if len(calls) < 3 else None

    timer = IdleTimer(park_if_idle)
    timer.start()
    timer.join(5)
    assert not timer.is_alive() and len(calls) == 3
