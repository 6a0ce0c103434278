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


def test_result_with_a_timeout_returns_in_time_while_the_fetch_is_blocked():
    q = StepQueue()
    release = threading.Event()
    f0 = q.submit(lambda: release.wait(10) and "slow")
    with pytest.raises(TimeoutError):
        f0.result(timeout=0.2)  # the fetch is blocked; the caller is not
    assert not f0.done()
    release.set()
    assert f0.result(timeout=10) == "slow"  # the same step, fetched once


def test_concurrent_futures_wait_and_as_completed_drive_the_fetch():
    import concurrent.futures as cf

    q = StepQueue()
    futures = [q.submit(lambda i=i: i) for i in range(3)]
    done, not_done = cf.wait(futures, timeout=10)
    assert len(done) == 3 and not not_done
    more = [q.submit(lambda i=i: i + 10) for i in range(3)]
    assert sorted(f.result() for f in cf.as_completed(more, timeout=10)) == [10, 11, 12]


def test_asyncio_wrap_future_resolves_a_step():
    import asyncio

    q = StepQueue()
    f0, f1 = q.submit(lambda: "a"), q.submit(lambda: "b")

    async def main():
        return await asyncio.wrap_future(f1), await asyncio.wrap_future(f0)

    assert asyncio.run(asyncio.wait_for(main(), 10)) == ("b", "a")


def test_two_threads_fetching_get_each_step_once_in_order():
    fetched = []
    q = StepQueue()
    futures = [q.submit(lambda i=i: fetched.append(i) or i) for i in range(50)]
    results: list = [None, None]
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(
        k, [f.result() for f in futures[k::2]])) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert fetched == list(range(50))
    assert results == [list(range(0, 50, 2)), list(range(1, 50, 2))]
