"""The compiled-graph and NCCL pre-flight checks (no cluster needed)."""

import sys

import pytest
import ray

from rayexec import dag


def test_auto_transport_is_shm_without_gpus_and_nccl_needs_them():
    assert dag.resolve_transport("auto", all_workers_have_gpu=False) == "shm"
    assert dag.resolve_transport("shm", all_workers_have_gpu=True) == "shm"
    with pytest.raises(ValueError, match="channel=.nccl. needs a whole GPU on every worker"):
        dag.resolve_transport("nccl", all_workers_have_gpu=False)


def test_nccl_without_cupy_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(ImportError, match=r"needs cupy .*pip install 'ray\[cgraph\]'"):
        dag.resolve_transport("nccl", all_workers_have_gpu=True)
    with pytest.raises(ImportError, match="cupy"):
        dag.resolve_transport("auto", all_workers_have_gpu=True)


def test_old_ray_names_found_and_needed_versions(monkeypatch):
    monkeypatch.setattr(ray, "__version__", "2.30.0")
    with pytest.raises(ImportError, match=r"ray >= 2\.44\.0; found ray 2\.30\.0.*forward='rpc'"):
        dag.check_compiled_graphs()


def test_missing_cgraph_parts_name_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.dag", None)
    with pytest.raises(ImportError, match=r"pip install 'ray\[cgraph\]"):
        dag.check_compiled_graphs()


def test_this_ray_passes():
    dag.check_compiled_graphs()


def test_blocked_teardown_is_explained_once_at_info(monkeypatch, caplog):
    """A known Ray 2.60 behaviour: one INFO line with the reason, then DEBUG only."""
    import logging

    monkeypatch.setattr(dag, "_teardown_explained", False)
    with caplog.at_level(logging.DEBUG, logger="rayexec.dag"):
        for _ in range(3):
            dag._log_blocked_teardown(5.0)
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG]
    assert "Ray 2.60" in caplog.records[0].getMessage()
    assert "nothing is lost" in caplog.records[0].getMessage()
