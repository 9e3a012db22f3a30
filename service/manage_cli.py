"""`retort project|database|bundle ...`, `retort cancel|unlock|repair`: the rest of the API.

The pipeline commands (service/client_cli.py) deploy; these set up and look
after what they deploy to: projects and their settings, target databases and
their tags, bundles and which one is the latest, a job to cancel, a lease to
free, a version table to repair. Each is one request (or a read, then the
change), with the shared --url/--token/--json and exit codes.

KEY=VALUE arguments are checked by click before anything is sent: a bad form
is a usage error (exit 2) whatever Retort would have answered.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from service.cli_base import Cli, api_command, format_revs, format_time, print_table, shorten
from service.client import EXIT_OK, EXIT_USAGE, segment

# ---------------------------------------------------------------- KEY=VALUE forms


def _split(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"{text!r} is not {what}")
    return key.strip(), value


def json_value(text: str) -> Any:
    """A value as JSON (5000, true, ["a"], {"k": "v"}), else the text itself as a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _settings(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    """KEY=JSON pairs as a dict (a repeated key is an error, not a silent overwrite)."""
    out: dict[str, Any] = {}
    for text in values:
        key, value = _split(text, "KEY=VALUE (a setting, then its value as JSON or text)")
        if key in out:
            raise click.BadParameter(f"{key} is given twice")
        out[key] = json_value(value)
    return out


def tag_pairs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    """K=V pairs as a dict of strings."""
    out: dict[str, str] = {}
    for text in values:
        key, value = _split(text, "K=V (a tag and its value)")
        if key in out:
            raise click.BadParameter(f"tag {key} is given twice")
        out[key] = value
    return out


def _keys(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """Bare names (a setting to reset, a tag to remove): no `=`."""
    for key in values:
        if not key.strip() or "=" in key:
            raise click.BadParameter(f"{key!r} is not a name (no `=` here)")
    return tuple(k.strip() for k in values)


def _tag_filter(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.partition("=")[0].strip():
        raise click.BadParameter(f"{value!r} is not K or K=V")
    return value


def _settings_file(ctx: click.Context, param: click.Parameter, file: Any) -> dict:
    if file is None:
        return {}
    try:
        doc = json.load(file)
    except ValueError as exc:
        raise click.BadParameter(f"{file.name}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise click.BadParameter(f"{file.name}: not a JSON object of settings")
    return doc


def _show_value(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _show_tags(tags: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))


# ---------------------------------------------------------------- projects


@click.group()
def project() -> None:
    """Projects: one lineage of revision scripts and the settings env.py would carry."""


@api_command(project, "create")
@click.argument("name")
@click.option(
    "--setting",
    "settings",
    metavar="KEY=JSON",
    multiple=True,
    callback=_settings,
    help="A setting (repeat): lock_timeout_ms=5000, version_table=app_version, "
    'env=\'{"TZ": "UTC"}\'. The value is JSON, else a plain string.',
)
@click.option(
    "--settings-file",
    "settings_file",
    type=click.File("r"),
    callback=_settings_file,
    help="A JSON object of settings (- for standard input); --setting overrides it.",
)
def project_create(
    cli: Cli, name: str, settings: dict[str, Any], settings_file: dict[str, Any]
) -> int:
    """Create project NAME (an admin of every project may)."""
    body = {"name": name, "settings": {**settings_file, **settings}}
    made = cli.api.request("POST", "/v1/projects", json_body=body).body
    if cli.as_json:
        cli.document(made)
    else:
        changed = ", ".join(sorted(body["settings"])) or "all defaults"
        cli.echo(f"project {made['name']} created (settings: {changed})")
    return EXIT_OK


@api_command(project, "list")
def project_list(cli: Cli) -> int:
    """List the projects this token may see."""
    page = cli.api.get("/v1/projects")
    if cli.as_json:
        cli.document(page)
        return EXIT_OK
    rows = [
        [p["name"], format_time(p.get("created_at")), ", ".join(p.get("secret_env_names") or [])]
        for p in page["projects"]
    ]
    print_table(["NAME", "CREATED", "SECRET VARIABLES"], rows, "no projects")
    return EXIT_OK


@api_command(project, "show")
@click.argument("name")
def project_show(cli: Cli, name: str) -> int:
    """Show project NAME: every setting (as JSON) and its secret variables' names."""
    doc = cli.api.get(f"/v1/projects/{segment(name)}")
    return cli.emit(doc, _show_project)


def _show_project(doc: dict[str, Any]) -> None:
    click.echo(f"project   {doc['name']} (created {format_time(doc.get('created_at'))})")
    settings = doc.get("settings") or {}
    width = max((len(k) for k in settings), default=0)
    click.echo("settings:")
    for key in sorted(settings):
        click.echo(f"  {key.ljust(width)}  {_show_value(settings[key])}")
    secrets = doc.get("secret_env_names") or []
    click.echo(f"secret variables: {', '.join(secrets) if secrets else 'none'}")


@api_command(project, "set")
@click.argument("name")
@click.argument("settings", metavar="KEY=JSON...", nargs=-1, callback=_settings)
@click.option(
    "--reset",
    "reset",
    metavar="KEY",
    multiple=True,
    callback=_keys,
    help="Restore this setting's default (repeat).",
)
def project_set(cli: Cli, name: str, settings: dict[str, Any], reset: tuple[str, ...]) -> int:
    """Change project NAME's settings: each KEY=JSON replaces that setting whole.

    The value is JSON (5000, true, '["alembic>=1.13"]', '{"TZ": "UTC"}'), else a
    plain string. Settings not named stay; jobs still queued run with the new ones.
    """
    if not settings and not reset:
        raise click.UsageError("give a KEY=JSON to set or a --reset KEY")
    both = sorted(set(settings) & set(reset))
    if both:
        raise click.UsageError(f"{', '.join(both)}: set and reset at once")
    patch = {**settings, **dict.fromkeys(reset)}
    path = f"/v1/projects/{segment(name)}"
    doc = cli.api.request("PATCH", path, json_body={"settings": patch}).body
    if cli.as_json:
        cli.document(doc)
        return EXIT_OK
    cli.echo(f"project {doc['name']} updated:")
    now = doc.get("settings") or {}
    for key in sorted(patch):
        default = " (its default)" if key in reset else ""
        cli.echo(f"  {key} = {_show_value(now.get(key))}{default}")
    return EXIT_OK


# ---------------------------------------------------------------- databases


@click.group()
def database() -> None:
    """Target databases: where a project's revisions are applied (an admin registers them)."""


@api_command(database, "add", url_flag="--retort-url")
@click.argument("name")
@click.option("--project", required=True, help="The project whose revisions it gets.")
@click.option("--url", "target_url", required=True, help="SQLAlchemy URL (stored encrypted).")
@click.option(
    "--tag", "tags", metavar="K=V", multiple=True, callback=tag_pairs, help="A tag (repeat)."
)
def database_add(cli: Cli, name: str, project: str, target_url: str, tags: dict[str, str]) -> int:
    """Register target database NAME of a project (the URL is only ever shown masked)."""
    body = {"name": name, "project": project, "url": target_url, "tags": tags}
    made = cli.api.request("POST", "/v1/databases", json_body=body).body
    if cli.as_json:
        cli.document(made)
    else:
        tagged = f", tags {_show_tags(made['tags'])}" if made.get("tags") else ""
        cli.echo(
            f"database {made['name']} registered: {made['dialect']}, project "
            f"{made['project']}, {made['url']}{tagged}"
        )
    return EXIT_OK


@api_command(database, "list")
@click.option("--project", help="Only this project's databases.")
@click.option("--tag", metavar="K[=V]", callback=_tag_filter, help="Only those with this tag.")
def database_list(cli: Cli, project: str | None, tag: str | None) -> int:
    """List target databases, by name."""
    page = cli.api.get("/v1/databases", project=project, tag=tag)
    if cli.as_json:
        cli.document(page)
        return EXIT_OK
    rows = [
        [d["name"], d["project"], d["dialect"], _show_tags(d.get("tags") or {}), d["url"]]
        for d in page["databases"]
    ]
    print_table(["NAME", "PROJECT", "DIALECT", "TAGS", "URL"], rows, "no databases")
    return EXIT_OK


@api_command(database, "show")
@click.argument("name")
def database_show(cli: Cli, name: str) -> int:
    """Show database NAME: its current revisions (read live), head, pending, lock."""
    doc = cli.api.get(f"/v1/databases/{segment(name)}")
    return cli.emit(doc, _show_database)


def _show_database(db: dict[str, Any]) -> None:
    click.echo(f"database  {db['name']} ({db['dialect']}, project {db['project']})")
    click.echo(f"url       {db['url']}")
    click.echo(f"tags      {_show_tags(db.get('tags') or {}) or 'none'}")
    if db.get("current") is None:
        click.echo(f"current   unknown: {db.get('current_error') or 'not read'}")
    else:
        click.echo(f"current   {format_revs(db['current'])}")
    bundle = f" (bundle {db['bundle'][:12]})" if db.get("bundle") else ""
    click.echo(f"head      {format_revs(db.get('head') or [])}{bundle}")
    pending = db.get("pending")
    if pending is None:
        click.echo("pending   unknown")
    else:
        click.echo(f"pending   {', '.join(pending) if pending else 'none: up to date'}")
    if db.get("unknown_current"):
        click.echo(f"warning   not in the bundle: {', '.join(db['unknown_current'])}")
    holder = (db.get("lock") or {}).get("held_by_job")
    click.echo(f"lock      {f'held by job {holder}' if holder else 'free'}")
    for block in db.get("blocked_by") or []:
        click.echo(f"blocked   {_blocked(block)}")


def _blocked(block: Any) -> str:
    """One thing that stops jobs on the database: its code, then why."""
    if not isinstance(block, dict):
        return str(block)
    return f"{block.get('code')}: {shorten(str(block.get('message') or ''), 300)}"


@api_command(database, "set", url_flag="--retort-url")
@click.argument("name")
@click.option("--url", "target_url", help="A new SQLAlchemy URL (stored encrypted).")
@click.option(
    "--tag", "tags", metavar="K=V", multiple=True, callback=tag_pairs, help="Set a tag (repeat)."
)
@click.option(
    "--untag", "untag", metavar="K", multiple=True, callback=_keys, help="Remove a tag (repeat)."
)
def database_set(
    cli: Cli, name: str, target_url: str | None, tags: dict[str, str], untag: tuple[str, ...]
) -> int:
    """Change database NAME's URL or tags; tags not named stay."""
    if target_url is None and not tags and not untag:
        raise click.UsageError("give --url, --tag K=V or --untag K")
    both = sorted(set(tags) & set(untag))
    if both:
        raise click.UsageError(f"tag {', '.join(both)}: set and removed at once")
    path = f"/v1/databases/{segment(name)}"
    body: dict[str, Any] = {}
    if target_url is not None:
        body["url"] = target_url
    if tags or untag:
        # The API replaces the tags whole: merge into the ones it has now.
        now = cli.api.get(path, live="false").get("tags") or {}
        for key in untag:
            if key not in now:
                click.echo(f"note: {name} has no tag {key}", err=True)
        body["tags"] = {k: v for k, v in {**now, **tags}.items() if k not in untag}
    doc = cli.api.request("PATCH", path, json_body=body).body
    if cli.as_json:
        cli.document(doc)
    else:
        tagged = _show_tags(doc.get("tags") or {}) or "none"
        cli.echo(f"database {doc['name']} updated: {doc['url']}, tags {tagged}")
    return EXIT_OK


@api_command(database, "remove")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask (needed when not on a terminal).")
def database_remove(cli: Cli, name: str, yes: bool) -> int:
    """Remove database NAME from Retort (the database itself is not touched)."""
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError(f"not on a terminal: confirm removing {name} with --yes")
        if not click.confirm(f"Remove database {name} from Retort?", err=True):
            click.echo(f"{name} not removed", err=True)
            return EXIT_USAGE
    reply = cli.api.request("DELETE", f"/v1/databases/{segment(name)}")
    if cli.as_json:
        cli.document(
            reply.body if isinstance(reply.body, dict) else {"name": name, "removed": True}
        )
    else:
        cli.echo(f"database {name} removed")
    return EXIT_OK


# ---------------------------------------------------------------- bundles


@click.group()
def bundle() -> None:
    """Bundles: the uploaded revision scripts of a project (`retort push` makes them)."""


@api_command(bundle, "list")
@click.argument("project_name", metavar="PROJECT")
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
def bundle_list(cli: Cli, project_name: str, limit: int) -> int:
    """List PROJECT's bundles, the last pushed or promoted first; * marks the latest.

    The latest is what a job without --bundle runs.
    """
    page = cli.api.get(f"/v1/projects/{segment(project_name)}/bundles", limit=limit)
    if cli.as_json:
        cli.document(page)
        return EXIT_OK
    rows = [
        [
            b["id"][:12],
            "*" if b.get("latest") else "",
            format_time(b.get("pushed_at") or b.get("created_at")),
            ", ".join(b.get("heads") or []) or "none",
            str(b.get("revision_count", len(b.get("revisions") or []))),
            b.get("created_by") or "",
        ]
        for b in page["bundles"]
    ]
    headers = ["BUNDLE", "LATEST", "PUSHED", "HEADS", "REVISIONS", "BY"]
    print_table(headers, rows, "no bundles")
    if page.get("next_cursor"):
        cli.echo(f"(more: raise --limit above {limit})")
    return EXIT_OK


@api_command(bundle, "show")
@click.argument("project_name", metavar="PROJECT")
@click.argument("ref", metavar="ID")
def bundle_show(cli: Cli, project_name: str, ref: str) -> int:
    """Show bundle ID of PROJECT (an id, a unique prefix or latest) and its revision graph."""
    doc = cli.api.get(f"/v1/projects/{segment(project_name)}/bundles/{segment(ref)}")
    return cli.emit(doc, _show_bundle)


def _show_bundle(doc: dict[str, Any]) -> None:
    latest = ", the latest" if doc.get("latest") else ""
    click.echo(f"bundle    {doc['id']} (project {doc['project']}{latest})")
    click.echo(f"created   {format_time(doc.get('created_at'))} by {doc.get('created_by')}")
    if doc.get("pushed_at") and doc.get("pushed_at") != doc.get("created_at"):
        click.echo(f"pushed    {format_time(doc['pushed_at'])} (last pushed or promoted)")
    click.echo(f"heads     {', '.join(doc.get('heads') or []) or 'none'}")
    click.echo(f"bases     {', '.join(doc.get('bases') or []) or 'none'}")
    python_path = ", ".join(doc.get("python_path") or [])
    click.echo(
        f"versions  {doc.get('versions_path')}"
        + (f" (python path: {python_path})" if python_path else "")
    )
    click.echo(f"files     {doc.get('files')}, {doc.get('size')} bytes")
    revisions = [r for r in doc.get("revisions") or [] if isinstance(r, dict)]
    if not revisions:
        return
    heads = set(doc.get("heads") or [])
    children: dict[str, int] = {}
    for r in revisions:
        for down in r.get("down_revisions") or []:
            children[down] = children.get(down, 0) + 1
    click.echo("\nrevisions, newest first (as `alembic history`):")
    for r in reversed(revisions):  # stored base first
        downs = ", ".join(r.get("down_revisions") or []) or "<base>"
        marks = [f"({label})" for label in r.get("branch_labels") or []]
        if r["id"] in heads:
            marks.append("(head)")
        if children.get(r["id"], 0) > 1:
            marks.append("(branchpoint)")
        if len(r.get("down_revisions") or []) > 1:
            marks.append("(mergepoint)")
        extra = []
        if r.get("depends_on"):
            extra.append(f"depends on {', '.join(r['depends_on'])}")
        if r.get("has_downgrade") is False:
            extra.append("no downgrade")
        tail = f" [{'; '.join(extra)}]" if extra else ""
        mark = " " + " ".join(marks) if marks else ""
        click.echo(f"  {downs} -> {r['id']}{mark}, {shorten(r.get('message') or '', 60)}{tail}")


@api_command(bundle, "promote")
@click.argument("project_name", metavar="PROJECT")
@click.argument("ref", metavar="ID")
def bundle_promote(cli: Cli, project_name: str, ref: str) -> int:
    """Make bundle ID PROJECT's latest: jobs without --bundle use it (a rollback of scripts)."""
    path = f"/v1/projects/{segment(project_name)}/bundles/{segment(ref)}/promote"
    doc = cli.api.request("POST", path, json_body={}).body
    if cli.as_json:
        cli.document(doc)
    else:
        digest = (doc or {}).get("id") or ref
        cli.echo(f"bundle {digest[:12]} is now the latest of {project_name}")
    return EXIT_OK


# ---------------------------------------------------------------- jobs and locks


@api_command(None, "cancel")
@click.argument("job_id", metavar="JOB", type=int)
def cancel_cmd(cli: Cli, job_id: int) -> int:
    """Cancel JOB while it waits (queued, for a lock, for an approval).

    A running job whose worker is gone is failed (abandoned); one whose worker
    is alive is refused (exit 2): it ends on its own.
    """
    job = cli.api.request("POST", f"/v1/jobs/{job_id}/cancel", json_body={}).body
    if cli.as_json:
        cli.document(job)
    else:
        code = (job.get("error") or {}).get("code")
        cli.echo(f"job {job['id']} {job['state']}{f' ({code})' if code else ''}")
    return EXIT_OK


@api_command(None, "unlock")
@click.argument("name", metavar="DATABASE")
def unlock_cmd(cli: Cli, name: str) -> int:
    """Free DATABASE's lease when its holder is gone (an admin), failing the job that held it.

    Refused (exit 2) while the holder renews the lease, or when nothing holds it.
    """
    path = f"/v1/databases/{segment(name)}/unlock"
    doc = cli.api.request("POST", path, json_body={}).body
    if cli.as_json:
        cli.document(doc)
        return EXIT_OK
    released = doc.get("released") or {}
    ago = released.get("expired_s_ago")
    expired = f", expired {ago:g} s ago" if isinstance(ago, int | float) else ""
    cli.echo(
        f"unlocked {doc.get('database', name)}: released the lease of job {released.get('job')} "
        f"(worker {released.get('worker')}{expired}); the job is {doc.get('job_state')}"
    )
    return EXIT_OK


@api_command(None, "repair")
@click.argument("name", metavar="DATABASE")
@click.argument("revision", metavar="REVISION")
def repair_cmd(cli: Cli, name: str, revision: str) -> int:
    """Accept the latest bundle's file for REVISION, applied to DATABASE from another file.

    The way out of `revision_changed` (exit 3) when the edit was harmless (a
    comment, a fixed typo): the recorded sha256 becomes the bundle's (an admin;
    audited). A change that matters needs a new revision instead.
    """
    path = f"/v1/databases/{segment(name)}/repair"
    doc = cli.api.request("POST", path, json_body={"revision": revision}).body
    if cli.as_json:
        cli.document(doc)
    else:
        cli.echo(
            f"repaired {doc['database']}: revision {doc['revision']} now matches bundle "
            f"{doc['bundle'][:12]} (sha256 {doc['old_sha256'][:12]} -> {doc['new_sha256'][:12]})"
        )
    return EXIT_OK


def register(main: click.Group) -> None:
    """Add project, database, bundle, cancel, unlock and repair to the `retort` group."""
    for command in (project, database, bundle, cancel_cmd, unlock_cmd, repair_cmd):
        main.add_command(command)
