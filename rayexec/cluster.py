"""Facts about the connected Ray cluster: the driver's node IP and each node's total
and free resources, labelled by IP. Read-only Ray queries; no placement here."""

from __future__ import annotations

import ray


def driver_node_ip() -> str:
    """The IP of the node this driver runs on, as Ray knows it."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


def _node_labels() -> dict[str, str]:
    """node id -> its IP, or "IP (node abcd1234)" where two nodes share an IP."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    ips = [n["NodeManagerAddress"] for n in nodes]
    return {
        n["NodeID"]: ip if ips.count(ip) == 1 else f"{ip} (node {n['NodeID'][:8]})"
        for n, ip in zip(nodes, ips)
    }


def node_resources() -> dict[str, dict[str, float]]:
    """node IP -> total resources of alive nodes."""
    return {n["NodeManagerAddress"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def total_resources_per_node() -> dict[str, dict[str, float]]:
    """node label -> the resources it holds (busy or not)."""
    labels = _node_labels()
    return {labels[n["NodeID"]]: dict(n["Resources"]) for n in ray.nodes() if n["Alive"]}


def free_resources_per_node() -> dict[str, dict[str, float]]:
    """node label -> free resources. Ray has no public per-node view without the
    dashboard, so this uses its GCS state and falls back to totals."""
    labels = _node_labels()
    try:
        from ray._private.state import available_resources_per_node

        free = available_resources_per_node()
    except Exception:
        free = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    return {labels[node]: dict(res) for node, res in free.items() if node in labels}
