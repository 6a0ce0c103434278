"""Releasing the /dev/shm names of the shared memory that vLLM's groups set up.

`release_shm_names()` runs in a vLLM worker right after vLLM's `init_device`. It is
not a general shared-memory janitor: it touches only names that this process's
vLLM groups created, and only once every rank has attached.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"


def release_shm_names() -> list[str]:
    """Unlink the /dev/shm names of the shared memory that vLLM's groups in this
    process created, once every rank has mapped it; returns the names unlinked.

    Two kinds, both set up while vLLM's `init_device` forms its groups: the CPU
    communicators' segments (TP and PP groups on CPU; named after the port of the
    distributed init method) and the TP groups' message-queue ring buffer (24 MiB).
    vLLM unlinks them only when its processes exit cleanly; rayexec kills its
    workers at shutdown (and a worker may die), so the names would stay, holding
    memory, and a later engine that draws the same port fails to start ("create
    shm in SHMManager failed. errno: 17"). Each group's set-up ends with every rank
    attached (a barrier after the communicators join, a handshake after the queue's
    readers open it), so the memory stays mapped where it is used; only the names go."""
    try:  # vLLM internals, which may move between versions
        from vllm.distributed.device_communicators.cpu_communicator import (
            _CPUSHMDistributed,
        )
        from vllm.distributed.parallel_state import _groups
    except ImportError as e:
        logger.warning("cannot release the /dev/shm names of vLLM's groups (%s); they stay "
                       "there until removed by hand", e)
        return []

    released = []
    for ref in list(_groups.values()):
        group = ref()
        if group is None:
            continue
        comm = getattr(getattr(group, "device_communicator", None), "dist_module", None)
        if isinstance(comm, _CPUSHMDistributed):
            for group_rank in range(group.world_size):
                name = f"{comm.group_name}_{group_rank}"  # vLLM's SHMManager::get_shm_name
                try:
                    os.unlink(os.path.join(SHM_DIR, name))
                except FileNotFoundError:
                    continue  # another rank of the group was first
                released.append(name)
        ring = getattr(getattr(group, "mq_broadcaster", None), "buffer", None)
        if ring is not None and getattr(ring, "is_creator", False):
            ring.shared_memory.unlink()  # also tells Python's resource tracker
            ring.is_creator = False  # vLLM's __del__ would unlink it a second time
            released.append(ring.shared_memory.name)
    if released:
        logger.debug("unlinked the /dev/shm names %s", released)
    return released
