"""benchmarks/vllm_weight_update.py --quick end to end: the tiny model's rows run, every
update changes the generated ids the way it should, and the JSON has the shape
docs/vllm-weight-update-bench.md describes.

Timing is not asserted (speed belongs to the benchmark's own output).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# slow: the module's one benchmark run (its fixture) takes about a minute here.
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vllm_weight_update.py"
RUN_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("bench") / "vllm_weight_update.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_each_update_path_changes_the_ids_and_restores_them(quick_run):
    _, doc = quick_run
    model = doc["models"]["tiny"]
    assert model["status"] == "ok" and model["bytes"] > 0
    rows = model["rows"]
    for path in ("collective_rpc/mp", "collective_rpc/rayexec", "collective_rpc/mp+numpy",
                 "collective_rpc/rayexec+numpy", "reload_only/rayexec"):
        row = rows[path]
        assert row["status"] == "ok", (path, row)
        assert len(row["seconds"]) == doc["settings"]["repeats"] == 1
        assert row["median_s"] > 0 and row["gb_per_s"] > 0
        # Each engine flips between weight sets A and B at every update and then
        # generates: B's ids differ from A's, A's come back, and B's repeat.
        assert row["checks"] == 2 and row["ids_changed"] and row["ids_as_expected"], row
    # Same threads and batches on both engines: the same ids from the same weights.
    assert model["ids_agree_across_engines"] is True
    direct = rows["direct/rayexec"]
    if direct["status"] == "ok":
        assert direct["ids_changed"] and direct["ids_as_expected"], direct
        assert "rpc_mp_over_direct" in model["ratios"]
    else:
        assert direct["status"] == "not available" and "update_weights" in direct["reason"]
    assert model["ratios"]["rpc_rayexec_over_mp"]["paired_median"] > 0
    assert model["ratios"]["rpc_rayexec_over_mp_numpy"]["paired_median"] > 0
    assert model["ratios"]["rpc_mp_over_reload_only"]["paired_median"] > 0


def test_the_weight_transfer_engines_and_the_verdict_are_reported(quick_run):
    proc, doc = quick_run
    engines = doc["weight_transfer_engines"]
    # vLLM 0.32's registry; none of them runs without CUDA, each says why.
    assert {"nccl", "ipc", "sparse_nccl", "sharded_rdt", "nccl_m2n"} <= set(engines)
    assert all(e["status"] == "not run" and e["reason"] for e in engines.values())
    assert "NCCL" in engines["nccl"]["reason"]
    targets = {v["target"]: v["status"] for v in doc["verdict"]}
    assert len(targets) == 1  # --quick: the tiny model's rpc target only
    assert set(targets.values()) <= {"met", "missed"}
    assert "verdict:" in proc.stdout and "collective_rpc/rayexec" in proc.stdout
