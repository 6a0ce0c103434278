"""`rayexec doctor --gpu`: the plan for 0, 1 and 8 GPUs, bounded steps, the ids
check and the one summary line (pure; the command itself: tests/integration)."""

import json
import sys

from rayexec import doctor


def by_name(steps):
    return {s.name: s for s in steps}


def test_one_gpu_shares_it_between_two_stages_and_says_nccl_is_left_out(tmp_path):
    steps = by_name(doctor.plan(1, tmp_path))
    assert steps["pytest"].argv[2:5] == ["pytest", "-m", "gpu"] and steps["pytest"].skip is None
    latency = steps["latency"].argv
    assert latency[latency.index("--channels") + 1] == "shm"
    assert latency[latency.index("--gpus-per-worker") + 1] == "0.5"
    assert "nccl" in steps["latency"].left_out and "one GPU" in steps["latency"].left_out
    gen = steps["generate"].argv
    assert gen[gen.index("--pp") + 1] == "2" and "--num-devices-per-worker" in gen
    assert sum(s.cap_s for s in steps.values()) <= doctor.BUDGET_S


def test_many_gpus_take_nccl_rows_and_the_largest_layout(tmp_path):
    steps = by_name(doctor.plan(8, tmp_path))
    latency = steps["latency"].argv
    assert latency[latency.index("--channels") + 1] == "nccl,shm"
    assert not steps["latency"].left_out
    assert doctor.generate_layout(8) == (2, 4, 1.0)
    assert doctor.generate_layout(2) == (2, 1, 1.0) and doctor.generate_layout(3) == (2, 1, 1.0)
    gen = steps["generate"].argv
    assert (gen[gen.index("--pp") + 1], gen[gen.index("--tp") + 1]) == ("2", "4")


def test_without_gpus_or_checkout_steps_skip_with_the_reason(tmp_path):
    steps = by_name(doctor.plan(0, tmp_path))
    assert all(s.skip == "no CUDA GPU visible to torch" for n, s in steps.items()
               if n != "versions")
    steps = by_name(doctor.plan(1, tmp_path, root=tmp_path, have_pytest=True))
    assert "not found" in steps["pytest"].skip and "not found" in steps["latency"].skip
    no_pytest = by_name(doctor.plan(1, tmp_path, have_pytest=False))
    assert no_pytest["pytest"].skip == "pytest is not installed"


def test_a_step_past_its_time_is_killed_and_recorded(tmp_path):
    step = doctor.Step("sleepy", [sys.executable, "-c", "import time; time.sleep(60)"], 60)
    out = doctor.run_check(step, 1.5, {}, tmp_path)
    assert out.status == "timeout" and "killed after 2 s" in out.detail
    failed = doctor.run_check(doctor.Step("bad", [sys.executable, "-c", "raise SystemExit('no')"],
                                         10), 10, {}, tmp_path)
    assert failed.status == "failed" and "exit code 1: no" in failed.detail


def test_ids_must_equal_and_the_summary_is_one_line(tmp_path):
    (tmp_path / "generate_1x1.json").write_text(json.dumps({"token_ids": [[1, 2], [3]]}))
    (tmp_path / "generate_big.json").write_text(json.dumps({"token_ids": [[1, 2], [3]]}))
    assert doctor.compare_ids(tmp_path).status == "passed"
    (tmp_path / "generate_big.json").write_text(json.dumps({"token_ids": [[1, 9], [3]]}))
    bad = doctor.compare_ids(tmp_path)
    assert bad.status == "failed"
    line = doctor.summary_line([doctor.Outcome("versions", "passed"), bad,
                                doctor.Outcome("pytest", "skipped", detail="no GPU")], None)
    assert "\n" not in line and line.startswith("rayexec doctor FAILED")
    assert "ids: ids differ" in line and "pytest: no GPU" in line
