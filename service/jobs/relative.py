"""Pure: the one reading of a target's relative forms (no I/O, no Retort state).

The API checks targets with it (jobs.targets), decides which requests may
coalesce (jobs.ops), and the runner plans with it (jobs.run.plan).

- `+N` / `-N`: N steps from wherever the database is;
- `label@+N` / `label@-N`: N steps along a branch from where the database is on it;
- `rev+N` / `rev-N`: N steps from a named revision: a fixed place, whatever the
  database's current revision;
- `label@head`, `label@base`: the ends of a branch.
"""

from __future__ import annotations

import re

STEPS = re.compile(r"^([+-])(\d+)$")
BRANCH = re.compile(r"^(?P<label>[^@]+)@(?P<rel>head|base|[+-]\d+)$")
FROM_REVISION = re.compile(r"^(?P<rev>.+?)(?P<rel>[+-]\d+)$")


def steps(target: str) -> tuple[str, int] | None:
    """("+"|"-", N) for `+N` / `-N`, else None."""
    match = STEPS.match(target)
    return (match.group(1), int(match.group(2))) if match else None


def from_current(target: str) -> bool:
    """Whether the target depends on where the database is (`+N`, `-N`, `label@±N`):
    such a request is not the same request twice, and a recovered attempt must go
    where the first one was going (its resolved target), not N further."""
    if STEPS.match(target):
        return True
    branch = BRANCH.match(target)
    return bool(branch and branch.group("rel") not in ("head", "base"))
