"""Every row of the bad-input catalogue (tests/bad_inputs.py, also the table in
docs/failures.md): the right exception, a message with the key words, and nothing
left behind."""

from __future__ import annotations

import pytest

from tests.bad_inputs import ROWS, Context, Row, run_row
from tests.helpers import assert_no_leaks, cluster_snapshot


@pytest.fixture(scope="module")
def ctx(local_ray):
    context = Context()
    yield context
    context.close()


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row: Row, request):
    context = request.getfixturevalue("ctx") if row.needs_ray else Context()
    before = cluster_snapshot() if row.needs_ray else None
    if row.needs_ray:
        context.executor()  # the shared one exists before the snapshot matters
        before = cluster_snapshot()
    error = run_row(row, context)
    assert error is not None, f"{row.mistake}: no exception"
    assert isinstance(error, row.error), f"{row.mistake}: {type(error).__name__}: {error}"
    for words in row.words:
        assert words in str(error), f"{row.mistake}: {words!r} not in {str(error)!r}"
    if row.needs_ray:
        assert_no_leaks(before)


def test_catalogue_is_long_enough():
    assert len(ROWS) >= 15
    assert len({r.name for r in ROWS}) == len(ROWS)
