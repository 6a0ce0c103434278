"""GlooCommunicator: Ray's compiled-graph tensor channel over torch.distributed gloo.

channel="gloo" hands an instance to `with_tensor_transport(transport=...)`, so CPU
stage edges take the same path NCCL edges take on GPUs: the tensors' shapes and
dtypes go through a shared-memory metadata channel, then the tensors themselves
through this communicator's point-to-point `send`/`recv` (a gloo process group of
its own, over TCP), with no pickling of tensor bytes and no copy into Ray's object
store. What is not a CPU tensor (the batch, Python values, CUDA tensors) takes
Ray's CPU data channel beside it, as with NCCL.

Ray 2.60 built that path for accelerators only; two things make it take CPU
tensors (both set by `initialize`, in each worker process, which Ray runs there
before it creates the channels):
- Ray's channel context must name a device whose type is not "cpu" (Ray asserts
  it) and that CPU tensors are "on" (Ray sends only tensors on that device through
  the communicator): `HOST`, a stand-in that compares equal to torch's cpu device;
- Ray wraps channel reads and writes in its accelerator context's device context:
  `_HostContext` answers with no context at all.
The class subclasses Ray's CPUCommunicator because Ray lets only that class (and
subclasses) span actors that hold no accelerator.

`gloo_traffic(actor_self)` (run in a worker through `__ray_call__`) reports the
bytes this process's gloo channels moved. Not here: choosing the transport
(dag.py, executor.py).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ray.experimental.channel.accelerator_context import AcceleratorContext
from ray.experimental.channel.cpu_communicator import CPUCommunicator

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class _HostDevice:
    """Host memory, under a device type other than "cpu" (see the module docstring)."""

    type = "gloo"
    index = None

    def __eq__(self, other: object) -> bool:
        import torch

        return other is self or (isinstance(other, torch.device) and other.type == "cpu")

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "host memory (gloo channel)"


HOST = _HostDevice()


class _HostContext(AcceleratorContext):
    """Ray's accelerator context for a gloo worker: host memory, no device context."""

    def __init__(self) -> None:
        super().__init__("cpu", GlooCommunicator)

    def get_device_context(self, device: Any) -> Any:
        return nullcontext()


class GlooCommunicator(CPUCommunicator):
    """Point-to-point CPU tensors between the compiled graph's actors over gloo.

    `actors` in rank order (the communicator's ranks are rayexec's); `node_ips[r]` is
    rank r's address (its gloo endpoint binds there); rank 0 hosts the rendezvous
    store on `master_port`. `timeout_s` bounds every send and receive."""

    def __init__(self, actors: list[Any], node_ips: list[str], master_port: int,
                 timeout_s: float) -> None:
        super().__init__(len(actors), actors)
        if len(node_ips) != len(actors):
            raise ValueError(f"GlooCommunicator: {len(actors)} actors but {len(node_ips)} "
                             f"node_ips; give one address per actor, in rank order")
        self._node_ips = list(node_ips)
        self._master_port = master_port
        self._timeout_s = timeout_s
        self._group: Any = None
        self.bytes_sent = 0  # in this process: for tests and diagnostics
        self.bytes_received = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_group"] = None  # a process group belongs to the process that built it
        return state

    def initialize(self, rank: int) -> None:
        """In each actor, all at once (Ray starts every rank's call before waiting):
        the rendezvous, then the channel context Ray's accelerator path needs."""
        import torch.distributed as dist
        from ray.experimental.channel import ChannelContext

        super().initialize(rank)
        timeout = timedelta(seconds=self._timeout_s)
        store = dist.TCPStore(self._node_ips[0], self._master_port, self._world_size,
                              is_master=rank == 0, timeout=timeout)
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=self._node_ips[rank])]
        self._group = dist.ProcessGroupGloo(store, rank, self._world_size, options)
        ChannelContext.get_current().set_torch_device(HOST)
        AcceleratorContext.set(_HostContext())
        logger.debug("gloo channel: rank %d of %d ready", rank, self._world_size)

    def send(self, tensor: torch.Tensor, peer_rank: int) -> None:
        self._check_open()
        tensor = tensor.contiguous()
        self._group.send([tensor], peer_rank, 0).wait()
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, peer_rank: int,
             allocator: Any = None) -> torch.Tensor:
        import torch

        self._check_open()
        # Ray's allocator would allocate on the channel context's device (HOST).
        buf = torch.empty(shape, dtype=dtype)
        self._group.recv([buf], peer_rank, 0).wait()
        self.bytes_received += buf.numel() * buf.element_size()
        return buf

    def _check_open(self) -> None:
        if self._group is None:
            from ray.exceptions import RayChannelError

            raise RayChannelError(f"gloo channel of rank {self._rank} is closed "
                                  f"(destroyed, or never initialized in this process)")

    def destroy(self) -> None:
        self._group = None

    def get_transport_name(self) -> str:
        # "accelerator" is what makes Ray build the metadata + send/recv channel.
        return "accelerator"

    def recv_stream(self) -> None:  # no streams on the host
        return None

    def send_stream(self) -> None:
        return None


def gloo_traffic(_actor: Any = None) -> dict[str, int]:
    """Bytes sent and received by this process's gloo channels (live or closed)."""
    from ray.experimental.channel import ChannelContext

    comms = [c for c in ChannelContext.get_current().communicators.values()
             if isinstance(c, GlooCommunicator)]
    return {"sent": sum(c.bytes_sent for c in comms),
            "received": sum(c.bytes_received for c in comms)}
