"""The documentation stays true: CI runs the README's test command, the README stays a
short read whose links lead somewhere, docs/configuration.md is what `rayexec config
--markdown` prints, and docs/failures.md lists every row of the bad-input catalogue."""

from __future__ import annotations

import re
from pathlib import Path

from rayexec.cli import config_markdown

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", README.read_text())


def test_ci_runs_the_readme_test_command_exactly():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_readme_main_job_installs_then_runs_the_benchmark():
    main = readme_commands()[0]
    assert main == ("pip install torch==2.13.0 && pip install -e . && "
                    "python benchmarks/pp_tp_latency.py")


def test_readme_is_a_short_read_and_its_links_exist():
    text = README.read_text()
    assert len(text.encode()) <= 12 * 1024, f"README.md is {len(text.encode())} bytes"
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_configuration_page_is_current():
    page = ROOT / "docs" / "configuration.md"
    assert page.exists() and page.read_text() == config_markdown(), (
        "docs/configuration.md is stale (an ExecutorConfig field or docstring changed); "
        "regenerate it: python -m rayexec config --markdown > docs/configuration.md"
    )


def test_failures_page_lists_every_bad_input_row():
    from tests.bad_inputs import DOC, ROWS, TABLE_END, TABLE_START

    text = DOC.read_text()
    assert TABLE_START in text and TABLE_END in text
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    mistakes = [line.split(" | ")[1] for line in rows]
    assert mistakes == [row.mistake for row in ROWS], (
        "the bad-input table in docs/failures.md does not match tests/bad_inputs.py; "
        "regenerate it: python -m tests.bad_inputs --write"
    )
    assert "/work/" not in table and "/home/" not in table  # paths relative to the repo
