"""WeightReloadExtension: new weights into a running vLLM engine, through vLLM's own
`collective_rpc` + `worker_extension_cls` + `reload_weights` path.

    llm = LLM(model=..., distributed_executor_backend=RayexecExecutor,
              worker_extension_cls="rayexec.integrations.vllm.extension.WeightReloadExtension")
    llm.collective_rpc("reload_weights_from", args=("/shared/step-12.safetensors",))

vLLM mixes this class into its worker class on every rank, so the method runs
inside each worker with `self` being vLLM's worker (`self.rank`,
`self.model_runner`, `self.vllm_config`). Each rank receives the whole checkpoint
in checkpoint (Hugging Face) format; vLLM's `model.load_weights` keeps what its
shard and stage need.

What `source` may be, and why these: the arguments of `collective_rpc` cross
vLLM's engine-core socket when the engine core runs in its own process (vLLM's
default), and there torch tensors inside a dict do not arrive as tensors. So
the weights travel as something that does:
- a path (`str`) to a `.safetensors` file or a directory of them, on a
  filesystem every worker's node sees (vLLM's RLHF examples hand over
  checkpoints this way too, or by NCCL / CUDA IPC, which need GPUs);
- `bytes`: one safetensors blob (`safetensors.torch.save(state_dict)`), which
  vLLM's msgpack encoder carries natively, no pickling needed;
- a `list` of Ray ObjectRefs, each resolving to a state dict or such bytes, when
  the caller is in the engine's Ray (engine core in-process): the workers fetch
  them straight from the trainer's object store, with a bounded wait
  (`timeout_s`), so a trainer that dies or stalls mid-update gives a clear error
  instead of a hung engine.

Everything is fetched and checked before anything is loaded: vLLM's
`reload_weights` moves each layer's parameters to the meta device first and
materializes them as weights arrive, so an error half-way (an unknown name, a
wrong shape, a truncated transfer) would leave the model without weights. Here a
bad update is refused whole, naming the parameter, the shape seen and the rank,
and the engine keeps serving its previous weights. The names and shapes expected
are those of the checkpoint the engine was started from; an update must carry
all of them (a layer given only part of its weights would be processed with
uninitialized memory for the rest).

This module does not move weights between actors itself (rayexec's direct path
does that) and does not import vLLM or Ray at import time.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

# How long a worker waits for ObjectRef weights (the trainer's object store) by default.
WEIGHT_FETCH_TIMEOUT_S = 300.0


class WeightUpdateError(ValueError):
    """An update refused before anything was loaded: the engine keeps its weights."""


def check_weights(received: Mapping[str, tuple[int, ...]],
                  expected: Mapping[str, tuple[int, ...]], rank: int) -> None:
    """Raise WeightUpdateError unless `received` (name -> shape) has exactly the
    names of `expected`, each with its shape. Pure: names the first problems."""
    problems = []
    unknown = sorted(set(received) - set(expected))
    if unknown:
        problems.append(f"unknown weight name(s) {unknown[:5]}"
                        + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    for name in sorted(set(received) & set(expected)):
        if tuple(received[name]) != tuple(expected[name]):
            problems.append(f"weight {name!r} has shape {tuple(received[name])}, the "
                            f"engine's checkpoint has {tuple(expected[name])}")
    missing = sorted(set(expected) - set(received))
    if missing:
        problems.append(f"missing weight(s) {missing[:5]}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                        + " (an update must carry every weight of the checkpoint)")
    if problems:
        raise WeightUpdateError(
            f"rank {rank}: weight update refused, nothing was loaded and the engine keeps "
            f"its previous weights: " + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more problems)" if len(problems) > 5 else "")
            + ". Send the checkpoint-format (Hugging Face) names and full, unsharded shapes.")


def _safetensors_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return [path]


def load_source(source: Any, rank: int, timeout_s: float = WEIGHT_FETCH_TIMEOUT_S
                ) -> dict[str, Any]:
    """The state dict `source` (a path, safetensors bytes or a list of ObjectRefs;
    module docstring) stands for, fully fetched."""
    # safetensors is imported only for the sources that are safetensors: a list of
    # ObjectRefs of tensor dicts needs nothing beyond Ray and torch.
    if isinstance(source, (bytes, bytearray, memoryview)):
        import safetensors.torch

        return safetensors.torch.load(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        files = _safetensors_files(os.fspath(source))
        if not files or not all(os.path.isfile(f) for f in files):
            raise WeightUpdateError(f"rank {rank}: no safetensors file at {os.fspath(source)!r} "
                                    f"(seen from this worker's node); pass a .safetensors "
                                    f"file or a directory holding them")
        import safetensors.torch

        weights: dict[str, Any] = {}
        for f in files:
            weights.update(safetensors.torch.load_file(f))
        return weights
    if isinstance(source, (list, tuple)):
        return _fetch_refs(list(source), rank, timeout_s)
    raise WeightUpdateError(
        f"rank {rank}: weights of type {type(source).__name__} cannot be loaded; pass a "
        f"path to safetensors, safetensors bytes, or a list of Ray ObjectRefs")


def _fetch_refs(refs: list[Any], rank: int, timeout_s: float) -> dict[str, Any]:
    import ray

    try:
        parts = ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise WeightUpdateError(
            f"rank {rank}: the {len(refs)} weight object(s) were not ready within "
            f"timeout_s={timeout_s} s (WEIGHT_FETCH_TIMEOUT_S by default): is the trainer "
            f"stalled? Nothing was loaded; the engine keeps its previous weights") from None
    except ray.exceptions.RayError as e:
        raise WeightUpdateError(
            f"rank {rank}: fetching the weights failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}); the trainer that produced them died or failed. "
            f"Nothing was loaded; the engine keeps its previous weights") from e
    weights: dict[str, Any] = {}
    for part in parts:
        if isinstance(part, bytes):
            import safetensors.torch

            part = safetensors.torch.load(part)
        weights.update(part)
    return weights


class WeightReloadExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); see the module docstring."""

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint-format names and shapes of the model this engine started from
        (read once: safetensors headers only, else through vLLM's loader)."""
        cached = getattr(self, "_rayexec_expected_shapes", None)
        if cached is None:
            model_config = self.vllm_config.model_config
            files = _safetensors_files(model_config.model) if os.path.isdir(
                model_config.model) else []
            if files:
                from safetensors import safe_open

                cached = {}
                for f in files:
                    with safe_open(f, framework="pt") as st:
                        for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                            cached[name] = tuple(st.get_slice(name).get_shape())
            else:
                from vllm.model_executor.model_loader import get_model_loader

                loader = get_model_loader(self.vllm_config.load_config)
                cached = {name: tuple(t.shape) for name, t in loader.get_all_weights(
                    model_config, self.model_runner.get_model())}
            self._rayexec_expected_shapes = cached
        return dict(cached)

    def reload_weights_from(self, source: Any, timeout_s: float = WEIGHT_FETCH_TIMEOUT_S
                            ) -> dict[str, Any]:
        """Fetch `source`, check every name and shape, then reload in place.

        Returns {"rank", "tensors", "bytes", "fetch_s", "load_s"} for this rank."""
        rank = self.rank
        start = time.perf_counter()
        weights = load_source(source, rank, timeout_s)
        fetched = time.perf_counter()
        check_weights({n: tuple(t.shape) for n, t in weights.items()},
                      self.expected_weight_shapes(), rank)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        done = time.perf_counter()
        logger.debug("rank %d: reloaded %d weights (fetch %.3f s, load %.3f s)", rank,
                     len(weights), fetched - start, done - fetched)
        return {"rank": rank, "tensors": len(weights),
                "bytes": sum(t.numel() * t.element_size() for t in weights.values()),
                "fetch_s": round(fetched - start, 4), "load_s": round(done - fetched, 4)}
