"""Keep the driver's freed host memory for the next step instead of returning it to
the OS (glibc's malloc thresholds).

Why: on CPU every step hands the driver the last stage's output as a fresh buffer
(Ray's channel read copies it out), and the driver frees it before the next one.
glibc decides by two moving thresholds whether such a block comes from memory it
already has or from new pages, and it can settle into giving a 1 MiB block back to
the OS on every free and faulting 256 fresh pages in on every step. Measured here (2
cores, PP=2 x TP=2 echo, 1 MiB, after 130 steps of 4 KiB): 255 page faults per step
in the driver and 1.4-1.6 ms a step; with the thresholds below, 0-5 faults and
0.80-0.89 ms. Which state a process ends up in depends on what it allocated before,
so without this the same step costs either.

What: M_MMAP_THRESHOLD 32 MiB (glibc's largest on 64-bit: blocks below it come from
the heap and are reused) and M_TRIM_THRESHOLD 64 MiB (the heap keeps up to that much
free memory instead of trimming it), set once per process, glibc only. The cost is
that the process may keep up to about 64 MiB of freed memory. It changes the whole
process's malloc, so it is logged, and RAYEXEC_KEEP_FREED_MEMORY=0 turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import platform

from rayexec import envs

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20

_applied: bool | None = None  # once per process


def keep_freed_memory() -> bool:
    """Raise this process's malloc thresholds (see the module docstring); True if they
    are set, now or by an earlier call. Does nothing off glibc or when
    RAYEXEC_KEEP_FREED_MEMORY=0."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not envs.keep_freed_memory():
        logger.debug("RAYEXEC_KEEP_FREED_MEMORY=0: malloc thresholds left as they are")
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    if _applied:
        logger.info("set this process's malloc thresholds (mmap %d MiB, trim %d MiB) so that "
                    "step outputs reuse freed memory; RAYEXEC_KEEP_FREED_MEMORY=0 turns this off",
                    MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
    return _applied
