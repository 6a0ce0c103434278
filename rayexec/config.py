"""ExecutorConfig: everything the user chooses about an executor, in one frozen
dataclass validated at construction.

Each field's docstring is its documentation (docs/configuration.md is generated from
the same text). Errors name the field, the value given and what is allowed. The
config is never written after construction; runtime facts (the placement group
actually used, the rank order) live in the executor. Environment variables reach
a config only through `ExecutorConfig.from_env()`, implemented in `envs.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rayexec.contract import RANK_ARGUMENTS
from rayexec.layout import WORKER_SPECIFIC_VARS
from rayexec.platform import DEVICE_KINDS

CHANNELS = ("auto", "nccl", "shm", "gloo")
FORWARD_MODES = ("dag", "rpc")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Keyword arguments rayexec itself passes to the worker class.
RESERVED_WORKER_KWARGS = frozenset(RANK_ARGUMENTS)


@dataclass(frozen=True, kw_only=True)
class ExecutorConfig:
    worker_cls: Any = None
    """The engine's worker class: a class object or a "pkg.module.Class" string.
    Required."""
    worker_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the worker class, next to the ones rayexec passes
    (rank, local_rank, world_size, pp_rank, tp_rank, distributed_init_method)."""
    pipeline_parallel_size: int = 1
    """Pipeline stages (PP). world_size = PP x TP."""
    tensor_parallel_size: int = 1
    """Workers per stage (TP)."""
    device: str = "auto"
    """auto | cuda | rocm | npu | cpu. auto picks the cluster's accelerator, else cpu."""
    channel: str = "auto"
    """Tensor transport between stages: auto | nccl | shm | gloo. auto = nccl when
    every worker has a whole GPU and cupy, else shm. gloo sends CPU tensors with
    torch.distributed point-to-point over TCP (Ray's accelerator-channel path with a
    gloo communicator)."""
    overlap_comm: bool = False
    """Overlap GPU communication with compute in the compiled DAG (GPU + nccl only)."""
    forward: str = "dag"
    """dag = compiled Ray DAG per step; rpc = plain Ray actor calls (same results)."""
    num_devices_per_worker: float = 1.0
    """Devices each worker reserves (GPUs/NPUs; on device=cpu, logical CPUs)."""
    num_cpus_per_worker: float = 0.0
    """Extra logical CPUs reserved next to an accelerator worker's devices."""
    memory_per_worker: int | None = None
    """Bytes of Ray memory reserved per worker; None reserves none."""
    placement_group: Any = None
    """An existing Ray placement group to place workers in (it is never removed)."""
    placement_strategy: str = "PACK"
    """Strategy of a placement group rayexec creates: PACK | SPREAD | STRICT_PACK |
    STRICT_SPREAD."""
    placement_group_name: str | None = None
    """Name of the group to create; a live group with this name is reused."""
    bundle_indices: tuple[int, ...] | None = None
    """Which bundles of the placement group to use, one per worker, in creation
    order. Default: the first world_size bundles."""
    pg_ready_timeout_s: float = 60.0
    """Seconds to wait for the placement group before PlacementError."""
    init_timeout_s: float = 600.0
    """Seconds each start-up phase may take on every rank (setting the workers'
    environments, init_worker, init_device, load_model; also during a restart)
    before ExecutorTimeoutError naming the phase and the ranks still in it."""
    execute_timeout_s: float = 300.0
    """Seconds one forward step may take (the compiled graph's get timeout)."""
    max_step_bytes: int = 16 << 20
    """forward="dag": the compiled graph's channel buffers are sized for messages up
    to this many bytes (a stage's output, the batch, the last stage's result). A
    larger message still arrives, but Ray then grows that channel, a one-time cost
    whose old buffer Ray keeps until the graph is torn down. Ray 2.60 keeps the
    buffers after that too (ray#43836): each shutdown or graph rebuild leaves about
    this much per channel in the object store (docs/lifecycle.md)."""
    rpc_timeout_s: float | None = None
    """Default timeout of collective_rpc in seconds; None waits forever."""
    health_check_timeout_s: float = 10.0
    """Seconds check_health() waits for every worker's ping."""
    idle_park_s: float | None = 1.0
    """forward="dag" only: after this many seconds with no step, the workers sleep
    until the next step instead of polling Ray's channels (one core each while
    idle); the first step after it pays a wake-up (a few ms; docs/benchmarks.md).
    None: never park (lowest latency after a pause, at a core per worker)."""
    env_vars: Mapping[str, str] = field(default_factory=dict)
    """Extra environment variables given to every worker."""
    env_prefixes_to_copy: tuple[str, ...] = ("NCCL_", "GLOO_", "TORCH_")
    """Driver variables whose names start with one of these are copied to workers
    (never worker-specific ones such as RANK or CUDA_VISIBLE_DEVICES)."""
    cpu_threads_per_worker: int | None = None
    """torch/OMP threads per CPU worker; None = node CPUs // workers on the node
    (at least 1)."""
    cpu_bind: bool = True
    """On device=cpu, pin each worker's threads to its own cores of the node."""
    manage_visibility: bool = True
    """Set the device-visibility variable (CUDA_VISIBLE_DEVICES, ...) to one sorted list
    per node. False: rayexec sets Ray's NOSET variable so Ray leaves it alone too, and
    the worker manages visibility itself."""
    host_ip: str | None = None
    """The driver node's IP to use on multi-NIC machines (also given to the workers on
    the driver's node as RAYEXEC_HOST_IP)."""
    runtime_env: Mapping[str, Any] | None = None
    """Ray runtime_env for the worker actors (e.g. py_modules); env_vars are merged in."""
    restart_on_failure: bool = False
    """Replace dead workers automatically (same bundles, same ranks) when a death is
    detected."""
    enable_tensor_transport: bool = False
    """Create the worker actors with Ray's enable_tensor_transport=True, so that they
    may fetch tensors other actors publish through Ray Direct Transport
    (@ray.method(tensor_transport=...)). vLLM's sharded_rdt weight transfer needs it;
    rayexec's vLLM backend turns it on when that engine is configured."""

    def __post_init__(self) -> None:
        _validate(self)
        # Defensive copies so that a caller mutating its dict cannot change us.
        object.__setattr__(self, "worker_kwargs", dict(self.worker_kwargs))
        object.__setattr__(self, "env_vars", dict(self.env_vars))
        object.__setattr__(self, "env_prefixes_to_copy", tuple(self.env_prefixes_to_copy))
        if self.bundle_indices is not None:
            object.__setattr__(self, "bundle_indices", tuple(self.bundle_indices))
        if self.runtime_env is not None:
            object.__setattr__(self, "runtime_env", dict(self.runtime_env))

    @property
    def world_size(self) -> int:
        return self.pipeline_parallel_size * self.tensor_parallel_size

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ExecutorConfig:
        """Build from a mapping, rejecting unknown keys with a suggestion."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"unknown ExecutorConfig field(s): {', '.join(hints)}; "
                f"valid fields are {sorted(known)}"
            )
        return cls(**values)

    @classmethod
    def from_env(cls, **overrides: Any) -> ExecutorConfig:
        """Defaults, overridden by RAYEXEC_* variables, overridden by `overrides`."""
        from rayexec import envs

        return cls.from_dict({**envs.config_overrides(), **overrides})

    def replace(self, **changes: Any) -> ExecutorConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"ExecutorConfig.{name}={value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate(c: ExecutorConfig) -> None:
    for name in ("pipeline_parallel_size", "tensor_parallel_size"):
        value = getattr(c, name)
        if not _is_int(value) or value < 1:
            _fail(name, value, "expected an integer >= 1")

    if c.worker_cls is None:
        _fail("worker_cls", None, 'required: a class or a "pkg.module.Class" string')
    if isinstance(c.worker_cls, str):
        module, _, name = c.worker_cls.rpartition(".")
        if not module or not name:
            _fail("worker_cls", c.worker_cls, 'a string must be "pkg.module.Class"')
    elif not isinstance(c.worker_cls, type):
        _fail("worker_cls", c.worker_cls, 'expected a class or a "pkg.module.Class" string')
    if not isinstance(c.worker_kwargs, Mapping):
        _fail("worker_kwargs", c.worker_kwargs, "expected a mapping of keyword arguments")
    clash = sorted(RESERVED_WORKER_KWARGS & set(c.worker_kwargs))
    if clash:
        _fail("worker_kwargs", dict(c.worker_kwargs),
              f"keys {clash} are set by rayexec per worker; remove them")

    choices = {
        "device": DEVICE_KINDS, "channel": CHANNELS, "forward": FORWARD_MODES,
        "placement_strategy": PLACEMENT_STRATEGIES,
    }
    for name, allowed in choices.items():
        if getattr(c, name) not in allowed:
            _fail(name, getattr(c, name), f"expected one of {list(allowed)}")
    if c.channel == "nccl" and c.device == "cpu":
        _fail("channel", c.channel, "nccl needs GPU workers; use channel='shm' (or 'auto') "
              "with device='cpu'")
    if c.channel == "nccl" and not c.manage_visibility:
        _fail("channel", c.channel, "nccl needs manage_visibility=True: Ray's NCCL channel "
              "picks each worker's GPU from the visibility variable (CUDA_VISIBLE_DEVICES), "
              "which manage_visibility=False leaves to the worker. Use channel='shm' (or "
              "'auto', which picks shm then), or manage_visibility=True")
    if c.overlap_comm and (c.device == "cpu" or c.channel in ("shm", "gloo")):
        _fail("overlap_comm", c.overlap_comm, "overlapping communication needs GPU workers "
              "and the nccl channel; set overlap_comm=False")

    if not _is_number(c.num_devices_per_worker) or c.num_devices_per_worker <= 0:
        _fail("num_devices_per_worker", c.num_devices_per_worker, "expected a number > 0")
    if not _is_number(c.num_cpus_per_worker) or c.num_cpus_per_worker < 0:
        _fail("num_cpus_per_worker", c.num_cpus_per_worker, "expected a number >= 0")
    if c.memory_per_worker is not None and (
        not _is_int(c.memory_per_worker) or c.memory_per_worker <= 0
    ):
        _fail("memory_per_worker", c.memory_per_worker, "expected None or bytes > 0")
    if not _is_int(c.max_step_bytes) or c.max_step_bytes < 4096:
        _fail("max_step_bytes", c.max_step_bytes, "expected bytes >= 4096 (e.g. 16 << 20)")

    if c.placement_group is not None and c.placement_group_name is not None:
        _fail("placement_group_name", c.placement_group_name,
              "give either an existing placement_group or a name for a new one, not both")
    _validate_bundle_indices(c.bundle_indices, c.world_size)

    for name in ("pg_ready_timeout_s", "init_timeout_s", "execute_timeout_s",
                 "health_check_timeout_s"):
        value = getattr(c, name)
        if not _is_number(value) or value <= 0:
            _fail(name, value, "expected a number of seconds > 0")
    for name in ("rpc_timeout_s", "idle_park_s"):
        value = getattr(c, name)
        if value is not None and (not _is_number(value) or value <= 0):
            _fail(name, value, "expected None or a number of seconds > 0")

    if not isinstance(c.env_vars, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in c.env_vars.items()
    ):
        _fail("env_vars", c.env_vars, "expected a mapping of str names to str values")
    reserved = sorted(WORKER_SPECIFIC_VARS & set(c.env_vars))
    if reserved:
        _fail("env_vars", dict(c.env_vars), f"{reserved} are set per worker by rayexec; "
              "remove them (use device/bundle settings to choose devices)")
    if isinstance(c.env_prefixes_to_copy, str) or not all(
        isinstance(p, str) and p for p in c.env_prefixes_to_copy
    ):
        _fail("env_prefixes_to_copy", c.env_prefixes_to_copy,
              'expected a tuple of non-empty prefixes, e.g. ("NCCL_",)')
    if c.cpu_threads_per_worker is not None and (
        not _is_int(c.cpu_threads_per_worker) or c.cpu_threads_per_worker < 1
    ):
        _fail("cpu_threads_per_worker", c.cpu_threads_per_worker, "expected None or an int >= 1")
    if c.host_ip is not None:
        try:
            ipaddress.ip_address(c.host_ip)
        except ValueError:
            _fail("host_ip", c.host_ip, "expected an IPv4 or IPv6 address such as '10.0.0.5'")
    if not isinstance(c.enable_tensor_transport, bool):
        _fail("enable_tensor_transport", c.enable_tensor_transport, "expected True or False")
    if c.runtime_env is not None and not isinstance(c.runtime_env, Mapping):
        _fail("runtime_env", c.runtime_env, "expected None or a Ray runtime_env mapping")


def _validate_bundle_indices(indices: Any, world_size: int) -> None:
    if indices is None:
        return
    if isinstance(indices, (str, bytes)) or not all(_is_int(i) for i in indices):
        _fail("bundle_indices", indices, "expected a sequence of integers, e.g. (0, 2, 4, 6)")
    indices = list(indices)
    if len(indices) != world_size:
        _fail("bundle_indices", indices,
              f"needs exactly world_size={world_size} indices (one per worker), got {len(indices)}")
    dupes = sorted({i for i in indices if indices.count(i) > 1})
    if dupes:
        _fail("bundle_indices", indices, f"index(es) {dupes} appear more than once; "
              "each worker needs its own bundle")
    negative = [i for i in indices if i < 0]
    if negative:
        _fail("bundle_indices", indices, f"index(es) {negative} are negative")


def check_bundle_indices_in_range(indices: tuple[int, ...], bundle_count: int) -> None:
    """Raise ValueError if an index does not exist in a group of `bundle_count` bundles."""
    out = sorted(i for i in indices if i >= bundle_count)
    if out:
        _fail("bundle_indices", indices,
              f"index(es) {out} are out of range for a placement group of {bundle_count} "
              f"bundles (valid: 0..{bundle_count - 1})")
