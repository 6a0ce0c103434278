"""Smoke test of benchmarks/weight_sync.py at a tiny size: every path produces
numbers for the cell, rayexec's sync delivers the same weights each repeat (the
script checks checksums), and the JSON has the documented fields. No timing is
asserted."""

from __future__ import annotations

import json

import ray

from benchmarks import weight_sync


def test_weight_sync_benchmark_runs(tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    path = tmp_path / "ws.json"
    assert weight_sync.main(["--sizes", "4", "--repeats", "1", "--layouts", "dp2->tp2",
                             "--json", str(path)]) == 0
    assert not ray.is_initialized()
    (cell,) = json.loads(path.read_text())["cells"]
    assert cell["layout"] == "dp2->tp2" and cell["wire_bytes"] == 4 << 20
    expected = {"rayexec", "rayexec_objects", "object_store", "rpc_pickle", "floor"}
    assert expected <= set(cell["paths"]) | set(cell["skipped"])
    for name, p in cell["paths"].items():
        assert len(p["seconds"]) == 1 and p["gb_per_s"] > 0, name
    assert cell["peak_extra_bytes_max"] <= 2 * cell["bucket_bytes"]
