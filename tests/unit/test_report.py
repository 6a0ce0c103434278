"""pp_tp_latency's report: the bare column takes the fastest plain-Ray variant, and
the targets that compare cells (no cliff, worst cell over bare) read the right rows."""

from __future__ import annotations

from benchmarks import report


def rec(mode, channel, payload, median, pp=2, tp=2):
    return {"mode": mode, "workload": "echo", "channel": channel, "pp": pp, "tp": tp,
            "payload_bytes": payload, "median_us": median, "p99_us": median}


RECORDS = [
    rec("dag", "shm", 4096, 500.0), rec("dag", "shm", 65536, 700.0),
    rec("dag", "gloo", 4096, 2000.0),
    rec("bare", "dict", 4096, 1100.0), rec("bare", "bytes", 4096, 480.0),
    rec("bare", "shm", 65536, 900.0), rec("bare", "bytes", 65536, 560.0),
    rec("rpc", "ray-rpc", 4096, 3000.0), rec("floor", "shm-eventfd", 4096, 250.0),
]


def test_bare_is_the_fastest_variant_and_dag_over_bare_uses_it():
    rows = {(r["payload_bytes"], r["channel"]): r for r in report.compare(RECORDS)}
    small = rows[(4096, "shm")]
    assert small["bare_variant"] == "bytes" and small["bare_median_us"] == 480.0
    assert small["bare_medians_us"] == {"dict": 1100.0, "bytes": 480.0}
    assert abs(small["dag_over_bare"] - 500 / 480) < 1e-9
    assert abs(rows[(65536, "shm")]["dag_over_bare"] - 700 / 560) < 1e-9


def test_cross_cell_targets_read_the_default_channel_only():
    verdicts = {v["name"]: v for v in report.evaluate_targets(report.compare(RECORDS), "shm")}
    cliff = next(v for n, v in verdicts.items() if n.startswith("no cliff"))
    assert abs(cliff["value"] - 700 / 500) < 1e-9 and cliff["met"] is True
    worst = next(v for n, v in verdicts.items() if "bare" in n)
    # the worst shm cell (64 KiB: 1.25x), not the gloo row (2000 / 480)
    assert abs(worst["value"] - 1.25) < 1e-9 and worst["met"] is False
    rpc = next(v for n, v in verdicts.items() if n.startswith("dag >= 5x") and "4 KiB" in n)
    assert rpc["value"] == 6.0 and rpc["met"] is True
    text = report.format_verdict(list(verdicts.values()), cores=2)
    assert "difference is rayexec's own per-step work" in text
