"""The pipeline-facing `retort` commands: push, migrate, wait, status, jobs, history, current.

They talk to a running Retort over its HTTP API (service/client.py) and report
through their exit codes (listed once, in `retort --help`: cli_base.EXIT_CODES_HELP),
so a deploy pipeline can act on the outcome.
"""

from __future__ import annotations

import datetime as dt
import itertools
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import click

from service.bundles.notices import scan as scan_notices
from service.cli_base import (  # Cli and api_command: re-exported
    Cli,
    api_command,
    format_revs,
    format_time,
    print_table,
    shorten,
)
from service.client import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    FINAL_STATES,
    WaitTimeout,
    check_idempotency_key,
    job_exit_code,
    pack_checkout,
    pack_scripts,
    segment,
)
from service.safety_cli import request_plan, show_findings


@api_command(None, "push")
@click.argument("project")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--versions",
    "versions",
    metavar="PATH",
    help="The folder of revision scripts inside DIRECTORY (a checkout): pack it in "
    "the checkout's shape, with the --python-path folders and nothing else.",
)
@click.option(
    "--python-path",
    "python_path",
    metavar="FOLDER",
    multiple=True,
    help="A folder of DIRECTORY the revisions import from (a models package's parent), "
    "put on the runner's import path; repeat it or separate with commas. Needs --versions.",
)
@click.option(
    "--requirements",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A requirements file packed as the bundle's requirements.txt (with --versions).",
)
def push(
    cli: Cli,
    project: str,
    directory: Path,
    versions: str | None,
    python_path: tuple[str, ...],
    requirements: Path | None,
) -> int:
    """Upload Alembic scripts as a bundle of PROJECT.

    DIRECTORY is an Alembic directory (env.py and versions/) or a versions
    directory; with --versions, a checkout packed in its own shape (the
    versions folder and the --python-path folders only: never alembic.ini,
    env.py or .git). Retort does not run env.py: the notices printed say
    which project settings stand in for it. Pushing the same scripts again
    changes nothing.
    """
    bundle = _push(cli, project, directory, versions, python_path, requirements)
    if cli.as_json:
        cli.document(bundle)
    return EXIT_OK


@api_command(None, "migrate")
@click.argument("database")
@click.option("--to", "target", default="head", show_default=True, help="Target revision.")
@click.option(
    "--action",
    type=click.Choice(["upgrade", "downgrade", "stamp"]),
    default="upgrade",
    show_default=True,
)
@click.option("--bundle", help="Bundle id or prefix (default: the project's latest).")
@click.option(
    "--scripts",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Push this Alembic directory first and migrate with it.",
)
@click.option("--project", help="Project of --scripts (default: the database's).")
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit by its outcome.")
@click.option("--timeout", type=click.FloatRange(min=0), help="Seconds to --wait at most.")
@click.option(
    "--no-coalesce", is_flag=True, help="Never attach to an identical job already queued."
)
@click.option("--idempotency-key", help="Reuse a key to make a re-run return the same job.")
@click.option(
    "--plan",
    "dry_run",
    is_flag=True,
    help="Only show what it would run (as `retort plan`); change nothing.",
)
@click.option(
    "--allow",
    "allow",
    metavar="CODE",
    multiple=True,
    help="Accept this lint code although the policy blocks it (audited); repeat it or "
    "separate with commas.",
)
def migrate(
    cli: Cli,
    database: str,
    target: str,
    action: str,
    bundle: str | None,
    scripts: Path | None,
    project: str | None,
    wait: bool,
    timeout: float | None,
    no_coalesce: bool,
    idempotency_key: str | None,
    dry_run: bool,
    allow: tuple[str, ...],
) -> int:
    """Ask for a migration of DATABASE (an upgrade to head unless told otherwise).

    Without --wait, print the job and exit 0 at once; with --wait, follow it
    like `retort wait` and exit by its outcome. A job the lint holds for an
    approval exits 3 at once with its findings (`retort wait JOB` waits on
    through the approval).
    """
    if action == "downgrade" and target == "head":
        raise click.UsageError("a downgrade needs --to (a revision, base or -N)")
    if dry_run:
        if scripts or allow:
            raise click.UsageError("--plan goes without --scripts and --allow")
        return request_plan(cli, database, action, target, "auto", bundle, timeout)
    if scripts and bundle:
        raise click.UsageError("give --bundle or --scripts, not both")
    if project and not scripts:
        raise click.UsageError("--project goes with --scripts")
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)  # before anything is pushed
    if scripts:
        if not project:
            # Only the project name is needed: skip the live read of the target.
            path = f"/v1/databases/{segment(database)}"
            project = cli.api.get(path, live="false")["project"]
        bundle = _push(cli, project, scripts)["id"]
    body: dict[str, Any] = {"database": database, "action": action, "target": target}
    if bundle:
        body["bundle"] = bundle
    if no_coalesce:
        body["coalesce"] = False
    codes = sorted({c.strip() for a in allow for c in a.split(",") if c.strip()})
    if codes:
        body["allow"] = codes
    # One key for this request and every retry of it: a retried POST never makes
    # a second job.
    job, replayed = cli.api.create_job(body, idempotency_key or str(uuid.uuid4()))
    job_id = job.get("coalesced_into") or job["id"]
    if replayed:
        cli.echo(f"job {job_id} was already requested with this idempotency key")
    elif job.get("coalesced_into"):
        cli.echo(f"attached to job {job_id}, already queued for the same migration")
    if wait:
        return _wait(cli, job_id, timeout, stop_for_approval=True)
    if cli.as_json:
        cli.document(job)
    else:
        cli.echo(
            f"job {job_id} {job['state']}: {job['action']} {job['database']} to "
            f"{job['target']} (bundle {job['bundle'][:12]})"
        )
        if job["state"] not in FINAL_STATES:
            cli.echo(f"follow it with: retort wait {job_id}")
    return job_exit_code(job)


@api_command(None, "wait")
@click.argument("job_id", metavar="JOB", type=int)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    help="Seconds to wait at most (default: forever).",
)
def wait_cmd(cli: Cli, job_id: int, timeout: float | None) -> int:
    """Follow JOB until it ends: print its steps as they are applied; exit by its outcome."""
    return _wait(cli, job_id, timeout)


@api_command(None, "status")
@click.argument("job_id", metavar="JOB", type=int)
def status(cli: Cli, job_id: int) -> int:
    """Show JOB: state, steps and error. A job still going exits 0."""
    job = cli.api.get(f"/v1/jobs/{job_id}")
    if cli.as_json:
        cli.document(job)
    else:
        _show_job(job)
    return job_exit_code(job)


@api_command(None, "jobs")
@click.option("--database", help="Only this database's jobs.")
# Not a click.Choice: the server knows its states (and validates them), this
# client may be older.
@click.option("--state", help="Only jobs in this state (queued, running, failed, ...).")
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
def jobs(cli: Cli, database: str | None, state: str | None, limit: int) -> int:
    """List jobs, newest first."""
    page = cli.api.get("/v1/jobs", database=database, state=state, limit=limit)
    if cli.as_json:
        cli.document(page)
        return EXIT_OK
    rows = [
        [
            str(j["id"]),
            j["state"],
            j["database"],
            j["action"],
            j["target"],
            format_time(j["created_at"]),
            j.get("requested_by") or "",
        ]
        for j in page["jobs"]
    ]
    print_table(["JOB", "STATE", "DATABASE", "ACTION", "TARGET", "CREATED", "BY"], rows, "no jobs")
    if page.get("next_cursor"):
        cli.echo(f"(more: raise --limit above {limit})")
    return EXIT_OK


@api_command(None, "history")
@click.argument("database")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
def history(cli: Cli, database: str, limit: int) -> int:
    """Show the revisions applied to DATABASE, newest first."""
    page = cli.api.get(f"/v1/databases/{segment(database)}/history", limit=limit)
    if cli.as_json:
        cli.document(page)
        return EXIT_OK
    rows = [
        [
            format_time(h.get("applied_at")),
            h.get("requested_by") or "",
            _direction(h),
            ", ".join(h.get("revisions") or []),
            shorten(h.get("message") or "", 40),
            _ms(h.get("duration_ms")),
            str(h.get("job", "")),
        ]
        for h in page["history"]
    ]
    headers = ["WHEN", "WHO", "DIRECTION", "REVISIONS", "MESSAGE", "DURATION", "JOB"]
    print_table(headers, rows, "nothing applied yet")
    return EXIT_OK


@api_command(None, "current")
@click.argument("database")
def current(cli: Cli, database: str) -> int:
    """Show DATABASE's current revisions (read live), the bundle's heads and what is pending."""
    db = cli.api.get(f"/v1/databases/{segment(database)}")
    if cli.as_json:
        cli.document(db)
        return EXIT_OK
    click.echo(f"database  {db['name']} ({db['dialect']}, project {db['project']})")
    if db.get("current") is None:
        click.echo(f"current   unknown: {db.get('current_error') or 'not read'}")
    else:
        click.echo(f"current   {format_revs(db['current'])}")
    click.echo(f"head      {format_revs(db.get('head') or [])}")
    pending = db.get("pending")
    if pending is None:
        click.echo("pending   unknown")
    elif pending:
        click.echo(f"pending   {', '.join(pending)}")
    else:
        click.echo("pending   none: up to date")
    if db.get("unknown_current"):
        click.echo(f"warning   not in the bundle: {', '.join(db['unknown_current'])}")
    holder = (db.get("lock") or {}).get("held_by_job")
    if holder:
        click.echo(f"lock      held by job {holder}")
    return EXIT_OK


@click.group()
def token() -> None:
    """API tokens: a role (admin, deployer, viewer) over some projects. Needs an admin token."""


@api_command(token, "create")
@click.argument("name")
@click.option(
    "--role", type=click.Choice(["viewer", "deployer", "admin"]), required=True, help="Role."
)
@click.option("--project", "projects", multiple=True, help="A project it may see (repeat).")
@click.option("--all-projects", is_flag=True, help="Every project, now and later.")
@click.option("--expires-at", help="ISO 8601 time after which the token stops working.")
def token_create(
    cli: Cli,
    name: str,
    role: str,
    projects: tuple[str, ...],
    all_projects: bool,
    expires_at: str | None,
) -> int:
    """Make a token NAME; print it once (it cannot be shown again)."""
    if bool(projects) == all_projects:
        raise click.UsageError("give --project (one or more) or --all-projects")
    body: dict[str, Any] = {
        "name": name,
        "role": role,
        "projects": "*" if all_projects else list(projects),
    }
    if expires_at:
        body["expires_at"] = expires_at
    made = cli.api.request("POST", "/v1/tokens", json_body=body).body
    if cli.as_json:
        cli.document(made)
    else:
        click.echo(made["token"])
        click.echo(
            f"token {made['id']} {made['name']}: {made['role']} on {_projects(made)}; "
            "store it now, it is not shown again",
            err=True,
        )
    return EXIT_OK


@api_command(token, "list")
def token_list(cli: Cli) -> int:
    """List tokens (never their secrets)."""
    page = cli.api.get("/v1/tokens")
    if cli.as_json:
        cli.document(page)
        return EXIT_OK
    rows = [
        [
            str(t["id"]),
            t["name"],
            t["role"],
            _projects(t),
            format_time(t["created_at"]),
            format_time(t["expires_at"]) if t["expires_at"] else "",
            "revoked" if t["revoked_at"] else "active",
        ]
        for t in page["tokens"]
    ]
    headers = ["ID", "NAME", "ROLE", "PROJECTS", "CREATED", "EXPIRES", "STATE"]
    print_table(headers, rows, "no tokens")
    return EXIT_OK


@api_command(token, "revoke")
@click.argument("token_id", metavar="ID", type=int)
def token_revoke(cli: Cli, token_id: int) -> int:
    """Revoke token ID: its next request is refused."""
    cli.api.request("DELETE", f"/v1/tokens/{token_id}")
    cli.echo(f"token {token_id} revoked")
    if cli.as_json:
        cli.document({"id": token_id, "revoked": True})
    return EXIT_OK


def register(main: click.Group) -> None:
    """Add the pipeline commands to the `retort` group."""
    for command in (push, migrate, wait_cmd, status, jobs, history, current, token):
        main.add_command(command)


def _projects(made: dict[str, Any]) -> str:
    projects = made["projects"]
    return "every project" if projects == "*" else ", ".join(projects)


# ---------------------------------------------------------------- pieces


def _push(
    cli: Cli,
    project: str,
    directory: Path,
    versions: str | None = None,
    python_path: tuple[str, ...] = (),
    requirements: Path | None = None,
) -> dict[str, Any]:
    """Pack and upload DIRECTORY; return the bundle with `created` added.

    Prints the bundle's notices (env.py is not run, settings env.py or alembic.ini set
    that the project's differ from) on stderr; in the shape of a checkout (--versions)
    env.py and alembic.ini are scanned here and not uploaded.
    """
    folders = [p.strip() for given in python_path for p in given.split(",") if p.strip()]
    if folders and versions is None:
        raise click.UsageError("--python-path goes with --versions (the checkout's shape)")
    if requirements is not None and versions is None:
        raise click.UsageError("--requirements goes with --versions")
    local: list[dict[str, Any]] = []
    if versions is None:
        bundle, created = cli.api.push(project, pack_scripts(directory))
    else:
        checkout = pack_checkout(directory, versions, folders, requirements)
        bundle, created = cli.api.push(
            project, checkout.tar_gz, checkout.versions_path, checkout.python_path
        )
        if checkout.scanned:
            settings = cli.api.get(f"/v1/projects/{segment(project)}").get("settings") or {}
            local = scan_notices(
                checkout.scanned,
                checkout.versions_path,
                settings,
                checkout.python_path,
                env_py_fate="not uploaded: `retort push --versions` leaves it out",
            )
    heads = ", ".join(bundle.get("heads") or []) or "none"
    cli.echo(
        f"bundle {bundle['id'][:12]} ({'new' if created else 'unchanged'}), "
        f"{len(bundle.get('revisions') or [])} revisions, heads: {heads}"
    )
    notices = local + [n for n in bundle.get("notices") or [] if n not in local]
    for item in notices:
        label = "warning" if item.get("level") == "warning" else "notice"
        click.echo(f"{label}: {item.get('message')}", err=True)
    return {**bundle, "notices": notices, "created": created}


def _wait(cli: Cli, job_id: int, timeout: float | None, stop_for_approval: bool = False) -> int:
    """Follow a job to its end; print its progress; return the exit code.

    `stop_for_approval`: a job the lint parks ends the wait at once (exit 3,
    with its findings), as a pipeline's deploy step needs.
    """
    printer = JobPrinter(job_id, live=sys.stdout.isatty() and not cli.as_json, quiet=cli.as_json)
    job: dict[str, Any] | None = None
    try:
        for job in cli.api.watch_job(job_id, timeout, notify=printer.notice):
            printer.update(job)
            if stop_for_approval and job["state"] == "waiting_for_approval":
                printer.stop()
                if cli.as_json:
                    cli.document(job)
                else:
                    show_findings(job)
                return EXIT_REFUSED
    except WaitTimeout as exc:
        printer.stop()
        job = exc.job or job
        state = job["state"] if job else "unknown"
        lost = f"; Retort unreachable at the end: {exc.lost}" if exc.lost else ""
        message = (
            f"timed out after {exc.timeout:g} s waiting for job {job_id} (still {state}{lost}); "
            f"the job goes on — `retort wait {job_id}` to keep waiting"
        )
        if cli.as_json:
            # Stdout holds one document: the job as last seen, else the reason.
            details = {"job": job_id}
            cli.document(
                job or {"error": {"code": "timeout", "message": message, "details": details}}
            )
        click.echo(message, err=True)
        # A job held for approval is a refusal for the pipeline, whatever the clock says.
        return EXIT_REFUSED if state == "waiting_for_approval" else EXIT_TIMEOUT
    finally:
        printer.stop()
    assert job is not None  # watch_job yields at least once or raises
    if cli.as_json:
        cli.document(job)
    else:
        printer.outcome(job)
    return job_exit_code(job)


class JobPrinter:
    """Print a job's new state and steps once each; on a terminal, a live status line."""

    SPINNER = "|/-\\"

    def __init__(self, job_id: int, live: bool, quiet: bool = False):
        self.job_id = job_id
        self.live = live
        self.quiet = quiet
        self.state: str | None = None
        self.steps = 0
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        if live:
            self.thread = threading.Thread(target=self._spin, daemon=True)
            self.thread.start()

    def update(self, job: dict[str, Any]) -> None:
        """Print what changed since the last update."""
        if self.quiet:
            return
        steps = job.get("steps") or []
        new_steps = [_step_line(s) for s in steps[self.steps :]]
        self.steps = max(self.steps, len(steps))
        lines = []
        # The outcome line reports a final state; any other is printed before the
        # steps it led to.
        if job["state"] != self.state and job["state"] not in FINAL_STATES:
            arrow = f"{self.state} → " if self.state else ""
            extra = ""
            holder = (job.get("lock") or {}).get("held_by_job")
            if job["state"] == "waiting_for_lock" and holder:
                extra = f" (held by job {holder})"
            elif job["state"] == "waiting_for_approval":
                extra = " (someone must approve it)"
            lines.append(f"job {job['id']}: {arrow}{job['state']}{extra}")
        self.state = job["state"]
        self._print(lines + new_steps)

    def outcome(self, job: dict[str, Any]) -> None:
        """Print how the job ended."""
        if job["state"] == "succeeded":
            heads = format_revs(job.get("to_heads") or [])
            if _nothing_done(job):
                click.echo(
                    f"job {job['id']} succeeded, nothing to do: "
                    f"{job['database']} is already at {heads}"
                )
                return
            took = job_duration_s(job)
            secs = f" ({took:.1f} s)" if took is not None else ""
            click.echo(f"job {job['id']} succeeded: {job['database']} is at {heads}{secs}")
        else:
            click.echo(f"job {job['id']} {job['state']}")
            _show_error(job.get("error"))

    def notice(self, text: str) -> None:
        """Print a line about the wait itself (a lost connection) on stderr, in every mode."""
        with self.lock:
            if self.live:
                sys.stdout.write("\r\x1b[K")
                sys.stdout.flush()
            click.echo(text, err=True)

    def stop(self) -> None:
        """End the live line, leaving the terminal clean."""
        if self.thread and not self.done.is_set():
            self.done.set()
            self.thread.join()
            with self.lock:
                sys.stdout.write("\r\x1b[K")
                sys.stdout.flush()

    def _print(self, lines: list[str]) -> None:
        if not lines:
            return
        with self.lock:
            if self.live:
                sys.stdout.write("\r\x1b[K")  # clear the status line before a new line
            for line in lines:
                click.echo(line)

    def _spin(self) -> None:
        for frame in itertools.cycle(self.SPINNER):
            if self.done.wait(0.1):
                return
            elapsed = time.monotonic() - self.started
            with self.lock:
                sys.stdout.write(
                    f"\r\x1b[K{frame} job {self.job_id} {self.state or '…'} {elapsed:.0f} s"
                )
                sys.stdout.flush()


def _nothing_done(job: dict[str, Any]) -> bool:
    """A migration that succeeded without a step: the database was at its target."""
    migration = job.get("kind", "migrate") == "migrate"
    return migration and job["state"] == "succeeded" and not job.get("steps")


def job_duration_s(job: dict[str, Any]) -> float | None:
    """How long the job itself ran (finished_at - started_at), not how long anyone waited."""
    try:
        started = dt.datetime.fromisoformat(job["started_at"])
        finished = dt.datetime.fromisoformat(job["finished_at"])
    except (KeyError, TypeError, ValueError):  # never started (cancelled while queued)
        return None
    return max(0.0, (finished - started).total_seconds())


def _show_job(job: dict[str, Any]) -> None:
    click.echo(
        f"job {job['id']}  {job['state']}  {job['action']} {job['database']} to {job['target']}"
    )
    click.echo(f"  bundle       {job['bundle'][:12]} (project {job['project']})")
    click.echo(f"  requested    {format_time(job.get('created_at'))} by {job.get('requested_by')}")
    if job.get("from_heads") is not None:
        click.echo(f"  from         {format_revs(job['from_heads'])}")
    if job.get("to_heads") is not None:
        click.echo(f"  to           {format_revs(job['to_heads'])}")
    holder = (job.get("lock") or {}).get("held_by_job")
    if job["state"] == "waiting_for_lock" and holder:
        click.echo(f"  waiting for  job {holder}, which holds the lock")
    steps = job.get("steps") or []
    if steps:
        click.echo("  steps:")
        for step in steps:
            click.echo("  " + _step_line(step))
    elif _nothing_done(job):
        heads = format_revs(job.get("to_heads") or [])
        click.echo(f"  nothing to do: {job['database']} is already at {heads}")
    _show_error(job.get("error"))


def _show_error(error: dict[str, Any] | None) -> None:
    if not error:
        return
    click.echo(f"  error: {error.get('code')}: {error.get('message')}")
    for key in ("revision", "statement", "database_message"):
        if error.get(key):
            click.echo(f"    {key.replace('_', ' ')}: {shorten(str(error[key]), 500)}")


def _step_line(step: dict[str, Any]) -> str:
    verbs = {"up": "applied", "down": "reverted", "stamp": "stamped"}
    verb = verbs.get(step.get("direction"), "applied") if step["state"] == "applied" else "failed"
    message = f" {step['message']}" if step.get("message") else ""
    return f"  {verb} {format_revs(step['revisions'])}{message} ({_ms(step.get('duration_ms'))})"


def _direction(entry: dict[str, Any]) -> str:
    direction = entry.get("direction") or entry.get("action") or ""
    return direction if entry.get("state", "applied") == "applied" else f"{direction} (failed)"


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"
