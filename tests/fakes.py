"""Test doubles for hardware this machine lacks.

`RecordingPlatform` is the CUDA platform with its device calls recorded instead of
made: `set_device` keeps the index per thread (as CUDA does) and logs (thread name,
index); `current_device` answers 0 on a thread that never set one, as CUDA does.
It lives in an importable module so that it pickles by reference into workers.
"""

from __future__ import annotations

import threading

from rayexec.platform import CUDA, Platform

_thread = threading.local()
LOG: list[tuple[str, int]] = []  # (thread name, index), in this process


class RecordingPlatform(Platform):
    def set_device(self, index: int) -> None:
        _thread.device = index
        LOG.append((threading.current_thread().name, index))

    def current_device(self) -> int | None:
        return getattr(_thread, "device", 0)


def recording_cuda() -> RecordingPlatform:
    return RecordingPlatform(CUDA.name, CUDA.resource_key, CUDA.visibility_var,
                             CUDA.noset_var, CUDA.torch_backend, CUDA.torch_device)


def current_device() -> int:
    """What the calling thread would compute on (0 until something set it)."""
    return getattr(_thread, "device", 0)
