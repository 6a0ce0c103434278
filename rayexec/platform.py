"""Device kinds rayexec knows: cuda, rocm, npu and cpu.

For each kind: the Ray resource a worker reserves, the environment variable that
sets which devices a process sees, Ray's variable that stops Ray from setting it
(the `RAY_EXPERIMENTAL_NOSET_*` names, checked against Ray's
`ray/_private/accelerators/`), the torch.distributed backend and the torch device
type. Pure data plus one resolver for `device="auto"`, and the one place that
knows how to make a device current on a thread (`set_device`, torch imported
lazily); no Ray import. Tests substitute a subclass that records the calls.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DEVICE_KINDS = ("auto", "cuda", "rocm", "npu", "cpu")


@dataclass(frozen=True)
class Platform:
    name: str
    """cuda | rocm | npu | cpu."""
    resource_key: str
    """The Ray resource one worker reserves devices of: GPU, NPU or CPU."""
    visibility_var: str | None
    """Variable listing the devices a process may see; None on cpu."""
    noset_var: str | None
    """Ray's variable that makes Ray leave `visibility_var` alone."""
    torch_backend: str
    """torch.distributed backend for collectives between workers."""
    torch_device: str
    """torch device type workers compute on."""

    @property
    def is_accelerator(self) -> bool:
        return self.visibility_var is not None

    def set_device(self, index: int) -> None:
        """Make device `index` (a position in this process's visibility list) current on
        the calling thread. The current device is per thread in torch, CUDA and cupy,
        so every thread that runs device code calls this once."""
        module = self._torch_module()
        if module is None:
            return
        if not module.is_available():
            # Ray granted devices this torch cannot use: a CPU-only torch on a node
            # started with num_gpus=N (tests), or a broken driver (the engine's first
            # device call then fails with torch's own error).
            _warn_unusable(self.name, index)
            return
        module.set_device(index)

    def current_device(self) -> int | None:
        """The calling thread's current device index; None on cpu or when torch
        cannot use the device kind."""
        module = self._torch_module()
        return module.current_device() if module and module.is_available() else None

    def _torch_module(self):  # torch.cuda / torch.npu, or None on cpu
        if self.torch_device == "cpu":
            return None
        import torch

        if self.torch_device == "npu" and not hasattr(torch, "npu"):
            try:
                import torch_npu  # noqa: F401  (it adds torch.npu)
            except ImportError:
                return None
        return getattr(torch, self.torch_device, None)


_warned: set[str] = set()


def _warn_unusable(name: str, index: int) -> None:
    if name not in _warned:
        _warned.add(name)
        logger.warning("device %s:%d not set: torch in this process cannot use %s devices",
                       name, index, name)


CUDA = Platform(
    "cuda", "GPU", "CUDA_VISIBLE_DEVICES", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES",
    "nccl", "cuda",
)
# ROCm keeps the "cuda" torch device type and NCCL backend name (RCCL underneath).
ROCM = Platform(
    "rocm", "GPU", "HIP_VISIBLE_DEVICES", "RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES",
    "nccl", "cuda",
)
NPU = Platform(
    "npu", "NPU", "ASCEND_RT_VISIBLE_DEVICES",
    "RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES", "hccl", "npu",
)
CPU = Platform("cpu", "CPU", None, None, "gloo", "cpu")

PLATFORMS: dict[str, Platform] = {p.name: p for p in (CUDA, ROCM, NPU, CPU)}

# Every device-visibility variable of every kind. These are per-worker facts and
# are never copied from the driver's environment into a worker's.
VISIBILITY_VARS: frozenset[str] = frozenset(
    {p.visibility_var for p in PLATFORMS.values() if p.visibility_var}
    | {"ROCR_VISIBLE_DEVICES"}
)


def get_platform(name: str) -> Platform:
    """The platform called `name` (not "auto": use `resolve_platform`)."""
    try:
        return PLATFORMS[name]
    except KeyError:
        raise ValueError(
            f"device={name!r} is not a known device kind; use one of {sorted(PLATFORMS)}"
        ) from None


def resolve_platform(
    device: str, cluster_resources: Mapping[str, float], torch_is_hip: bool = False
) -> Platform:
    """Turn the configured `device` into a Platform.

    "auto" picks an accelerator when the cluster has one (GPU resources are ROCm
    when the driver's torch is a HIP build), else cpu.
    """
    if device != "auto":
        return get_platform(device)
    if cluster_resources.get("GPU", 0) > 0:
        return ROCM if torch_is_hip else CUDA
    if cluster_resources.get("NPU", 0) > 0:
        return NPU
    return CPU
