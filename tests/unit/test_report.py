"""pp_tp_latency's report: the bare column takes the fastest plain-Ray variant, the
targets that compare cells (no cliff, worst cell over bare) read the right rows, and
a missed target's "why" line gives the figures that say whose the gap is."""

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


def test_dag_over_the_same_work_bare_variant_says_whose_the_gap_is():
    # 4 KiB: bytes 480, tensor 520, dag 550 -> dag/bare 1.15 (missed), dag/tensor 1.06
    records = [rec("dag", "shm", 4096, 550.0), rec("bare", "bytes", 4096, 480.0),
               rec("bare", "tensor", 4096, 520.0)]
    row = report.compare(records)[0]
    assert row["bare_variant"] == "bytes"
    assert abs(row["dag_over_bare_tensor"] - 550 / 520) < 1e-9
    assert "dag/tensor" in report.format_table([row]) and "1.06x" in report.format_table([row])
    worst = next(v for v in report.evaluate_targets([row]) if "bare" in v["name"])
    assert worst["met"] is False and abs(worst["same_work"] - 550 / 520) < 1e-9
    text = report.format_verdict([worst], cores=2)
    assert "dag is at most 1.06x" in text and "not rayexec's own code" in text
    # Over 1.1x of the same-work chain too: that part is ours, and the verdict says so.
    row["dag_over_bare_tensor"] = 1.2
    worst = next(v for v in report.evaluate_targets([row]) if "bare" in v["name"])
    text = report.format_verdict([worst], cores=2)
    assert "dag is at most 1.20x, and that much is rayexec's own per-step work" in text
    # Without the tensor variant in the run, no same-work figure: the plain reason.
    row = report.compare(records[:2])[0]
    assert row["dag_over_bare_tensor"] is None
    worst = next(v for v in report.evaluate_targets([row]) if "bare" in v["name"])
    assert worst["same_work"] is None
    assert "difference is rayexec's own per-step work" in report.format_verdict([worst], 2)


def test_a_missed_model_overhead_says_what_the_no_ray_floor_spends():
    def model(mode, median):
        return {**rec(mode, {"dag": "shm", "floor": "shm-eventfd"}.get(mode, "none"), 8192,
                      median, pp=2, tp=1), "workload": "model"}

    # local 9.5 ms, floor 12.7 (25% outside the compute), dag 13.2: 28%, missed
    rows = report.compare([model("local", 9500.0), model("floor", 12700.0),
                           model("dag", 13200.0)])
    target = next(v for v in report.evaluate_targets(rows) if v["name"].startswith("model"))
    assert target["met"] is False and abs(target["value"] - 3700 / 13200) < 1e-9
    assert abs(target["floor_frac"] - 3200 / 12700) < 1e-9
    text = report.format_verdict([target], cores=2)
    assert "spends 25% of its step outside the compute here, and dag is 1.04x" in text
    assert "without Ray or rayexec" in text
    # A floor under the target: what is left is the hand-offs, and the line says so.
    rows = report.compare([model("local", 9500.0), model("floor", 11000.0),
                           model("dag", 13200.0)])
    target = next(v for v in report.evaluate_targets(rows) if v["name"].startswith("model"))
    assert "Ray's and rayexec's hand-offs" in report.format_verdict([target], cores=2)
    # No floor in the run: the plain reason (processes sharing cores).
    rows = report.compare([model("local", 9500.0), model("dag", 13200.0)])
    target = next(v for v in report.evaluate_targets(rows) if v["name"].startswith("model"))
    assert target["floor_frac"] is None
    assert "share 2 core(s)" in report.format_verdict([target], cores=2)
