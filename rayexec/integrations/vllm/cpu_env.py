"""The pure helpers the vLLM executor and worker share: the worker environment
vLLM needs and the CPU lists vLLM reads. No vLLM import; nothing here imports the
front (`rayexec.integrations.vllm`), the executor or the worker."""

from __future__ import annotations

# vLLM's variable naming the cores a CPU worker's OpenMP threads use ("0-3|4-7"
# for two local workers; "nobind" turns binding off).
OMP_BIND_VAR = "VLLM_CPU_OMP_THREADS_BIND"

# Driver variables copied to every worker on top of rayexec's own prefixes: vLLM's
# settings, Hugging Face's (cache paths, offline mode) and torch inductor's (vLLM's
# CPU platform sets some of these in the engine process).
VLLM_ENV_PREFIXES = ("VLLM_", "HF_", "TORCHINDUCTOR_")


def format_cpu_ids(cores: list[int]) -> str:
    """Cores written the way vLLM reads CPU lists: [0, 1, 2, 3, 8] -> "0-3,8"."""
    runs: list[list[int]] = []
    for core in sorted(set(cores)):
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def merge_prefixes(base: tuple[str, ...], extra: tuple[str, ...]) -> tuple[str, ...]:
    """`base` followed by the prefixes of `extra` it does not already hold."""
    return tuple(base) + tuple(p for p in extra if p not in base)
