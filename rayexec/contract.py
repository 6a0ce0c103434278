"""The worker contract: what rayexec passes to the engine's worker class, and the
driver-side checks that a class can take it, made before any actor starts.

Every worker is built as `worker_cls(rank=, local_rank=, world_size=, pp_rank=,
tp_rank=, distributed_init_method=, **worker_kwargs)`. `load_worker_cls` imports
a "pkg.module.Class" string (suggesting close names when a part is misspelt) and
checks the class's constructor accepts those arguments, so a mismatch is one clear
error on the driver instead of a failure inside every rank. This module does not
build workers (actor.py does) or decide the values (layout.py, group.py).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Iterable, Mapping
from typing import Any

# Keyword arguments rayexec itself passes to every worker, in this order.
RANK_ARGUMENTS = ("rank", "local_rank", "world_size", "pp_rank", "tp_rank",
                  "distributed_init_method")
CONTRACT = (
    "every worker receives rank, local_rank, world_size, pp_rank, tp_rank and "
    "distributed_init_method as keyword arguments, plus the keys of worker_kwargs"
)


def _did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""


def _module_suggestion(missing: str) -> str:
    """Close names for a module that is not found: siblings in its parent package,
    or top-level modules on sys.path."""
    parent, _, leaf = missing.rpartition(".")
    try:
        path = importlib.import_module(parent).__path__ if parent else None
    except (ImportError, AttributeError):
        return ""
    names = [m.name for m in pkgutil.iter_modules(path)]
    return _did_you_mean(leaf, names, f"{parent}." if parent else "")


def import_worker_cls(worker_cls: type | str) -> type:
    """The class itself, importing "pkg.module.Class" strings."""
    if isinstance(worker_cls, type):
        return worker_cls
    module_name, _, cls_name = worker_cls.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        missing = getattr(e, "name", None)
        hint = _module_suggestion(missing) if missing else ""
        raise ValueError(
            f"ExecutorConfig.worker_cls={worker_cls!r} cannot be imported: {e}{hint or '.'} "
            f"Install the package that defines it on the driver and every node, or pass the "
            f"class object"
        ) from None
    cls = getattr(module, cls_name, None)
    if not isinstance(cls, type):
        classes = [n for n, v in vars(module).items() if isinstance(v, type)]
        raise ValueError(
            f"ExecutorConfig.worker_cls={worker_cls!r}: module {module_name!r} has no class "
            f"{cls_name!r}{_did_you_mean(cls_name, classes)}"
        )
    return cls


def check_constructor(cls: type, worker_kwargs: Mapping[str, Any]) -> None:
    """TypeError when `cls(**rank arguments, **worker_kwargs)` cannot bind. Classes
    whose signature Python cannot read (some C extensions) are not checked."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(**dict.fromkeys(RANK_ARGUMENTS), **worker_kwargs)
    except TypeError as e:
        name = f"{cls.__module__}.{cls.__qualname__}"
        raise TypeError(
            f"worker class {name}{signature} cannot be built with rayexec's arguments "
            f"({e}): {CONTRACT} ({sorted(worker_kwargs) or 'none'} here). Fix: accept them "
            f"in __init__, e.g. def __init__(self, rank, local_rank, world_size, pp_rank, "
            f"tp_rank, distributed_init_method, **kwargs)"
        ) from None


def load_worker_cls(worker_cls: type | str, worker_kwargs: Mapping[str, Any]) -> type:
    """Import and check the worker class on the driver, before any actor starts."""
    cls = import_worker_cls(worker_cls)
    check_constructor(cls, worker_kwargs)
    return cls
