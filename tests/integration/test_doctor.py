"""`python -m rayexec doctor --gpu` as a command on this CPU machine: --dry-run
prints the plan for one GPU; a real run ends with one summary line."""

import json
import subprocess
import sys


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rayexec", "doctor", "--gpu", "--dry-run",
                           "--gpus", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pytest -m gpu" in done.stdout and "--gpus-per-worker 0.5" in done.stdout
    assert "not run: latency's nccl row" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "rayexec doctor DRY RUN: nothing was run"
    assert list(tmp_path.iterdir()) == []


def test_on_a_machine_without_gpus_it_ends_with_one_summary_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rayexec", "doctor", "--gpu", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    last = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout + done.stderr
    assert last.startswith("rayexec doctor PASSED: versions=passed pytest=skipped"), last
    assert "no CUDA GPU visible to torch" in last
    assert (tmp_path / "doctor.log").read_text().count("==== [") == 5
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["versions"]["torch"] and summary["versions"]["gpu_count"] == 0
