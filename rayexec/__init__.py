"""rayexec: a Ray-based distributed executor for LLM inference.

Places one worker actor per device on a placement group, orders them into ranks,
gives each node's workers one device-visibility list, exposes `collective_rpc`,
and runs each forward step as a compiled Ray DAG shaped PP stages x TP workers.
"""

from rayexec.config import ExecutorConfig
from rayexec.errors import (
    ExecutorAsleepError,
    ExecutorClosedError,
    ExecutorTimeoutError,
    PlacementError,
    RayExecError,
    WeightSyncError,
    WorkerDiedError,
    WorkerError,
)
from rayexec.executor import RayDistributedExecutor
from rayexec.group import WorkerGroup
from rayexec.redistribute import Plan, Tracker, plan_broadcast, plan_gather_scatter
from rayexec.resources import ResourceConfig
from rayexec.transfer import execute_plan
from rayexec.weights.plan import WeightSpec
from rayexec.weights.sync import SyncReport

__all__ = [
    "ExecutorAsleepError",
    "ExecutorClosedError",
    "ExecutorConfig",
    "ExecutorTimeoutError",
    "PlacementError",
    "Plan",
    "RayDistributedExecutor",
    "RayExecError",
    "ResourceConfig",
    "SyncReport",
    "Tracker",
    "WeightSpec",
    "WeightSyncError",
    "WorkerDiedError",
    "WorkerError",
    "WorkerGroup",
    "execute_plan",
    "plan_broadcast",
    "plan_gather_scatter",
]
__version__ = "0.1.0"
