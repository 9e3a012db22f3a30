"""The one reading of relative targets (service/jobs/relative.py), as API and runner use it."""

import pytest

from service.jobs import relative
from service.jobs.run import plan


@pytest.mark.parametrize(
    ("target", "from_current"),
    [
        ("+1", True),
        ("-2", True),
        ("feature@+1", True),
        ("feature@-3", True),
        ("feature@head", False),
        ("feature@base", False),
        ("abc123+2", False),  # two steps past a named revision: one place, whatever the database
        ("abc123", False),
        ("head", False),
        ("heads", False),
        ("base", False),
    ],
)
def test_what_depends_on_where_the_database_is(target, from_current):
    assert relative.from_current(target) is from_current
    assert plan.is_relative(target) is from_current  # the runner reads it the same way


def test_steps_and_the_branch_forms():
    assert relative.steps("+3") == ("+", 3) and relative.steps("-1") == ("-", 1)
    assert relative.steps("abc+1") is None
    assert relative.BRANCH.match("feature@+2").group("label") == "feature"
    assert relative.FROM_REVISION.match("abc123-2").group("rev") == "abc123"
