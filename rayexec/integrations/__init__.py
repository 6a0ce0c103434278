"""Adapters that let inference engines run on rayexec.

`rayexec.integrations.vllm` holds vLLM's executor backend (`RayexecExecutor`).
Importing this package imports no engine: each adapter imports its engine only
when its classes are first used.
"""
