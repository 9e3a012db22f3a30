"""In the runner: what a job looks at instead of, or before, migrating: plans, lint, drift.

Runs inside the sandboxed runner only (it runs the project's revision code to
render their SQL). Imports nothing of Retort's state side: the findings and
answers go back to the worker, which applies the project's policy and records
them. What a runner reports is the project's own code speaking: the lint
protects a team from its mistakes, not from a project that wants to hide them.
"""

from __future__ import annotations

import contextlib
import signal
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Connection

from service import lint as linter
from service import targets
from service.jobs.run import preview
from service.jobs.run.failure import JobFailure

# Upgrades of a fleet render the same steps again and again: one bundle, one
# starting revision, one target. Their rendering is kept per runner; the live
# facts (which tables exist, their rows) are read per database.
_MAX_RENDERINGS = 32


class Preflight:
    """One runner's renderings of upgrades, kept for the next databases of its fleet."""

    def __init__(self) -> None:
        self._rendered: OrderedDict[tuple, dict[str, Any]] = OrderedDict()

    def lint_upgrade(
        self, job: dict[str, Any], conn: Connection, url: URL, script: ScriptDirectory, heads
    ) -> dict[str, Any]:
        """The findings of an upgrade about to run, from its SQL rendered without running it.

        Offline (Alembic's as_sql), except on SQLite when a step cannot be
        rendered offline (batch mode needs a live database): then a temporary
        copy of the file. Never the rolled-back mode: that is a plan's, and it
        takes real locks.
        """
        settings = job["settings"]
        dialect = targets.dialect_of(url)
        key = (
            job["bundle"]["digest"],
            dialect,
            tuple(sorted(heads)),
            job["target"],
            settings.get("version_table"),
            settings.get("version_table_schema"),
            repr(settings.get("naming_convention")),
        )
        rendered = self._rendered.pop(key, None)
        if rendered is None:
            limit = float(job.get("lint_render_timeout_s") or 0)
            try:
                with time_limit(limit):
                    rendered = self._render(job, conn, url, script, heads, dialect)
            except RenderTimeout:
                targets.rollback(conn)
                raise JobFailure(
                    "lint_render_timeout",
                    f"rendering the upgrade's SQL took longer than {limit:g} s (a revision busy "
                    "in its own code; RETORT_LINT_RENDER_TIMEOUT_S): it was not linted",
                ) from None
            while len(self._rendered) >= _MAX_RENDERINGS:
                self._rendered.popitem(last=False)
        self._rendered[key] = rendered
        findings = lint_rendered(conn, url, script, rendered, settings)
        return {"mode": rendered["mode"], "findings": findings}

    def _render(self, job, conn, url, script, heads, dialect: str) -> dict[str, Any]:
        kw = dict(
            action="upgrade",
            target=job["target"],
            heads=list(heads),
            bundle_dir=job["bundle"]["dir"],
        )
        rendered = preview.preview(
            conn, url, script, settings=job["settings"], mode="offline", **kw
        )
        if dialect == "sqlite" and any(not s.get("rendered", True) for s in rendered["steps"]):
            rendered = preview.preview(
                conn, url, script, settings=job["settings"], mode="copy", **kw
            )
        return rendered

    def plan(
        self, job: dict[str, Any], conn: Connection, url: URL, script: ScriptDirectory, heads
    ) -> dict[str, Any]:
        """A dry run's answer: each step's SQL in the mode asked for, and its findings."""
        result = preview.preview(
            conn,
            url,
            script,
            action=job["action"],
            target=job["target"],
            heads=list(heads),
            settings=job["settings"],
            mode=job.get("plan_mode") or "auto",
            lock_timeout_ms=int(job.get("plan_lock_timeout_ms") or 2000),
            bundle_dir=job["bundle"]["dir"],
        )
        result["findings"] = (
            lint_rendered(conn, url, script, result, job["settings"])
            if job["action"] == "upgrade"
            else []
        )
        return result


class RenderTimeout(BaseException):
    """The rendering ran past its limit (a BaseException: revision code's `except
    Exception` must not swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block after `seconds` (0: no limit) with RenderTimeout.

    The runner runs one job at a time on its main thread: SIGALRM is its own.
    """
    if seconds <= 0:
        yield
        return

    def expired(_signum, _frame):
        raise RenderTimeout()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def drift(
    job: dict[str, Any], conn: Connection, url: URL, script: ScriptDirectory, heads
) -> dict[str, Any]:
    """Compare the live schema with the one the bundle builds at the database's heads."""
    from service.jobs.run.drift import check_drift  # only drift jobs pay for autogenerate

    scratch = job.get("drift_scratch_url")
    try:
        scratch_url = sa.engine.make_url(scratch) if scratch else None
    except sa.exc.ArgumentError:
        raise JobFailure("drift_scratch_unavailable", "the scratch server URL is invalid") from None
    return check_drift(
        conn,
        url,
        script,
        heads=list(heads),
        settings=job["settings"],
        scratch_url=scratch_url,
        bundle_dir=job["bundle"]["dir"],
    )


def lint_rendered(
    conn: Connection, url: URL, script: ScriptDirectory, rendered: dict[str, Any], settings
) -> list[dict[str, Any]]:
    """Lint a rendering's statements with the revision graph and the target's live state."""
    dialect = targets.dialect_of(url)
    version_table = settings.get("version_table") or "alembic_version"
    statements: list[linter.Statement] = []
    findings: list[dict[str, Any]] = []
    revisions: list[str] = []
    for step in rendered["steps"]:
        revision = (step.get("revisions") or [None])[0]
        if step.get("direction") == "up" and revision:
            revisions.append(revision)
        if not step.get("rendered", True):
            # Never silently fine: what could not be rendered was not linted.
            findings.append(
                linter.Finding(
                    code="unparsed_statement",
                    severity=linter.CODES["unparsed_statement"].severity,
                    revision=revision,
                    statement=None,
                    statement_index=None,
                    message=f"revision {revision} could not be rendered before it runs "
                    f"({step.get('note') or 'no reason given'}): its SQL is not linted",
                    advice="preview it with a plan in the rolled-back (PostgreSQL) or copy "
                    "(SQLite) mode, or allow the code for this job",
                ).as_dict()
            )
        for stmt in step.get("statements") or []:
            statements.append(
                linter.Statement(
                    sql=stmt["sql"],
                    revision=revision,
                    index=len(statements),
                    raw=bool(stmt.get("raw")),
                    in_transaction=bool(stmt.get("in_transaction", True)),
                    locks=stmt.get("locks"),
                    rewrote=stmt.get("rewrote"),
                )
            )
    infos = [linter.RevisionInfo(**info) for info in preview.revisions_info(script, revisions)]
    names = linter.tables_referenced(dialect, statements, version_table=version_table)
    try:
        tables = preview.live_tables(conn, dialect, names, version_table) if names else {}
        live = linter.LiveState(tables=tables, lock_timeout_ms=settings.get("lock_timeout_ms"))
    except sa.exc.DBAPIError:
        targets.rollback(conn)
        live = linter.LiveState(known=False, lock_timeout_ms=settings.get("lock_timeout_ms"))
    else:
        targets.commit(conn)  # Alembic must start from no transaction
    found = linter.lint(dialect, statements, infos, live, version_table=version_table)
    return [f.as_dict() for f in found] + findings
