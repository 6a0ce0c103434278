"""benchmarks/vllm_throughput.py end to end, small: the comparison command of
docs/benchmarks.md still runs, splits its rounds over fresh engine starts and checks
the token ids.

Timing is not asserted (speed belongs to the benchmark's own output); what is
asserted is the shape of what it writes and that the backends agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vllm_throughput.py"


@pytest.mark.slow  # four engine starts
def test_the_throughput_benchmark_runs_two_engine_starts_and_pairs_their_rounds(tmp_path):
    out = tmp_path / "vllm_throughput.json"
    cmd = [sys.executable, str(SCRIPT), "--layouts", "tp2", "--backends", "rayexec,mp",
           "--rounds", "2", "--engines", "2", "--repeats", "1", "--prompts", "2",
           "--max-tokens", "8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "engine set 2/2" in proc.stdout and "engine sets" in proc.stdout  # the table says so

    doc = json.loads(out.read_text())
    assert doc["settings"]["engines"] == 2 and "git_commit" in doc["versions"]
    row = doc["layouts"]["tp2"]
    assert row["tokens_agree"] is True
    rayexec, mp = row["backends"]["rayexec"], row["backends"]["mp"]
    assert rayexec["status"] == mp["status"] == "ok"
    assert len(rayexec["tokens_per_s_by_round"]) == len(mp["tokens_per_s_by_round"]) == 2
    paired = rayexec["vs_mp"]
    assert len(paired["by_round"]) == 2 and len(paired["by_engine_set"]) == 2
    assert paired["ci90"][0] <= paired["median"] <= paired["ci90"][1]
    assert all(x > 0 for x in paired["by_round"])
