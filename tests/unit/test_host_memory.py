"""host_memory.keep_freed_memory: glibc's thresholds raised once per process (checked
in fresh processes, through mallinfo2), off with RAYEXEC_KEEP_FREED_MEMORY=0."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys

import pytest

from rayexec import envs

PROBE = r"""
import ctypes, json
from rayexec import host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = host_memory.keep_freed_memory()
block = bytearray(16 << 20)  # 16 MiB: mmapped by default, from the heap once raised
in_mmap = libc.mallinfo2().hblkhd
del block
print(json.dumps({"applied": applied, "again": host_memory.keep_freed_memory(),
                  "mmapped": in_mmap, "free_kept": libc.mallinfo2().fordblks}))
"""

glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="malloc thresholds are set on glibc only; the check reads mallinfo2 (glibc 2.33+)")


def probe(**env: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root, **env}, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_a_large_block_comes_from_the_heap_and_stays_after_free():
    got = probe(RAYEXEC_KEEP_FREED_MEMORY="")
    assert got["applied"] is True and got["again"] is True
    assert got["mmapped"] < 16 << 20
    assert got["free_kept"] >= 16 << 20  # not trimmed: the next step reuses it


@glibc_only
def test_off_leaves_glibc_defaults():
    got = probe(RAYEXEC_KEEP_FREED_MEMORY="0")
    assert got["applied"] is False and got["again"] is False
    assert got["mmapped"] >= 16 << 20  # glibc's default: a block this large is mmapped


@pytest.mark.parametrize("text, expected", [("", True), ("1", True), ("off", False),
                                            ("0", False)])
def test_the_switch_parses(monkeypatch, text, expected):
    monkeypatch.setenv("RAYEXEC_KEEP_FREED_MEMORY", text)
    assert envs.keep_freed_memory() is expected


def test_a_bad_switch_names_the_variable_and_value(monkeypatch):
    monkeypatch.setenv("RAYEXEC_KEEP_FREED_MEMORY", "maybe")
    with pytest.raises(ValueError, match=r"RAYEXEC_KEEP_FREED_MEMORY='maybe' is invalid.*1/0"):
        envs.keep_freed_memory()
