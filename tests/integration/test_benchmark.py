"""Smoke tests of benchmarks/pp_tp_latency.py: it runs, every requested mode produces
numbers for every cell, and the JSON has the documented schema. No timing is asserted
(timings belong to the benchmark's output, not to tests).

One run goes through the script in a subprocess started from another directory (the
path users take; Ray workers must still find EchoWorker), writing where the README
command writes (results/latest/, git-ignored) and ending with the verdict; the other
calls `main()` in-process through the package import, with the Ray-free modes only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "pp_tp_latency.py"
RECORD_FIELDS = {
    "mode": str, "workload": str, "channel": str, "pp": int, "tp": int, "payload_bytes": int,
    "iters": int, "median_us": float, "p90_us": float, "p99_us": float, "steps_per_s": float,
}
FAST = ["--iters", "4", "--warmup", "1", "--max-seconds", "0.5"]


def tracked_changes() -> str | None:
    """`git status` of tracked files, or None without a git checkout."""
    if not (ROOT / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def check_document(doc: dict, modes: list[str], workloads: list[str], cells: list[tuple],
                   payloads: list[int]) -> None:
    for key in ("machine", "versions", "args", "results", "comparisons", "targets", "errors"):
        assert key in doc, f"missing top-level key {key!r}"
    assert doc["errors"] == [], doc["errors"]
    assert doc["versions"]["torch"] and doc["machine"]["cpu_count"] >= 1
    for r in doc["results"]:
        for field, kind in RECORD_FIELDS.items():
            value = r[field]
            assert isinstance(value, kind) or (kind is float and isinstance(value, int)), \
                f"{field}={value!r} in {r}"
        assert 0 < r["median_us"] <= r["p99_us"] and r["iters"] >= 1, r
        assert r["p90_us"] <= r["p99_us"], r
        if r["workload"] == "echo":
            assert r["mb_per_s"] > 0, r
    got = {(r["mode"], r["workload"], r["pp"], r["tp"], r["payload_bytes"])
           for r in doc["results"]}
    for mode in modes:
        for workload in workloads:
            for pp, tp in cells:
                sizes = payloads if workload == "echo" else [8 * 256 * 4]  # hidden states
                for size in sizes:
                    assert (mode, workload, pp, tp, size) in got, \
                        f"no numbers for {mode} {workload} PP={pp} TP={tp} {size} B"
    for row in doc["comparisons"]:
        for mode in modes:
            assert row[f"{mode}_median_us"] is not None, row


@pytest.mark.slow  # every mode's executors, one after another
def test_script_quick_run_all_modes(tmp_path: Path) -> None:
    from benchmarks import pp_tp_latency

    out = pp_tp_latency.DEFAULT_OUT  # where the README command writes
    before = tracked_changes()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--pp", "2", "--tp", "1", "--payloads", "4k",
         *FAST],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert tracked_changes() == before, "the benchmark changed tracked files"
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("pp_tp_latency {"), lines[-1]
    summary = json.loads(lines[-1].split(" ", 1)[1])
    assert summary["errors"] == 0 and summary["results"] > 0
    assert Path(summary["json"]) == out
    # A plot, or the reason there is none and how to get it.
    assert (summary["plot"] and Path(summary["plot"]).exists()) or \
        "pip install -e '.[plot]'" in summary["plot_skipped"], summary
    # The verdict: every target in words, met / MISSED / not measured; a miss says why.
    verdict = "\n".join(lines[next(i for i, line in enumerate(lines)
                                   if line.startswith("verdict: ")):-1])
    from benchmarks.report import MEANINGS

    for meaning in MEANINGS:
        assert meaning in verdict, verdict
    assert "measured targets met" in verdict
    assert verdict.count("MISSED") == verdict.count("why: "), verdict
    assert "not measured" in verdict  # --pp 2 --tp 1 leaves the PP=2 x TP=2 targets out
    doc = json.loads(out.read_text())
    check_document(doc, ["dag", "rpc", "floor", "local"], ["echo", "model"], [(2, 1)], [4096])
    # One row per channel: on CPU, shm and gloo by default.
    assert {r["channel"] for r in doc["results"] if r["mode"] == "dag"} == {"shm", "gloo"}
    assert {row["channel"] for row in doc["comparisons"]} == {"shm", "gloo"}
    assert doc["ray_worker_niceness"] is not None
    targets = {t["name"]: t for t in doc["targets"]}
    model_target = next(t for name, t in targets.items() if name.startswith("model overhead"))
    assert model_target["value"] is not None  # measured: PP=2 x TP=1 was in the grid
    for row in doc["comparisons"]:  # echo does no compute: no overhead to report
        assert (row["dag_overhead_frac"] is None) == (row["workload"] == "echo"), row
    # Every plain-Ray variant ran (the tensor one checked like the rest: a tensor of the
    # payload's size came back), and the echo rows compare dag with the same-work one.
    from benchmarks.bare import VARIANTS

    assert {r["channel"] for r in doc["results"] if r["mode"] == "bare"} == set(VARIANTS)
    for row in doc["comparisons"]:
        assert (row["dag_over_bare_tensor"] is None) == (row["workload"] != "echo"), row
    assert "dag/tensor" in proc.stdout


def test_missed_target_says_why_and_points_to_the_docs() -> None:
    from benchmarks import report

    rows = [{"workload": "echo", "pp": 2, "tp": 2, "payload_bytes": 4096,
             "rpc_over_dag": 4.1, "dag_over_floor": 7.0}]
    verdicts = report.evaluate_targets(rows)
    text = report.format_verdict(verdicts, cores=2)
    assert "MISSED: " + report.MEANINGS[0] in text and "(measured 4.1x, target >= 5x)" in text
    assert "5 processes (the workers and the driver) share 2 core(s)" in text
    assert "docs/benchmarks.md" in text
    assert text.startswith("verdict: 0 of 1 measured targets met")
    roomy = report.format_verdict(verdicts, cores=16)
    assert "not the known cause" in roomy and "docs/benchmarks.md" in roomy
    assert "caution" not in report.format_verdict(verdicts, cores=2, load=1.5)
    assert "load average up to 30.0 on 2 cores" in report.format_verdict(verdicts, 2, 30.0)


def test_main_in_process_floor_and_local(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from benchmarks import pp_tp_latency

    out = tmp_path / "floor.json"
    code = pp_tp_latency.main(["--pp", "1,2", "--tp", "2", "--payloads", "4k,64k", "--modes",
                               "floor,local", *FAST, "--no-plot", "--out", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    check_document(doc, ["floor", "local"], ["echo", "model"], [(1, 2), (2, 2)], [4096, 65536])
    model = [r for r in doc["results"] if r["workload"] == "model"]
    assert len({tuple(r["output_digest"]) for r in model}) == 1  # same tokens everywhere


def test_a_cell_running_long_prints_its_stacks_and_only_while_it_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import time

    from benchmarks import pp_tp_latency

    real = pp_tp_latency.run_configuration

    def slow_cell(*args: object) -> object:  # the real cell, then a stall of 0.5 s
        records = real(*args)
        time.sleep(0.5)
        return records

    monkeypatch.setattr(pp_tp_latency, "run_configuration", slow_cell)
    monkeypatch.setattr(pp_tp_latency, "CELL_STACKS_AFTER_S", 0.2)
    code = pp_tp_latency.main(["--pp", "1", "--tp", "1", "--payloads", "4k", "--modes",
                               "floor", "--workloads", "echo", *FAST, "--no-plot", "--out",
                               str(tmp_path / "floor.json")])
    assert code == 0
    err = capfd.readouterr().err
    assert "Timeout (0:00:00.2" in err and "slow_cell" in err
    time.sleep(0.3)
    assert "Timeout (" not in capfd.readouterr().err  # cancelled once the cell ended


def test_payload_sizes_and_bad_flags() -> None:
    from benchmarks import pp_tp_latency

    assert [pp_tp_latency.parse_size(s) for s in ("4k", "1m", "16MiB", "100")] == \
        [4096, 1 << 20, 16 << 20, 100]
    with pytest.raises(SystemExit):
        pp_tp_latency.parse_args(["--payloads", "lots"])
    with pytest.raises(SystemExit):
        pp_tp_latency.parse_args(["--modes", "dag,fast"])
    with pytest.raises(SystemExit):
        pp_tp_latency.parse_args(["--store-restart-fraction", "1.5"])
    args = pp_tp_latency.parse_args(["--quick", "--pp", "4", "--tp", "1,2"])
    cells, skipped = pp_tp_latency.layouts(args)
    assert cells == [(4, 1)] and "8 workers" in skipped[0]


def test_every_cell_is_bounded_well_under_the_executor_defaults() -> None:
    """A stalled cell must fail in minutes (rayexec's timeout error) and let the run go
    on, not hold it for the defaults' 600 s of setup and 300 s a step."""
    import dataclasses

    from benchmarks.runners import CELL_BOUNDS, Workload
    from rayexec import ExecutorConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ExecutorConfig)}
    for name in ("echo", "model"):
        config = Workload(name, (4096,), "cpu").config(2, 1, "dag", "shm")
        for field in ("init_timeout_s", "execute_timeout_s"):
            assert getattr(config, field) == CELL_BOUNDS[field] < defaults[field] / 4


def test_idle_park_script_runs_and_parked_workers_use_less_cpu(tmp_path: Path) -> None:
    """benchmarks/idle_park.py, shortest run: both settings measured, JSON written.
    A CPU-use comparison, not a timing: polling workers spin on a core each, parked
    ones sleep, so the gap is about a core per worker on any machine."""
    out = tmp_path / "idle.json"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "idle_park.py"), "--layouts", "1x2",
         "--idle-s", "3", "--rounds", "1", "--warm-steps", "3", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    rows = {r["idle_park_s"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {None, 0.5}
    assert rows[0.5]["idle_cores_settled"] < rows[None]["idle_cores_settled"] - 0.5
    assert all(r["first_step_after_idle_ms"] > 0 for r in rows.values())


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout (--base)")
def test_wire_ab_script_compares_two_wire_versions_alone_and_in_a_graph(tmp_path: Path) -> None:
    """benchmarks/wire_ab.py, shortest run, from another directory: both versions of
    wire.py carry the echo payload back through the graph (the script checks the
    bytes), and the JSON has every message and size with both versions."""
    out = tmp_path / "wire_ab.json"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "wire_ab.py"), "--base", "HEAD", "--sizes",
         "4096", "70000", "--rounds", "2", "--steps", "5", "--number", "50", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    doc = json.loads(out.read_text())
    assert len(doc["alone"]) == 4 and all(
        len(row[f"{v}_{op}_us"]) == 2 for row in doc["alone"]
        for v in ("base", "tree") for op in ("pack", "unpack"))
    assert [r["payload_bytes"] for r in doc["graph"]] == [4096, 70000]
    for row in doc["graph"]:
        assert len(row["base_us"]) == len(row["tree_us"]) == 2 and row["tree_over_base"] > 0


def test_embedded_ray_is_restarted_when_its_store_fills(tmp_path: Path) -> None:
    """Ray 2.60 keeps every torn-down graph's channel buffers in the object store; the
    script restarts the Ray it started before a configuration once the store is more
    than --store-restart-fraction full (0 here: after the first graph), and every
    configuration still gives its numbers."""
    out = tmp_path / "restarts.json"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--modes", "bare,dag", "--workloads", "echo", "--pp", "1",
         "--tp", "1", "--payloads", "4k", "--channels", "shm", "--store-restart-fraction", "0",
         "--no-plot", "--out", str(out), *FAST],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    doc = json.loads(out.read_text())
    from benchmarks.bare import VARIANTS

    # Five bare variants and the dag: every configuration after the first finds the
    # store holding the previous graphs' buffers (Ray 2.60's leak, ray#43836; a Ray that
    # frees them fails this count, and the restart is then no longer needed).
    assert len(doc["ray_restarts"]) == len(VARIANTS), doc["ray_restarts"]
    assert all(r["store_fraction"] > 0 for r in doc["ray_restarts"])
    assert proc.stderr.count("restarting the embedded Ray") == len(VARIANTS)
    assert {(r["mode"], r["channel"]) for r in doc["results"]} == \
        {("bare", v) for v in VARIANTS} | {("dag", "shm")}
    assert doc["errors"] == []
