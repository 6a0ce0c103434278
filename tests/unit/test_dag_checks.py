"""The compiled-graph and NCCL pre-flight checks (no cluster needed)."""

import sys

import pytest
import ray

from rayexec import dag


def test_auto_transport_is_shm_without_gpus_and_nccl_needs_them():
    assert dag.resolve_transport("auto", whole_gpus=False) == "shm"
    assert dag.resolve_transport("auto", whole_gpus=True) == "nccl"
    assert dag.resolve_transport("shm", whole_gpus=True) == "shm"
    assert dag.resolve_transport("gloo", whole_gpus=True) == "gloo"
    with pytest.raises(ValueError, match="channel=.nccl. needs a whole GPU on every worker"):
        dag.resolve_transport("nccl", whole_gpus=False)


def test_auto_is_shm_when_the_worker_owns_visibility():
    # Ray's NCCL channel picks the GPU from the visibility variable rayexec no longer sets.
    assert dag.resolve_transport("auto", whole_gpus=True, manage_visibility=False) == "shm"
    with pytest.raises(ValueError, match="manage_visibility=True"):
        dag.resolve_transport("nccl", whole_gpus=True, manage_visibility=False)


def test_nccl_without_cupy_on_a_worker_names_the_rank_and_the_install():
    no_cupy = {3: "ModuleNotFoundError: No module named 'cupy'"}
    with pytest.raises(ImportError, match=r"rank\(s\) \[3\].*pip install cupy-cuda12x"):
        dag.resolve_transport("nccl", whole_gpus=True, no_cupy=no_cupy)


def test_auto_without_cupy_on_a_worker_falls_back_to_shm_naming_the_rank(caplog):
    no_cupy = {1: "ModuleNotFoundError: No module named 'cupy'"}
    with caplog.at_level("WARNING", logger="rayexec.dag"):
        assert dag.resolve_transport("auto", whole_gpus=True, no_cupy=no_cupy) == "shm"
    assert "rank(s) [1]" in caplog.text and "cupy" in caplog.text


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
