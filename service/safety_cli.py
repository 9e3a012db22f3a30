"""`retort plan`, `retort drift`, `retort approve`, `retort reject`: safety before it runs.

A plan is a job with `dry_run: true` (docs/plan.md): it changes nothing and
answers with each step's SQL and the lint's findings. A drift check is a job
of kind "drift" (docs/drift.md). Both exit 3, like a refusal, when what they
found would stop a deploy: blocking findings, or drift.
"""

from __future__ import annotations

import uuid
from typing import Any

import click

from service.cli_base import Cli, api_command
from service.client import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    FINAL_STATES,
    WaitTimeout,
    job_exit_code,
    segment,
)

PLAN_MODES = ["auto", "offline", "rolled_back", "copy"]


def wait_final(cli: Cli, job_id: int, timeout: float | None) -> dict[str, Any] | None:
    """The job once final (None on timeout, said on stderr)."""
    job: dict[str, Any] | None = None
    try:
        for job in cli.api.watch_job(job_id, timeout):
            if job["state"] in FINAL_STATES:
                return job
    except WaitTimeout as exc:
        click.echo(f"timed out after {exc.timeout:g} s waiting for job {job_id}", err=True)
        return None
    return job


def _finish(
    cli: Cli, job: dict[str, Any], timeout: float | None, what: str
) -> tuple[dict[str, Any], int | None]:
    """Wait for a plan or drift check; (the job, None) when it succeeded, else an exit code."""
    final = wait_final(cli, job.get("coalesced_into") or job["id"], timeout)
    if final is None:
        return job, EXIT_TIMEOUT
    if cli.as_json:
        cli.document(final)
    if final["state"] == "succeeded":
        return final, None
    if not cli.as_json:
        error = final.get("error") or {}
        click.echo(f"{what} job {final['id']} {final['state']}: {error.get('message')}")
    return final, job_exit_code(final) or EXIT_FAILED


def request_plan(
    cli: Cli,
    database: str,
    action: str,
    target: str,
    mode: str,
    bundle: str | None,
    timeout: float | None,
) -> int:
    """Ask for a plan, wait for it, print it; exit 3 when it has blocking findings."""
    body: dict[str, Any] = {
        "database": database,
        "action": action,
        "target": target,
        "dry_run": True,
        "plan_mode": mode,
    }
    if bundle:
        body["bundle"] = bundle
    job, _ = cli.api.create_job(body, str(uuid.uuid4()))
    final, code = _finish(cli, job, timeout, "plan")
    if code is not None:
        return code
    result = final.get("result") or {}
    if not cli.as_json:
        show_plan(final, result)
    return EXIT_REFUSED if result.get("would_block") else EXIT_OK


def show_plan(job: dict[str, Any], result: dict[str, Any]) -> None:
    """Print a plan: its mode and limits, each step's SQL, then the findings."""
    frm = ", ".join(result.get("from_heads") or []) or "base"
    to = ", ".join(result.get("to_heads") or []) or "base"
    click.echo(
        f"plan (job {job['id']}, {result.get('mode')} mode): {job['action']} "
        f"{job['database']} from {frm} to {to}"
    )
    for limit in result.get("limitations") or []:
        click.echo(f"  note: {limit}")
    if result.get("nothing_to_do"):
        click.echo("nothing to do: the database is at its target")
    for step in result.get("steps") or []:
        revs = ", ".join(step.get("revisions") or [])
        where = f" ({step['revision_file']})" if step.get("revision_file") else ""
        click.echo(f"\n-- {step.get('direction')} {revs}: {step.get('message') or ''}{where}")
        if not step.get("rendered", True):
            click.echo(f"-- not shown: {step.get('note')}")
        elif step.get("note"):
            click.echo(f"-- note: {step['note']}")
        for stmt in step.get("statements") or []:
            flags = []
            if stmt.get("flag"):
                flags.append(f"{stmt['flag']}: shown, not run")
            locks = stmt.get("locks")
            if locks:
                flags.append(
                    "locks " + ", ".join(f"{lk['relation']} {lk['mode']}" for lk in locks[:6])
                )
            if stmt.get("rewrote"):
                flags.append("rewrote " + ", ".join(stmt["rewrote"]))
            if flags:
                click.echo(f"-- [{'; '.join(flags)}]")
            click.echo(stmt["sql"].rstrip().rstrip(";") + ";")
    for seq in result.get("sequences_advanced") or []:
        click.echo(f"\nnote: sequence {seq} advanced (nextval is not rolled back)")
    findings = result.get("findings") or []
    click.echo()
    if not findings:
        click.echo("lint: no findings")
    for f in findings:
        where = f" {f['revision']}" if f.get("revision") else ""
        click.echo(f"{f.get('action', 'warn')}: {f['code']}{where}: {f['message']}")
        if f.get("advice"):
            click.echo(f"    advice: {f['advice']}")
    if result.get("would_block"):
        codes = ",".join(result["would_block"])
        click.echo(
            f"\nan upgrade would wait for an approval ({codes}); or request it with --allow {codes}"
        )


def show_findings(job: dict[str, Any]) -> None:
    """Print why a job waits for an approval, and how to decide."""
    findings = job.get("findings") or {}
    for f in findings.get("blocking") or []:
        where = f" {f['revision']}" if f.get("revision") else ""
        click.echo(f"blocked: {f['code']}{where}: {f['message']}", err=True)
        if f.get("advice"):
            click.echo(f"    advice: {f['advice']}", err=True)
    click.echo(
        f"job {job['id']} waits for an approval: retort approve {job['id']} "
        f"(or retort reject {job['id']}), by an approver other than {job['requested_by']}",
        err=True,
    )


def register(main: click.Group) -> None:
    """Add plan, drift, approve and reject to the `retort` group."""
    main.add_command(plan_cmd)
    main.add_command(drift_cmd)
    main.add_command(approve_cmd)
    main.add_command(reject_cmd)


@api_command(None, "plan")
@click.argument("database")
@click.option("--to", "target", default="head", show_default=True, help="Target revision.")
@click.option(
    "--action",
    type=click.Choice(["upgrade", "downgrade", "stamp"]),
    default="upgrade",
    show_default=True,
)
@click.option(
    "--mode",
    type=click.Choice(PLAN_MODES),
    default="auto",
    show_default=True,
    help="auto: rolled_back on PostgreSQL, copy on SQLite, offline on MySQL/MariaDB.",
)
@click.option("--bundle", help="Bundle id or prefix (default: the project's latest).")
@click.option("--timeout", type=click.FloatRange(min=0), help="Seconds to wait at most.")
def plan_cmd(
    cli: Cli,
    database: str,
    target: str,
    action: str,
    mode: str,
    bundle: str | None,
    timeout: float | None,
) -> int:
    """Show what a migration of DATABASE would run, and change nothing.

    Each step's SQL from the database's current revision, what the mode could
    not show, and the lint's findings. Exits 3 when the findings would make an
    upgrade wait for an approval.
    """
    if action == "downgrade" and target == "head":
        raise click.UsageError("a downgrade needs --to (a revision, base or -N)")
    return request_plan(cli, database, action, target, mode, bundle, timeout)


@api_command(None, "drift")
@click.argument("database")
@click.option("--timeout", type=click.FloatRange(min=0), help="Seconds to wait at most.")
@click.option("--last", is_flag=True, help="Show the newest check; run none.")
def drift_cmd(cli: Cli, database: str, timeout: float | None, last: bool) -> int:
    """Check DATABASE for drift: does its schema match what its bundle builds?

    Builds the bundle's schema at the database's current revision in a scratch
    database and compares. Exits 0 when they match, 3 when they differ (for CI,
    like `alembic check`), 1 when the check could not run.
    """
    path = f"/v1/databases/{segment(database)}/drift"
    if last:
        latest = cli.api.get(path)
        if cli.as_json:
            cli.document(latest)
        elif latest.get("result") is None:
            cli.echo(f"{database}: never checked for drift")
        else:
            _show_drift(database, latest["result"], latest.get("checked_at"))
        return EXIT_REFUSED if latest.get("drifted") else EXIT_OK
    job = cli.api.request("POST", path, json_body={}).body
    final, code = _finish(cli, job, timeout, "drift check")
    if code is not None:
        return code
    result = final.get("result") or {}
    if not cli.as_json:
        _show_drift(database, result, final.get("finished_at"))
    return EXIT_REFUSED if result.get("drifted") else EXIT_OK


def _show_drift(database: str, result: dict[str, Any], when: str | None) -> None:
    heads = ", ".join(result.get("heads") or []) or "base"
    if not result.get("drifted"):
        click.echo(f"{database}: no drift at {heads} (checked {when})")
        return
    diffs = result.get("differences") or []
    click.echo(f"{database}: DRIFT at {heads}: {len(diffs)} difference(s) (checked {when})")
    for d in diffs:
        name = f".{d['name']}" if d.get("name") else ""
        click.echo(f"  {d.get('kind')}: {d.get('table') or ''}{name} {d.get('detail') or ''}")
    if result.get("operations"):
        click.echo("\nto bring the database to what the bundle builds:")
        click.echo(result["operations"])


def _decide(cli: Cli, job_id: int, decision: str, comment: str | None) -> int:
    body = {"comment": comment} if comment else {}
    job = cli.api.request("POST", f"/v1/jobs/{job_id}/{decision}", json_body=body).body
    if cli.as_json:
        cli.document(job)
    else:
        codes = ", ".join((job.get("approval") or {}).get("codes") or [])
        verb = "approved" if decision == "approve" else "rejected"
        cli.echo(f"job {job_id} {verb} ({codes}); it is {job['state']}")
    return EXIT_OK


@api_command(None, "approve")
@click.argument("job_id", metavar="JOB", type=int)
@click.option("--comment", help="Why (kept in the audit log).")
def approve_cmd(cli: Cli, job_id: int, comment: str | None) -> int:
    """Approve JOB's blocking lint findings: it goes back to the queue."""
    return _decide(cli, job_id, "approve", comment)


@api_command(None, "reject")
@click.argument("job_id", metavar="JOB", type=int)
@click.option("--comment", help="Why (kept in the audit log).")
def reject_cmd(cli: Cli, job_id: int, comment: str | None) -> int:
    """Reject JOB: it is cancelled, its findings and your decision audited."""
    return _decide(cli, job_id, "reject", comment)
