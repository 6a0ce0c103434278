"""Which slice of each checkpoint tensor one vLLM rank reads, found by running
vLLM's own weight loaders on shapes only (the destination side of rayexec's
direct weight path, worker-side).

vLLM's loaders take a FULL checkpoint tensor and narrow it to the rank's shard:
column-parallel rows, row-parallel columns, vocab rows of an embedding or LM head,
q/k/v and gate/up into stacked parameters, nothing for layers of other pipeline
stages. Rather than restating those rules per architecture, `needed_regions`
replays the model's own `load_weights` with a meta-device probe per checkpoint
name on meta copies of the parameters as first built (vLLM records them for its
in-place reload), and watches which region of the probe each loader copies
(`_CopyWatch`). No data is read or written: the live weights stay untouched.

A region becomes a `WeightSpec` (plan.py) when it is one part of an even
(array_split) split along one dim; otherwise (uneven vocab padding, a loader that
transposes first, two dims cut) the rank asks for the whole tensor, which is
always correct since the loader narrows it itself, only more bytes.

`full_shaped` turns a received slice back into what the loader expects: a tensor
of the full shape whose only written region is the slice (the rest stays
uninitialised: `torch.empty` pages never touched cost no memory on CPU).

Not here: moving bytes (rayexec/weights/), the worker (worker.py).
"""

from __future__ import annotations

import glob
import logging
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rayexec.weights.plan import Box, WeightSpec, split_range

logger = logging.getLogger(__name__)


def checkpoint_shapes(model: str, revision: str | None = None) -> dict[str, tuple[int, ...]]:
    """name -> full shape of every tensor in the model's safetensors files (headers
    only). `model` is a local directory or a Hugging Face repo already in the cache."""
    from safetensors import safe_open

    folder = model
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model, revision=revision, local_files_only=True,
                                   allow_patterns=["*.safetensors"])
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {folder!r} (model {model!r}): the "
                                f"direct weight path reads checkpoint names and shapes from "
                                f"safetensors headers; save the model with safetensors")
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


class _CopyWatch(TorchDispatchMode):
    """Records the source view of every copy_ between meta tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[torch.Tensor] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        if func is torch.ops.aten.copy_.default and args[1].is_meta:
            self.sources.append(args[1])
        return func(*args, **(kwargs or {}))


def region_of(view: torch.Tensor, probe: torch.Tensor) -> Box | None:
    """The box of `probe` that `view` covers, when `view` is a plain slice of it
    (same dims and strides); None when the loader did anything else first."""
    if view.dim() != probe.dim() or view.dtype != probe.dtype:
        return None
    if view.untyped_storage().nbytes() != probe.untyped_storage().nbytes():
        return None  # a copy made by the loader, not a view of the probe
    if any(vs != ps for vs, ps, n in zip(view.stride(), probe.stride(), view.shape) if n > 1):
        return None
    offset, box = view.storage_offset(), []
    for size, stride, full in zip(view.shape, probe.stride(), probe.shape):
        start, offset = divmod(offset, stride) if stride else (0, offset)
        if start + size > full:
            return None
        box.append((start, start + size))
    return tuple(box) if offset == 0 else None


def union(boxes: list[Box]) -> Box:
    return tuple((min(b[d][0] for b in boxes), max(b[d][1] for b in boxes))
                 for d in range(len(boxes[0])))


def spec_for(shape: tuple[int, ...], dtype: str, box: Box | None) -> WeightSpec:
    """The WeightSpec asking for `box` of a `shape` tensor: one even part along one
    dim when it is one, else the whole tensor (see the module docstring)."""
    whole = WeightSpec(shape, dtype)
    if box is None:
        return whole
    cut = [d for d, ((lo, hi), n) in enumerate(zip(box, shape)) if (lo, hi) != (0, n)]
    if not cut:
        return whole
    if len(cut) > 1:
        return whole
    dim = cut[0]
    lo, hi = box[dim]
    size, full = hi - lo, shape[dim]
    for parts in {full // size, -(-full // size)}:
        if parts < 1:
            continue
        for index in {lo // max(1, full // parts), lo // max(1, -(-full // parts))}:
            if index < parts and split_range(full, parts, index) == (lo, hi):
                return WeightSpec(shape, dtype, dim, parts, index)
    return whole


def _meta_params(model: torch.nn.Module) -> dict[torch.nn.Module, dict[str, torch.Tensor]]:
    """Per layer, meta copies of its parameters as first built (model format, with
    their weight loaders bound to the layer), from vLLM's reload metadata."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    out = {}
    for layer in model.modules():
        recorded, _ = get_layerwise_info(layer).restore_metadata
        params = {}
        for name, meta in recorded.items():
            copy = torch.nn.Parameter(torch.empty_like(meta, device="meta"), requires_grad=False)
            copy.__class__ = meta.__class__
            copy.__dict__ = meta.__dict__.copy()
            params[name] = restore_layer_refs(copy, layer)
        if params:
            out[layer] = params
    return out


class _OnMeta:
    """Inside: every layer's recorded parameters are meta copies; after: the live
    tensors are back exactly as they were (kernel format included)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.swaps = _meta_params(model)
        self.saved: list[tuple[torch.nn.Module, str, Any, Any, Any]] = []

    def __enter__(self) -> None:
        missing = object()
        for layer, params in self.swaps.items():
            for name, meta in params.items():
                self.saved.append((layer, name, layer._parameters.pop(name, missing),
                                   layer._buffers.pop(name, missing),
                                   layer.__dict__.pop(name, missing)))
                layer._parameters[name] = meta
        self.missing = missing

    def __exit__(self, *exc: object) -> None:
        for layer, name, param, buffer, attr in reversed(self.saved):
            layer._parameters.pop(name, None)
            for store, value in ((layer._parameters, param), (layer._buffers, buffer),
                                 (layer.__dict__, attr)):
                if value is not self.missing:
                    store[name] = value


def needed_regions(model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]],
                   dtype: torch.dtype) -> dict[str, WeightSpec]:
    """name -> the WeightSpec this rank's loaders read, for every checkpoint name
    the model loads on this rank (names of other pipeline stages are left out)."""
    dtype_name = str(dtype).removeprefix("torch.")
    out: dict[str, WeightSpec] = {}
    with _OnMeta(model), torch.no_grad():
        for name, shape in shapes.items():
            probe = torch.empty(shape, dtype=dtype, device="meta")
            watch = _CopyWatch()
            with watch:
                loaded = model.load_weights(iter([(name, probe)]))
            if not watch.sources and not loaded:
                continue  # not on this rank (another stage), or skipped by the model
            boxes = [region_of(s, probe) for s in watch.sources]
            box = None if not boxes or None in boxes else union(boxes)
            out[name] = spec_for(tuple(shape), dtype_name, box)
    return out


def full_shaped(pieces: Mapping[str, torch.Tensor], layout: Mapping[str, WeightSpec],
                fill: float | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full-shaped tensor) with each received piece in its box; the rest is
    left uninitialised, or set to `fill` (a test checks the loaders never read it).
    A piece that already is the box of a whole tensor in its memory (the object-store
    route maps whole tensors) is passed as that tensor, without a copy."""
    for name, piece in pieces.items():
        spec = layout[name]
        if spec.dim is None:
            yield name, piece
            continue
        whole = None if fill is not None else enclosing(piece, spec)
        if whole is not None:
            yield name, whole
            continue
        full = torch.empty(spec.shape, dtype=piece.dtype, device=piece.device)
        if fill is not None:
            full.fill_(fill)
        full[tuple(slice(a, b) for a, b in spec.box)] = piece
        yield name, full


def enclosing(piece: torch.Tensor, spec: WeightSpec) -> torch.Tensor | None:
    """The contiguous full-shaped tensor whose `spec.box` is `piece`, built on
    piece's own storage, or None when the storage does not hold one there."""
    strides = torch.empty(spec.shape, device="meta").stride()
    if any(n > 1 and a != b for n, a, b in zip(piece.shape, piece.stride(), strides)):
        return None
    start = piece.storage_offset() - sum(a * s for (a, _), s in zip(spec.box, strides))
    numel = math.prod(spec.shape)
    if start < 0 or (start + numel) * piece.element_size() > piece.untyped_storage().nbytes():
        return None
    return piece.new_empty(0).set_(piece.untyped_storage(), start, spec.shape, strides)
