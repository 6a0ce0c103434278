"""Why a placement request does not fit, in words: pure arithmetic over bundles,
a strategy and per-node resources. No Ray import; unit-tested in milliseconds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def _fits(bundle: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if not k.startswith("node:"))


def _fmt(resources: Mapping[str, float], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={resources.get(k, 0):g}" for k in keys)


def placement_shortfalls(
    bundles: Sequence[Mapping[str, float]],
    strategy: str,
    free_per_node: Mapping[str, Mapping[str, float]],
    word: str = "free",
) -> list[str]:
    """Every reason `bundles` under `strategy` cannot fit `free_per_node`; empty when
    they can (as far as per-node arithmetic can tell). `word` says what the numbers
    are ("free", or "in all" for node capacities)."""
    keys = sorted({k for b in bundles for k in b if not k.startswith("node:")})
    reasons = []
    for key in keys:
        need = sum(b.get(key, 0.0) for b in bundles)
        total = sum(res.get(key, 0.0) for res in free_per_node.values())
        if total + 1e-9 < need:
            reasons.append(f"the cluster has {total:g} {key} {word}, the layout needs {need:g}")
    fitting_nodes = [ip for ip, res in free_per_node.items() if _fits(bundles[0], res)]
    if not fitting_nodes:
        reasons.append("no node can hold even one bundle")
    if strategy == "STRICT_SPREAD" and len(fitting_nodes) < len(bundles):
        reasons.append(f"STRICT_SPREAD puts every bundle on a different node, but only "
                       f"{len(fitting_nodes)} node(s) can hold a bundle for {len(bundles)} bundles")
    if strategy == "STRICT_PACK":
        whole = {k: sum(b.get(k, 0.0) for b in bundles) for k in keys}
        if not any(_fits(whole, res) for res in free_per_node.values()):
            reasons.append(f"STRICT_PACK puts all bundles on one node, and no node has "
                           f"{{{_fmt(whole, keys)}}} {word}")
    if not reasons:
        capacity = sum(_bundles_that_fit(bundles[0], res) for res in free_per_node.values())
        if capacity < len(bundles):
            reasons.append(f"the free resources are split across nodes so that only {capacity} "
                           f"whole bundle(s) fit")
    return reasons


def describe_request(
    bundles: Sequence[Mapping[str, float]],
    strategy: str,
    free_per_node: Mapping[str, Mapping[str, float]],
    word: str = "free",
) -> str:
    keys = sorted({k for b in bundles for k in b if not k.startswith("node:")})
    nodes = "; ".join(f"{ip}: {_fmt(res, keys)}" for ip, res in sorted(free_per_node.items()))
    return (f"Asked for {len(bundles)} bundles of {{{_fmt(bundles[0], keys)}}} with {strategy}. "
            f"{'Free' if word == 'free' else 'Resources'} per node: "
            f"{nodes or 'no alive nodes'}.")


SHORTFALL_FIX = (" Fix: lower pipeline_parallel_size x tensor_parallel_size or the per-worker "
                 "resources, add nodes, or choose a looser placement_strategy.")


def diagnose_placement(
    bundles: Sequence[Mapping[str, float]],
    strategy: str,
    free_per_node: Mapping[str, Mapping[str, float]],
) -> str:
    """Why `bundles` under `strategy` do not fit the free resources, in words."""
    reasons = placement_shortfalls(bundles, strategy, free_per_node)
    fix = SHORTFALL_FIX
    if not reasons:
        reasons.append("the resources look sufficient now; other placement groups or actors "
                       "may have held them, or nodes were still joining")
        fix = " Fix: free the resources held elsewhere or raise pg_ready_timeout_s."
    return (describe_request(bundles, strategy, free_per_node) + " Impossible because "
            + "; ".join(reasons) + "." + fix)


def _bundles_that_fit(bundle: Mapping[str, float], free: Mapping[str, float]) -> int:
    counts = [
        math.floor((free.get(k, 0.0) + 1e-9) / v)
        for k, v in bundle.items() if v > 0 and not k.startswith("node:")
    ]
    return min(counts) if counts else 0


def cpu_oversubscription(workers: int, cores: int) -> str | None:
    """A warning when more CPU workers share the driver's node than it has cores for
    (each worker computes on its own threads, and a compiled graph's readers poll
    while they wait); None when each worker can have a core."""
    if workers <= cores:
        return None
    return (f"{workers} CPU workers share this node's {cores} core(s) (os.sched_getaffinity "
            f"of the driver): they take turns on the cores, so steps run slower than with a "
            f"core each; results are the same. For speed, use at most {cores} workers here "
            f"(pipeline_parallel_size x tensor_parallel_size) or add nodes.")
