"""The README stays true: CI runs its test command, and its configuration table is
the one `rayexec config --markdown` prints."""

from __future__ import annotations

import re
from pathlib import Path

from rayexec.cli import config_rows

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command_exactly():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_readme_main_job_installs_then_runs_the_benchmark():
    main = readme_commands()[0]
    assert main.startswith("pip install torch==2.13.0 && ")
    assert main.endswith("python benchmarks/pp_tp_latency.py")


def test_readme_config_table_lists_every_field_and_variable():
    readme = (ROOT / "README.md").read_text()
    for name, var, default, _ in config_rows():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}` |")),
                   None)
        assert row is not None, f"README lacks the config row for {name}"
        assert (f"`{var}`" in row) if var != "-" else True
        assert f"`{default}`" in row, f"README default of {name} is not {default}"
