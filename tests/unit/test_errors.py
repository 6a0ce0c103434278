"""Errors carry their facts, read well, and survive pickling across processes."""

import pickle

from rayexec.errors import (
    ExecutorTimeoutError,
    PlacementError,
    RayExecError,
    WorkerDiedError,
    WorkerError,
)


def test_worker_error_names_rank_node_method_and_traceback():
    e = WorkerError(3, "10.0.0.2", "load_model", "OSError", "no weights", "Traceback...\nOSError")
    assert "rank 3" in str(e) and "10.0.0.2" in str(e) and "load_model()" in str(e)
    assert "Traceback..." in str(e)
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.rank, e2.node_ip, e2.method, e2.exc_type, e2.traceback) == (
        3, "10.0.0.2", "load_model", "OSError", "Traceback...\nOSError")


def test_died_and_timeout_errors_read_and_pickle():
    d = pickle.loads(pickle.dumps(WorkerDiedError([1, 2], ["10.0.0.1", "10.0.0.2"], "killed")))
    assert d.ranks == [1, 2] and "rank 1 on node 10.0.0.1" in str(d)
    assert "restart_failed_workers" in str(d)
    t = ExecutorTimeoutError("forward step 7", [2, 3], 5.0, "ExecutorConfig.execute_timeout_s",
                             stages=[1])
    t2 = pickle.loads(pickle.dumps(t))
    assert t2.stages == [1] and t2.ranks == [2, 3]
    assert "stage(s) [1], rank(s) [2, 3]" in str(t) and "raise ExecutorConfig.execute_timeout_s" \
        in str(t)


def test_hierarchy():
    for cls in (PlacementError, WorkerError, WorkerDiedError, ExecutorTimeoutError):
        assert issubclass(cls, RayExecError)
