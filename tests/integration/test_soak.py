"""A short soak (benchmarks/soak.py): steps and create/shutdown cycles leave no
actor, placement group or thread behind. Memory growth is reported, not asserted
(it is noise at this length; the full soak measures it)."""

from __future__ import annotations

import json

from benchmarks import soak


def test_short_soak_leaks_nothing(local_ray, tmp_path):
    out = tmp_path / "soak.json"
    result = soak.main(["--steps", "200", "--sample-every", "100", "--cycles", "3",
                        "--out", str(out)])
    assert json.loads(out.read_text())["cycles"]["cycles"] == 3
    c = result["cycles"]
    assert (c["leaked_actors"], c["leaked_placement_groups"], c["leaked_threads"]) == (0, 0, 0)
    s = result["steps"]
    assert [x["step"] for x in s["samples"]] == [0, 100, 200]
    assert len(s["workers_mb_per_1000_steps"]) == 2 and s["steps_per_s"] > 0
