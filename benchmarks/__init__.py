"""Benchmarks of rayexec (run as scripts: `python benchmarks/pp_tp_latency.py`).

A package so that worker classes defined here (`benchmarks.echo_worker.EchoWorker`)
import by module path inside Ray workers and spawned floor processes alike.
"""
