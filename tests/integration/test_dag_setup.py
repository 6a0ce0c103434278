"""What the executor does when it compiles the forward graph: it waits (bounded) for
Ray's driver-side proxy actor, so that the proxy's process start-up is not paid by the
first steps, and on CPU it keeps the driver's freed memory for the next step's output
(host_memory.py)."""

from __future__ import annotations

import dataclasses
import logging
import time

import ray

from rayexec import ExecutorConfig, RayDistributedExecutor, dag, host_memory
from tests.workers import RecordingWorker


@ray.remote(num_cpus=0)
class SlowStart:
    """Stands in for Ray's proxy actor: up only after `delay_s`, then it leaves a mark."""

    def __init__(self, marker: str, delay_s: float) -> None:
        time.sleep(delay_s)
        open(marker, "w").close()


class Compiled:
    def __init__(self, proxy) -> None:
        self._proxy_actor = proxy


def test_returns_once_the_proxy_is_up(local_ray, tmp_path):
    marker = tmp_path / "up"
    proxy = SlowStart.remote(str(marker), 1.0)
    try:
        dag.await_proxy(Compiled(proxy), timeout_s=60)
        assert marker.exists(), "await_proxy returned before the proxy's __init__ finished"
    finally:
        ray.kill(proxy)


def test_the_wait_is_bounded_and_says_so(local_ray, tmp_path, caplog):
    marker = tmp_path / "up"
    proxy = SlowStart.remote(str(marker), 60.0)
    try:
        with caplog.at_level(logging.WARNING, logger="rayexec.dag"):
            dag.await_proxy(Compiled(proxy), timeout_s=0.5)
        assert "proxy actor was not up after 0.5s" in caplog.text
        assert not marker.exists()
    finally:
        ray.kill(proxy)


def test_a_graph_without_a_proxy_is_fine():
    dag.await_proxy(object(), timeout_s=0.1)  # older Ray: nothing to wait for


def test_the_executor_waits_for_its_graphs_proxy(local_ray, monkeypatch):
    seen = []
    real = dag.await_proxy

    def recording(compiled, timeout_s):
        real(compiled, timeout_s)
        seen.append((compiled._proxy_actor, timeout_s))

    monkeypatch.setattr(dag, "await_proxy", recording)
    config = ExecutorConfig(worker_cls=RecordingWorker, pipeline_parallel_size=2, device="cpu",
                            init_timeout_s=123.0)
    with RayDistributedExecutor(config) as executor:
        executor.execute_model({"x": [1.0]})
        [(proxy, timeout_s)] = seen
        assert timeout_s == 123.0
        assert ray.get(proxy.__ray_ready__.remote(), timeout=10) is True


def test_a_cpu_graph_keeps_the_drivers_freed_memory(local_ray, monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    config = ExecutorConfig(worker_cls=RecordingWorker, pipeline_parallel_size=2, device="cpu")
    with RayDistributedExecutor(config) as executor:
        executor.execute_model({"x": [1.0]})
    assert calls == [1]
    with RayDistributedExecutor(dataclasses.replace(config, forward="rpc")) as executor:
        executor.execute_model({"x": [1.0]})
    assert calls == [1]  # plain Ray calls build no graph: the driver's malloc is left alone
