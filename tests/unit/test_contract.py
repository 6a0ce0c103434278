"""The worker contract checked on the driver: misspelt class names get close
suggestions, and a constructor that cannot take rayexec's arguments is refused
before Ray or any actor starts. Also the CPU oversubscription warning's wording."""

from __future__ import annotations

import sys

import pytest
import ray

from rayexec import ExecutorConfig, RayDistributedExecutor
from rayexec.contract import (
    RANK_ARGUMENTS,
    check_constructor,
    import_worker_cls,
    load_worker_cls,
)
from rayexec.diagnosis import cpu_oversubscription
from tests.workers import RecordingWorker


class MyWorker:
    def __init__(self, rank, local_rank, world_size, pp_rank, tp_rank,
                 distributed_init_method, scale=1.0):
        self.scale = scale


class OnlyRank:
    def __init__(self, rank):
        self.rank = rank


class TakesAnything:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def test_misspelt_class_in_main_suggests_the_close_name(monkeypatch):
    monkeypatch.setattr(sys.modules["__main__"], "MyWorker", MyWorker, raising=False)
    with pytest.raises(ValueError, match=r"has no class 'MyWorkr'; did you mean 'MyWorker'\?"):
        import_worker_cls("__main__.MyWorkr")


def test_misspelt_module_suggests_the_sibling_module():
    with pytest.raises(ValueError, match=r"did you mean 'tests\.workers'") as info:
        import_worker_cls("tests.workrs.RecordingWorker")
    assert "cannot be imported" in str(info.value)


def test_nothing_close_gives_no_suggestion():
    with pytest.raises(ValueError) as info:
        import_worker_cls("tests.workers.Zzzzzzzz")
    assert "did you mean" not in str(info.value)


def test_constructor_missing_rayexec_arguments_lists_the_contract():
    with pytest.raises(TypeError) as info:
        check_constructor(OnlyRank, {})
    message = str(info.value)
    assert "OnlyRank(rank)" in message and "unexpected keyword argument" in message
    for name in RANK_ARGUMENTS:
        assert name in message
    assert "**kwargs" in message  # the fix


def test_constructor_missing_a_worker_kwarg_or_refusing_one():
    with pytest.raises(TypeError, match="unexpected keyword argument 'size'"):
        check_constructor(MyWorker, {"size": 2})
    check_constructor(MyWorker, {"scale": 2.0})
    check_constructor(TakesAnything, {"anything": 1})
    check_constructor(RecordingWorker, {"extra": 1})


def test_class_without_a_readable_signature_is_not_checked():
    check_constructor(dict, {})  # C constructor: inspect gives up, no false alarm


def test_load_worker_cls_imports_then_checks():
    assert load_worker_cls("tests.workers.RecordingWorker", {}) is RecordingWorker
    with pytest.raises(TypeError, match="rayexec's arguments"):
        load_worker_cls(OnlyRank, {})


def test_executor_refuses_a_bad_constructor_before_ray_starts():
    if ray.is_initialized():
        pytest.skip("Ray already runs in this process; the integration row covers it")
    with pytest.raises(TypeError, match="cannot be built with rayexec's arguments"):
        RayDistributedExecutor(ExecutorConfig(worker_cls=OnlyRank, device="cpu"))
    assert not ray.is_initialized()


def test_oversubscription_message_has_the_numbers():
    assert cpu_oversubscription(2, 2) is None
    message = cpu_oversubscription(4, 2)
    assert message is not None
    assert "4 CPU workers share this node's 2 core(s)" in message
    assert "at most 2 workers" in message
