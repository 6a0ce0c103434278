"""Weight sync throughput: rayexec's update_weights against the other ways to move a
trainer's weights into serving workers, and a floor with no Ray at all.

    python -m benchmarks.weight_sync [--sizes 64,256,1024] [--repeats 3]

Cells: total weights (MiB) x layout (trainer TP2 -> serving PP2, trainer DP2 ->
serving TP2) x path:
  rayexec       executor.update_weights(trainer, via="process_group"): actor to actor
                over gloo, bucketed;
  rayexec_objects  executor.update_weights(trainer, via="object_store"): each trainer
                rank puts what the node reads once, the serving ranks map it (what
                via="auto" takes on one node);
  object_store  the driver fetches every trainer shard (Ray's object store), cuts
                each serving rank's part and ray.put()s it to that rank;
  rpc_pickle    the same, each part cloudpickled to bytes and sent as a call argument;
  safetensors   trainer ranks save their shards to files, serving ranks read them
                (skipped with the reason when safetensors is missing);
  floor         torch.distributed gloo send/recv of the same per-pair bytes between
                plain processes (no Ray), one message per pair.
Paths take turns within each repeat (the machine is shared: interleaving spreads the
noise over all of them); the median and the min-max spread are reported. Results go
to results/weight_sync.json and a table. The serving and trainer workers here hold
synthetic float32 tensors (8 names per layout), not the decoder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch

from rayexec.weights.plan import WeightSpec, plan_transfers

NAMES = 8
LAYOUTS = {"tp2->pp2": ("tp", "pp"), "dp2->tp2": ("dp", "tp")}


def specs(total_bytes: int) -> dict[str, tuple[int, int]]:
    rows = total_bytes // NAMES // (4 * 1024)
    return {f"w{i}": (rows, 1024) for i in range(NAMES)}


def source_spec(kind: str, name: str, shape: tuple[int, int], rank: int) -> WeightSpec:
    return (WeightSpec(shape, "float32", 0, 2, rank) if kind == "tp"
            else WeightSpec(shape, "float32"))


def dest_specs(kind: str, shapes: dict[str, tuple[int, int]], rank: int) -> dict[str, WeightSpec]:
    if kind == "tp":
        return {n: WeightSpec(s, "float32", 0, 2, rank) for n, s in shapes.items()}
    names = sorted(shapes)
    mine = names[rank * len(names) // 2:(rank + 1) * len(names) // 2]  # PP: half the layers
    return {n: WeightSpec(shapes[n], "float32") for n in mine}


class BenchTrainer:
    def __init__(self, rank, local_rank, world_size, pp_rank, tp_rank, distributed_init_method,
                 *, kind: str, total_bytes: int) -> None:
        self.rank, self.kind = rank, kind
        self.shards = {}
        for i, (n, shape) in enumerate(specs(total_bytes).items()):
            spec = source_spec(kind, n, shape, rank)
            box = spec.box
            # Seeded by the name and the part, so DP replicas hold the same values and
            # every route delivers the same weights.
            gen = torch.Generator().manual_seed(i * 1000 + spec.index)
            self.shards[n] = (torch.rand(tuple(b - a for a, b in box), generator=gen), spec)

    def weight_shards(self):
        return self.shards

    def save(self, directory: str) -> str:
        from safetensors.torch import save_file

        path = os.path.join(directory, f"rank{self.rank}.safetensors")
        save_file({n: t for n, (t, _) in self.shards.items()}, path)
        return path


class BenchServer:
    def __init__(self, rank, local_rank, world_size, pp_rank, tp_rank, distributed_init_method,
                 *, kind: str, total_bytes: int) -> None:
        self.layout = dest_specs(kind, specs(total_bytes), rank)
        self.weights = {n: torch.empty(tuple(b - a for a, b in s.box))
                        for n, s in self.layout.items()}

    def weight_layout(self):
        return self.layout

    def weight_buffers(self):
        return self.weights

    def load_weights(self, named, version):
        for n, t in named.items():
            self.weights[n].copy_(t)

    def load_pickled(self, blob: bytes) -> None:
        import cloudpickle

        self.load_weights(cloudpickle.loads(blob), None)

    def load_files(self, paths: list[str], src_kind: str) -> None:
        from safetensors import safe_open

        if src_kind == "dp":
            paths = paths[:1]  # replicas: one file holds everything
        for n, spec in self.layout.items():
            for rank, path in enumerate(paths):
                held = source_spec(src_kind, n, spec.shape, rank).box
                cut = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(spec.box, held)]
                if any(a >= b for a, b in cut):
                    continue
                with safe_open(path, "pt") as f:
                    piece = f.get_slice(n)[tuple(slice(a - h, b - h) for (a, b), (h, _)
                                                 in zip(cut, held))]
                self.weights[n][tuple(slice(a - s, b - s) for (a, b), (s, _)
                                      in zip(cut, spec.box))].copy_(piece)


def checksum(worker) -> float:
    return float(sum(t.double().sum() for t in worker.weights.values()))


def driver_parts(trainer, executor) -> list[dict[str, torch.Tensor]]:
    """Every serving rank's part, cut on the driver from the trainer's shards."""
    shards = trainer.run("weight_shards")
    layouts = executor.collective_rpc("weight_layout")
    out = []
    for layout in layouts:
        part = {}
        for n, spec in layout.items():
            full = torch.empty(spec.shape)
            for rank_shards in shards:
                t, s = rank_shards[n]
                full[tuple(slice(a, b) for a, b in s.box)] = t
            part[n] = full[tuple(slice(a, b) for a, b in spec.box)].clone()
        out.append(part)
    return out


def _floor_proc(rank: int, world: int, port: int, plan: list[tuple[int, int, int]],
                queue: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=60))
    pg = dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=120))
    bufs = {(s, d): torch.ones(n // 4) for s, d, n in plan if rank in (s, d)}
    pg.barrier().wait()
    start = time.perf_counter()
    works = [pg.send([b], d, 0) if rank == s else pg.recv([b], s, 0)
             for (s, d), b in bufs.items()]
    for w in works:
        w.wait()
    pg.barrier().wait()
    if rank == 0:
        queue.put(time.perf_counter() - start)


def floor_seconds(pair_bytes: dict[tuple[int, int], int]) -> float:
    """Plain processes: sources 0, 1 and destinations 2, 3, one message per pair."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plan = [(s, 2 + d, n) for (s, d), n in pair_bytes.items()]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_floor_proc, args=(r, 4, port, plan, queue)) for r in range(4)]
    for p in procs:
        p.start()
    seconds = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return seconds


def run_cell(layout: str, mib: int, repeats: int, have_safetensors: bool,
             bucket_mib: int = 32, paths: tuple[str, ...] = ()) -> dict[str, Any]:
    import cloudpickle
    import ray

    from rayexec import ExecutorConfig, RayDistributedExecutor, ResourceConfig, WorkerGroup

    src_kind, dst_kind = LAYOUTS[layout]
    total = mib << 20
    kwargs = {"total_bytes": total}
    trainer = WorkerGroup.from_config(BenchTrainer, {**kwargs, "kind": src_kind},
                                      ResourceConfig(num_workers=2, cpus_per_worker=0.5))
    executor = RayDistributedExecutor(ExecutorConfig(
        worker_cls=BenchServer, worker_kwargs={**kwargs, "kind": dst_kind}, forward="rpc",
        pipeline_parallel_size=2 if dst_kind == "pp" else 1,
        tensor_parallel_size=2 if dst_kind == "tp" else 1, device="cpu",
        num_devices_per_worker=0.5))
    times: dict[str, list[float]] = {p: [] for p in
                                     ("rayexec", "rayexec_objects", "object_store",
                                      "rpc_pickle", "safetensors", "floor")}
    skipped = {} if have_safetensors else {"safetensors": "safetensors is not installed"}
    src_layout = dict(enumerate(trainer.run(lambda w: {n: s for n, (_, s) in
                                                       w.weight_shards().items()})))
    plan = plan_transfers(src_layout, dict(enumerate(executor.collective_rpc("weight_layout"))))
    pair_bytes: dict[tuple[int, int], int] = {}
    for t in plan.transfers:
        pair_bytes[(t.src, t.dst)] = pair_bytes.get((t.src, t.dst), 0) + t.nbytes
    peaks: list[int] = []
    bucket = bucket_mib << 20
    paths = paths or tuple(times)
    try:
        expected = None
        for _ in range(repeats):
            report = executor.update_weights(trainer, bucket_bytes=bucket, via="process_group")
            times["rayexec"].append(report.seconds)
            peaks.append(max(report.peak_extra_bytes_by_actor))
            sums = executor.collective_rpc(checksum)
            expected = sums if expected is None else expected
            assert sums == expected, (sums, expected)
            if "rayexec_objects" in paths:
                report = executor.update_weights(trainer, via="object_store")
                times["rayexec_objects"].append(report.seconds)
                assert executor.collective_rpc(checksum) == expected

            if "object_store" not in paths:
                times["floor"].append(floor_seconds(pair_bytes))
                continue
            start = time.perf_counter()
            parts = driver_parts(trainer, executor)
            refs = [ray.put(p) for p in parts]
            executor.collective_rpc(lambda w, refs: w.load_weights(
                ray.get(refs[w_rank(w)]), None), args=(refs,))
            times["object_store"].append(time.perf_counter() - start)
            del parts, refs

            start = time.perf_counter()
            parts = driver_parts(trainer, executor)
            for rank, part in enumerate(parts):
                executor.collective_rpc("load_pickled", args=(cloudpickle.dumps(part),),
                                        ranks=[rank])
            times["rpc_pickle"].append(time.perf_counter() - start)
            del parts

            if have_safetensors:
                with tempfile.TemporaryDirectory() as d:
                    start = time.perf_counter()
                    paths = trainer.run("save", args=(d,))
                    executor.collective_rpc("load_files", args=(paths, src_kind))
                    times["safetensors"].append(time.perf_counter() - start)
            times["floor"].append(floor_seconds(pair_bytes))
    finally:
        executor.shutdown()
        trainer.shutdown()
    wire = plan.wire_bytes
    cell = {"layout": layout, "total_mib": mib, "wire_bytes": wire, "bucket_bytes": bucket,
            "peak_extra_bytes_max": max(peaks) if peaks else None, "paths": {},
            "skipped": skipped}
    for path, ts in times.items():
        if ts:
            med = statistics.median(ts)
            cell["paths"][path] = {"seconds": ts, "median_s": med, "min_s": min(ts),
                                   "max_s": max(ts), "gb_per_s": wire / med / 1e9}
    return cell


def w_rank(worker: Any) -> int:
    # BenchServer does not keep its rank; the layout's order is the rank order.
    import os as _os

    return int(_os.environ["RANK"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,256,1024", help="total MiB, comma separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--json", default="results/weight_sync.json")
    parser.add_argument("--bucket-mib", type=int, default=32)
    parser.add_argument("--quick", action="store_true",
                        help="only rayexec's sync and the floor")
    args = parser.parse_args(argv)
    import importlib.util

    import ray

    have_safetensors = importlib.util.find_spec("safetensors") is not None
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    cells = []
    try:
        for mib in (int(s) for s in args.sizes.split(",")):
            for layout in args.layouts.split(","):
                cell = run_cell(layout, mib, args.repeats, have_safetensors, args.bucket_mib,
                                ("rayexec", "rayexec_objects", "floor") if args.quick else ())
                cells.append(cell)
                print(format_row(cell), flush=True)
    finally:
        ray.shutdown()
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": f"{os.cpu_count()} CPUs, shared", "repeats": args.repeats,
                   "cells": cells}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


def format_row(cell: dict[str, Any]) -> str:
    p = cell["paths"]
    parts = [f"{cell['layout']:9s} {cell['total_mib']:5d} MiB"]
    for name in ("rayexec", "rayexec_objects", "object_store", "rpc_pickle", "safetensors",
                 "floor"):
        if name in p:
            parts.append(f"{name} {p[name]['median_s']:.3f}s "
                         f"[{p[name]['min_s']:.3f}-{p[name]['max_s']:.3f}] "
                         f"{p[name]['gb_per_s']:.2f} GB/s")
    if "rayexec" in p and "floor" in p:
        ours = p["rayexec"]["median_s"]
        parts.append(f"rayexec/floor speed {p['floor']['median_s'] / ours:.2f}x")
    if "rayexec" in p and "object_store" in p:
        parts.append(f"vs object_store {p['object_store']['median_s'] / ours:.2f}x")
    parts.append(f"peak extra {cell['peak_extra_bytes_max'] / 2**20:.0f} MiB "
                 f"(bucket {cell['bucket_bytes'] >> 20} MiB)")
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
