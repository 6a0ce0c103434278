"""Device rules that need no device: moving a stage's input onto the worker's own
device, and the platform's device calls on CPU."""

import torch

from rayexec.actor import to_device
from rayexec.platform import CPU, CUDA


def test_tensors_of_the_device_kind_move_through_nested_containers():
    a, b, c = torch.ones(2), torch.zeros(1), torch.ones(3)
    value = {"hidden": a, "more": [b, (c, 7)], "n": 3}
    # "cpu:0" is another device than a CPU tensor's "cpu" (as cuda:1 is to cuda:0):
    # every tensor is moved (a new tensor), the structure and the rest stay.
    moved = to_device(value, torch.device("cpu", 0))
    assert moved["hidden"] is not a and moved["more"][0] is not b
    assert moved["more"][1][0] is not c and torch.equal(moved["more"][1][0], c)
    assert moved["n"] == 3 and isinstance(moved["more"][1], tuple) and moved["more"][1][1] == 7
    # Tensors of another kind (CPU tensors, for a meta target) are left as they are.
    kept = to_device(value, torch.device("meta"))
    assert kept["hidden"] is a and kept["more"][1][0] is c


def test_the_cpu_platform_sets_nothing_and_cuda_without_cuda_is_a_no_op():
    CPU.set_device(3)
    assert CPU.current_device() is None
    CUDA.set_device(1)  # torch here cannot use CUDA: a warning, not a crash
    assert CUDA.current_device() is None


def test_overlap_comm_with_tp_warns_once_per_process(caplog, monkeypatch):
    from rayexec import executor

    monkeypatch.setattr(executor, "_overlap_warned", False)
    with caplog.at_level("WARNING", logger="rayexec.executor"):
        executor._warn_overlap_with_tp()
        executor._warn_overlap_with_tp()
    warnings = [r for r in caplog.records if "overlap_comm=True" in r.getMessage()]
    assert len(warnings) == 1 and "deadlock" in warnings[0].getMessage()
