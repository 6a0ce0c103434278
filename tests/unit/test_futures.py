"""StepQueue: results in submission order, failures, laziness (pure)."""

import threading
from concurrent.futures import Future

import pytest

from rayexec.futures import StepQueue


def test_fetching_a_later_step_fetches_earlier_ones_first_in_order():
    fetched = []
    q = StepQueue()
    futures = [q.submit(lambda i=i: fetched.append(i) or i * 10) for i in range(3)]
    assert all(isinstance(f, Future) for f in futures)
    assert not any(f.done() for f in futures)  # nothing runs in the background
    assert futures[2].result() == 20
    assert fetched == [0, 1, 2]
    assert [f.result() for f in futures] == [0, 10, 20] and len(q) == 0


def test_fetch_all_reads_every_pending_step_in_order_and_keeps_the_results():
    fetched = []
    q = StepQueue()
    futures = [q.submit(lambda i=i: fetched.append(i) or i * 10) for i in range(3)]
    q.fetch_all()
    assert fetched == [0, 1, 2] and len(q) == 0 and all(f.done() for f in futures)
    assert [f.result() for f in futures] == [0, 10, 20]
    assert fetched == [0, 1, 2]  # not fetched again
    q.fetch_all()  # nothing pending: nothing happens


def test_an_exception_stays_with_its_own_step():
    q = StepQueue()

    def boom():
        raise KeyError("step 1")

    f0, f1, f2 = q.submit(lambda: "a"), q.submit(boom), q.submit(lambda: "c")
    assert f2.result() == "c"
    assert f0.result() == "a"
    with pytest.raises(KeyError):
        f1.result()
    assert isinstance(f1.exception(), KeyError)


def test_fail_all_fails_pending_without_fetching():
    fetched = []
    q = StepQueue()
    f0 = q.submit(lambda: fetched.append(0))
    f1 = q.submit(lambda: fetched.append(1))
    assert q.fail_all(RuntimeError("worker died")) == 2
    assert f0.done() and f1.done()
    with pytest.raises(RuntimeError, match="worker died"):
        f1.result()
    assert fetched == []


def test_fail_all_from_another_thread_while_the_caller_waits():
    q = StepQueue()
    release = threading.Event()
    f0 = q.submit(lambda: release.wait(5) and "late")
    f1 = q.submit(lambda: "never fetched")
    timer = threading.Timer(0.1, lambda: (q.fail_all(RuntimeError("died")), release.set()))
    timer.start()
    # f0's fetch was already running, so its own outcome stands (with Ray, a death
    # makes that fetch raise); f1 was still waiting and is failed without a fetch.
    assert f0.result() == "late"
    with pytest.raises(RuntimeError, match="died"):
        f1.result()
    timer.join()
