"""Pure: the steps a job takes on a database, as Alembic's revision graph says.

No I/O and no Retort state: the runner uses it on the scripts it loaded, and
unit tests use it on any ScriptDirectory.
"""

from __future__ import annotations

from typing import Any

from alembic.script import ScriptDirectory

from service.jobs import relative
from service.jobs.run.failure import JobFailure

RELATIVE = relative.STEPS


def is_relative(target: str) -> bool:
    """+N, -N and branch@+N depend on where the database is: not safe to run twice."""
    return relative.from_current(target)


def steps_for(script: ScriptDirectory, action: str, target: str, heads) -> list[Any]:
    """The migration steps from `heads` to `target` (Alembic's own planning)."""
    if action == "upgrade":
        return list(script._upgrade_revs(target, heads))
    if action == "downgrade":
        return list(script._downgrade_revs(target, heads))
    return list(script._stamp_revs(tuple(target.split(",")), heads))


def nothing_to_do(script: ScriptDirectory, action: str, target: str, heads: list[str]) -> bool:
    """Whether an absolute upgrade or downgrade finds the database already at its target."""
    if is_relative(target) or action not in ("upgrade", "downgrade"):
        return False
    try:
        return not steps_for(script, action, target, tuple(heads))
    except Exception:  # noqa: BLE001 - the full run reports what is wrong with the target
        return False


def destination(action: str, steps: list[Any]) -> str | None:
    """The one revision a relative upgrade or downgrade ends at, if it is one."""
    if not steps or action not in ("upgrade", "downgrade"):
        return None
    ends = steps[-1].to_revisions
    if not ends:
        return "base"
    return ends[0] if len(ends) == 1 else None


def refuse_blind_resume(script: ScriptDirectory, action: str, target: str, heads) -> None:
    """A MySQL migration that was cut off may have left a half-applied step: stop for a human."""
    if is_relative(target):
        remaining = True  # it never planned, or its destination is not one revision
    else:
        remaining = bool(steps_for(script, action, target, tuple(heads)))
    if remaining:
        where = ", ".join(heads) or "base"
        raise JobFailure(
            "needs_attention",
            "the worker running this job was lost in the middle of its migration of a "
            "MySQL/MariaDB database, where DDL commits statement by statement: the revision "
            f"after {where} may be half applied. Inspect the database, finish or undo that "
            "revision by hand, then stamp.",
            database_heads=heads,
        )


def applied_between(script: ScriptDirectory, from_heads, heads) -> list[dict[str, Any]]:
    """Revisions in `heads`' history but not `from_heads`', oldest first, with their doc.

    Used on a recovered attempt: what an earlier attempt committed on the target.
    """
    try:
        now = [r.revision for r in script.revision_map.iterate_revisions(tuple(heads), ())]
        before = {r.revision for r in script.revision_map.iterate_revisions(tuple(from_heads), ())}
    except Exception:  # noqa: BLE001 - heads outside this bundle: the checksum check says so
        return []
    return [
        {"revision": rev, "doc": script.get_revision(rev).doc}
        for rev in reversed(now)
        if rev not in before
    ]


def changed_revisions(sha_by_revision: dict[str, str], applied: dict[str, str]) -> list[str]:
    """The applied revisions whose recorded file is not the bundle's, sorted."""
    return sorted(
        rev
        for rev, sha in applied.items()
        if rev in sha_by_revision and sha and sha_by_revision[rev] != sha
    )


def check_checksums(sha_by_revision: dict[str, str], applied: dict[str, str], current) -> None:
    """Refuse a bundle whose applied revisions changed, or that lacks the current heads."""
    changed = changed_revisions(sha_by_revision, applied)
    if changed:
        raise JobFailure(
            "revision_changed",
            f"revision {changed[0]} was applied from a different file than the bundle carries "
            f"(applied sha256 {applied[changed[0]][:12]}, "
            f"bundle {sha_by_revision[changed[0]][:12]});"
            " revision files must not change once applied: add a new revision instead",
            revision=changed[0],
            revisions=changed,
        )
    unknown = [h for h in current if h not in sha_by_revision]
    if unknown:
        raise JobFailure(
            "unknown_current_revision",
            f"the database is at {', '.join(unknown)}, which this bundle does not contain; "
            "upload a bundle that includes it",
            revision=unknown[0],
        )
