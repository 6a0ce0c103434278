"""Every environment variable rayexec reads, read here and nowhere else.

Two kinds:
- `RAYEXEC_<FIELD>` overrides one ExecutorConfig default, only through
  `ExecutorConfig.from_env()` (which calls `config_overrides()`); a value that does
  not parse raises ValueError naming the variable, the value and the format.
- Process facts: `RAY_ADDRESS` (join this cluster instead of starting one),
  `RAYEXEC_HOST_IP` (this node's address on multi-NIC machines),
  `RAYEXEC_KEEP_FREED_MEMORY` (0 leaves the driver's malloc settings alone, see
  host_memory.py) and the driver's environment snapshot used for
  `env_prefixes_to_copy`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _strs(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("", "none") else float(text)


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none") else int(text)


# variable -> (ExecutorConfig field, parser, format shown in errors)
CONFIG_VARS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "RAYEXEC_PIPELINE_PARALLEL_SIZE": ("pipeline_parallel_size", int, "an integer"),
    "RAYEXEC_TENSOR_PARALLEL_SIZE": ("tensor_parallel_size", int, "an integer"),
    "RAYEXEC_WORKER_CLS": ("worker_cls", str, '"pkg.module.Class"'),
    "RAYEXEC_DEVICE": ("device", str, "auto|cuda|rocm|npu|cpu"),
    "RAYEXEC_CHANNEL": ("channel", str, "auto|nccl|shm|gloo"),
    "RAYEXEC_OVERLAP_COMM": ("overlap_comm", _bool, "a boolean (1/0)"),
    "RAYEXEC_FORWARD": ("forward", str, "dag|rpc"),
    "RAYEXEC_NUM_DEVICES_PER_WORKER": ("num_devices_per_worker", float, "a number"),
    "RAYEXEC_NUM_CPUS_PER_WORKER": ("num_cpus_per_worker", float, "a number"),
    "RAYEXEC_MEMORY_PER_WORKER": ("memory_per_worker", _optional_int, "bytes or none"),
    "RAYEXEC_PLACEMENT_STRATEGY": ("placement_strategy", str, "PACK|SPREAD|STRICT_PACK|..."),
    "RAYEXEC_PLACEMENT_GROUP_NAME": ("placement_group_name", str, "a name"),
    "RAYEXEC_BUNDLE_INDICES": ("bundle_indices", _ints, 'comma-separated integers, "0,2,4,6"'),
    "RAYEXEC_PG_READY_TIMEOUT_S": ("pg_ready_timeout_s", float, "seconds"),
    "RAYEXEC_INIT_TIMEOUT_S": ("init_timeout_s", float, "seconds"),
    "RAYEXEC_EXECUTE_TIMEOUT_S": ("execute_timeout_s", float, "seconds"),
    "RAYEXEC_MAX_STEP_BYTES": ("max_step_bytes", int, "bytes"),
    "RAYEXEC_RPC_TIMEOUT_S": ("rpc_timeout_s", _optional_float, "seconds or none"),
    "RAYEXEC_HEALTH_CHECK_TIMEOUT_S": ("health_check_timeout_s", float, "seconds"),
    "RAYEXEC_IDLE_PARK_S": ("idle_park_s", _optional_float, "seconds or none"),
    "RAYEXEC_ENV_PREFIXES_TO_COPY": ("env_prefixes_to_copy", _strs, 'comma-separated, "NCCL_,HF_"'),
    "RAYEXEC_CPU_THREADS_PER_WORKER": ("cpu_threads_per_worker", _optional_int, "an integer"),
    "RAYEXEC_CPU_BIND": ("cpu_bind", _bool, "a boolean (1/0)"),
    "RAYEXEC_MANAGE_VISIBILITY": ("manage_visibility", _bool, "a boolean (1/0)"),
    "RAYEXEC_HOST_IP": ("host_ip", str, "an IP address"),
    "RAYEXEC_RESTART_ON_FAILURE": ("restart_on_failure", _bool, "a boolean (1/0)"),
}

FIELD_TO_VAR = {field_name: var for var, (field_name, _, _) in CONFIG_VARS.items()}


def config_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """ExecutorConfig fields set by RAYEXEC_* variables, parsed."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for var, (field_name, parse, fmt) in CONFIG_VARS.items():
        text = environ.get(var)
        if text is None or text == "":
            continue
        values[field_name] = _parsed(var, text, parse, fmt)
    return values


def _parsed(var: str, text: str, parse: Callable[[str], Any], fmt: str) -> Any:
    try:
        return parse(text)
    except ValueError as e:
        raise ValueError(
            f"environment variable {var}={text!r} is invalid: expected {fmt} ({e}); "
            f"fix or unset it"
        ) from None


def ray_address() -> str | None:
    """The cluster to join (Ray's own RAY_ADDRESS), or None to start one locally."""
    return os.environ.get("RAY_ADDRESS") or None


def node_host_ip() -> str | None:
    """This process's node address override (RAYEXEC_HOST_IP), if set."""
    return os.environ.get("RAYEXEC_HOST_IP") or None


def keep_freed_memory() -> bool:
    """RAYEXEC_KEEP_FREED_MEMORY: whether rayexec may raise the driver's malloc
    thresholds (host_memory.py); on unless set to 0/false/no/off."""
    text = os.environ.get("RAYEXEC_KEEP_FREED_MEMORY", "")
    if text.strip() == "":
        return True
    return _parsed("RAYEXEC_KEEP_FREED_MEMORY", text, _bool, "a boolean (1/0)")


def driver_environ() -> dict[str, str]:
    """A snapshot of the driver's environment, for env_prefixes_to_copy."""
    return dict(os.environ)
