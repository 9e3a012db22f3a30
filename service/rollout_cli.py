"""`retort rollout start|status|wait|pause|resume|abort|retry`: one change across a fleet.

The server side is docs/rollouts.md. These commands report through the same exit
codes as the pipeline commands (cli_base.EXIT_CODES_HELP): 0 succeeded or still
going, 1 halted, failed or aborted, 2 a usage or request error (a 409 for a
request that does not fit the rollout's state, too), 3 waiting for an approval
(`status`, and `wait` when it times out there), 4 timed out waiting, 5 Retort
unreachable.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from typing import Any

import click

from service.cli_base import Cli, api_command, format_revs, format_time, print_table, shorten
from service.client import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    WaitTimeout,
    check_idempotency_key,
)
from service.manage_cli import tag_pairs

# Where a rollout ends: `wait` stops at these. `halted` is not final on the server
# (resume, retry-failed), but no new job starts until someone acts.
ENDED = frozenset({"succeeded", "failed", "aborted", "halted"})
BAD = frozenset({"failed", "aborted", "halted"})
# Database states (docs/rollouts.md, "Watching one").
ACTIVE = ("queued", "waiting", "running")
FINISHED = ("succeeded", "failed", "cancelled", "skipped")
# Without a terminal, a progress line at most this often (a state change at once).
PLAIN_EVERY_S = 5.0
# Failed databases named under a halted or failed outcome.
SHOW_FAILED = 10


def rollout_exit_code(rollout: dict[str, Any]) -> int:
    """As job_exit_code for a job: a rollout still going (or paused) is 0."""
    state = rollout.get("state")
    if state in BAD:
        return EXIT_FAILED
    if state == "waiting_for_approval":
        return EXIT_REFUSED
    return EXIT_OK


@click.group()
def rollout() -> None:
    """Rollouts: one bundle's revisions across many databases, in waves (docs/rollouts.md)."""


# ---------------------------------------------------------------- start


def _waves_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        sizes = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r} is not wave sizes such as 10,100")
    return sizes


@api_command(rollout, "start")
@click.option("--project", required=True, help="The project whose databases are migrated.")
@click.option(
    "--tag",
    "tags",
    metavar="K=V",
    multiple=True,
    callback=tag_pairs,
    help="Only databases with this tag (repeat: every tag must match).",
)
@click.option(
    "--database", "names", metavar="NAME", multiple=True, help="Only this database (repeat)."
)
@click.option(
    "--action",
    type=click.Choice(["upgrade", "downgrade", "stamp"]),
    default="upgrade",
    show_default=True,
)
@click.option("--to", "target", help="Target revision (default head; a downgrade needs one).")
@click.option("--bundle", help="Bundle digest (12+ hex characters) or latest (the default).")
@click.option("--canary", type=click.IntRange(min=0), help="Run the first N databases alone.")
@click.option(
    "--canary-db", "canary_dbs", metavar="NAME", multiple=True, help="A canary database (repeat)."
)
@click.option("--wave-size", type=click.IntRange(min=1), help="Databases per wave.")
@click.option(
    "--waves", callback=_waves_list, metavar="N,N,...", help="First waves' sizes; then the last's."
)
@click.option("--max-parallel", type=click.IntRange(min=1), help="Jobs at once (Retort: 10).")
@click.option("--max-parallel-per-server", type=click.IntRange(min=1), help="Jobs per server.")
@click.option(
    "--halt-on-failure-ratio",
    type=click.FloatRange(0, 1, max_open=True),
    help="Halt when a wave's failed/finished passes this.",
)
@click.option("--halt-after-failures", type=click.IntRange(min=1), help="Halt at N failures.")
@click.option(
    "--pause-between-waves", "pause_between_waves_s", type=click.FloatRange(min=0), metavar="S"
)
@click.option("--approve-between-waves", is_flag=True, help="Wait for an approver each wave.")
@click.option("--idempotency-key", help="Reuse a key to make a re-run return the same rollout.")
@click.option("--wait", is_flag=True, help="Then follow it as `retort rollout wait`.")
@click.option("--timeout", type=click.FloatRange(min=0), help="Seconds to --wait at most.")
def start(
    cli: Cli,
    tags: dict[str, str],
    names: tuple[str, ...],
    target: str | None,
    canary: int | None,
    canary_dbs: tuple[str, ...],
    idempotency_key: str | None,
    wait: bool,
    timeout: float | None,
    **fields: Any,
) -> int:
    """Start a rollout over PROJECT's databases (those with every --tag, or named).

    Prints one line: how many databases, in how many waves, to what. With
    --wait, follows it to its end and exits by its outcome. Options not given
    are Retort's defaults (docs/rollouts.md).
    """
    if fields["action"] == "downgrade" and target in (None, "head"):
        raise click.UsageError("a downgrade needs --to (a revision, base or -N)")
    if canary is not None and canary_dbs:
        raise click.UsageError("give --canary N or --canary-db NAME, not both")
    if fields["wave_size"] is not None and fields["waves"] is not None:
        raise click.UsageError("give --wave-size or --waves, not both")
    if timeout is not None and not wait:
        raise click.UsageError("--timeout goes with --wait")
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)
    # Every other option's name is the request's field; one not given is left out.
    body = {k: v for k, v in fields.items() if v is not None and v is not False}
    body["target"] = target or "head"
    selector = {"tags": tags, "names": list(names)}
    if tags or names:
        body["selector"] = {k: v for k, v in selector.items() if v}
    if canary_dbs or canary is not None:
        body["canary"] = list(canary_dbs) if canary_dbs else canary
    made, replayed = cli.api.start_rollout(body, idempotency_key)
    if replayed:
        cli.echo(f"rollout {made['id']} was already started with this idempotency key")
    if wait:
        cli.echo(summary_line(made))
        return _wait(cli, made["id"], timeout)
    return cli.emit(made, lambda doc: click.echo(summary_line(doc)))


def summary_line(doc: dict[str, Any]) -> str:
    """`rollout 17: 1000 databases in 11 waves (canary 5, then 100 each) to head`."""
    sizes = [w["size"] for w in doc["waves"]]
    total, count = doc["total"], len(sizes)
    line = f"rollout {doc['id']}: {total} database{'s' * (total != 1)} in {count} wave"
    line += "s" * (count != 1)
    shape = _shape(sizes, _has_canary(doc))
    if shape:
        line += f" ({shape})"
    verb = "to" if doc["action"] == "upgrade" else f"{doc['action']} to"
    return f"{line} {verb} {doc['target']}"


def _shape(sizes: list[int], canary: bool) -> str:
    """`canary 5, then 10, then 100 each`: the waves' sizes, runs folded."""
    parts = []
    if canary and sizes:
        parts.append(f"canary {sizes[0]}")
        sizes = sizes[1:]
    runs: list[list[int]] = []
    for i, size in enumerate(sizes):
        remainder = i == len(sizes) - 1 and runs and size < runs[-1][0]
        if runs and (runs[-1][0] == size or remainder):
            runs[-1][1] += 1  # the same size again, or the last wave's remainder of it
        else:
            runs.append([size, 1])
    if not parts and len(runs) == 1 and runs[0][1] == 1:
        return ""  # one wave: nothing to say
    parts += [f"{size} each" if times > 1 else str(size) for size, times in runs[:4]]
    return ", then ".join(parts + ["…"] * (len(runs) > 4))


# ---------------------------------------------------------------- status


@api_command(rollout, "status")
@click.argument("rollout_id", metavar="ID", type=int)
@click.option("--not-at-target", is_flag=True, help="List the databases not at the target.")
@click.option("--state", help="List the databases in this state (failed, running, ...).")
@click.option("--wave", type=click.IntRange(min=0), help="List only this wave's databases.")
def status(
    cli: Cli, rollout_id: int, not_at_target: bool, state: str | None, wave: int | None
) -> int:
    """Show rollout ID: state, counts, waves; with a filter, its databases.

    Exits 0 while it goes on (paused too) or once it succeeded; 1 halted,
    failed or aborted; 3 waiting for an approval. --json prints the rollout,
    or with a filter {"rollout": ..., "databases": [...]}.
    """
    if not_at_target and state:
        raise click.UsageError("give --not-at-target or --state, not both")
    doc = cli.api.rollout(rollout_id)
    listed = "not_at_target" if not_at_target else state
    databases = None
    if listed or wave is not None:
        databases, cursor = [], None
        while True:  # every page
            page = cli.api.rollout_databases(rollout_id, state=listed, wave=wave, cursor=cursor)
            databases += page["databases"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
    if cli.as_json:
        cli.document(doc if databases is None else {"rollout": doc, "databases": databases})
        return rollout_exit_code(doc)
    _show(doc)
    if databases is not None:
        click.echo()
        rows = [
            [
                d["database"],
                str(d["wave"]),
                d["state"],
                str(d["job"] or ""),
                "" if d["heads"] is None else format_revs(d["heads"]),
                d["error"] or "",
            ]
            for d in databases
        ]
        print_table(["DATABASE", "WAVE", "STATE", "JOB", "HEADS", "ERROR"], rows, "no databases")
    return rollout_exit_code(doc)


def _show(doc: dict[str, Any]) -> None:
    click.echo(f"rollout {doc['id']}  {doc['state']}  {doc['action']} to {doc['target']}")
    click.echo(f"  project      {doc['project']}, bundle {doc['bundle'][:12]}")
    click.echo(f"  requested    {format_time(doc['created_at'])} by {doc['requested_by']}")
    click.echo(f"  databases    {doc['total']}: {_counts_text(doc['counts'])}")
    click.echo(f"  at target    {doc['at_target']} of {doc['total']}")
    if doc["state"] not in ENDED:
        click.echo(f"  now          {_state_line(doc)}")
    if _reason(doc):
        click.echo(f"  {doc['state']:<12} {_reason(doc)}")
    click.echo("  waves:")
    rows = [
        [w["name"], str(w["size"]), w["state"], _counts_text(w["counts"])] for w in doc["waves"]
    ]
    widths = [max(len(r[i]) for r in [["WAVE", "SIZE", "STATE"], *rows]) for i in range(3)]
    for row in [["WAVE", "SIZE", "STATE", "DATABASES"], *rows]:
        cells = [c.ljust(w) for c, w in zip(row, widths)] + row[3:]
        click.echo("    " + "  ".join(cells))


# ---------------------------------------------------------------- wait


@api_command(rollout, "wait")
@click.argument("rollout_id", metavar="ID", type=int)
@click.option(
    "--timeout", type=click.FloatRange(min=0), help="Seconds to wait at most (default: forever)."
)
def wait_cmd(cli: Cli, rollout_id: int, timeout: float | None) -> int:
    """Follow rollout ID until it succeeds, fails, halts or is aborted; exit by that.

    A paused rollout, or one waiting for an approval, is waited through (until
    --timeout), saying what it waits for. A timeout exits 4 (3 while it
    waits for an approval).
    """
    return _wait(cli, rollout_id, timeout)


def _wait(cli: Cli, rollout_id: int, timeout: float | None) -> int:
    printer = Progress(cli, live=sys.stdout.isatty() and not cli.as_json)
    doc: dict[str, Any] | None = None
    try:
        for doc in cli.api.poll_rollout(rollout_id, timeout, notify=printer.notice):
            printer.update(doc)
            if doc["state"] in ENDED:
                break
    except WaitTimeout as exc:
        printer.stop()
        doc = exc.job or doc
        state = doc["state"] if doc else "unknown"
        lost = f"; Retort unreachable at the end: {exc.lost}" if exc.lost else ""
        message = (
            f"timed out after {exc.timeout:g} s waiting for rollout {rollout_id} (still "
            f"{state}{lost}); the rollout goes on — `retort rollout wait {rollout_id}` "
            "to keep waiting"
        )
        if cli.as_json:
            details = {"rollout": rollout_id}
            cli.document(
                doc or {"error": {"code": "timeout", "message": message, "details": details}}
            )
        click.echo(message, err=True)
        # Held for an approval: a refusal for the pipeline, whatever the clock says.
        return EXIT_REFUSED if state == "waiting_for_approval" else EXIT_TIMEOUT
    finally:
        printer.stop()
    assert doc is not None  # poll_rollout yields until told to stop, or raises
    if cli.as_json:
        cli.document(doc)
        return rollout_exit_code(doc)
    click.echo(outcome_line(doc))
    if doc["state"] in ("halted", "failed"):
        page = cli.api.rollout_databases(rollout_id, state="failed", limit=SHOW_FAILED)
        for d in page["databases"]:
            click.echo(f"  failed  {d['database']} (job {d['job']}): {d['error'] or 'failed'}")
        if page.get("next_cursor"):
            click.echo(f"  … and more: retort rollout status {rollout_id} --state failed")
        go_on = f"; or go on: retort rollout resume {rollout_id}" * (doc["state"] == "halted")
        click.echo(f"  rerun the failed: retort rollout retry {rollout_id}{go_on}")
    return rollout_exit_code(doc)


def outcome_line(doc: dict[str, Any]) -> str:
    """The last line of a wait: how it ended, and why when it did not succeed."""
    head = f"rollout {doc['id']} {doc['state']}"
    if doc["state"] == "succeeded":
        try:
            took = dt.datetime.fromisoformat(doc["finished_at"]) - dt.datetime.fromisoformat(
                doc["created_at"]
            )
        except (TypeError, ValueError):
            return f"{head}: {doc['total']} databases at {doc['target']}"
        return (
            f"{head}: {doc['total']} databases at {doc['target']} (in {took.total_seconds():.1f} s)"
        )
    why = f": {_reason(doc)}" if _reason(doc) else ""
    active = sum(doc["counts"].get(s, 0) for s in ACTIVE)
    still = f"; {active} running still finish" if active else ""
    return f"{head}{why} ({_counts_text(doc['counts'])}{still})"


class Progress:
    """A rollout's progress: on a terminal one line redrawn in place (as JobPrinter's
    status line), else a line per change at most every PLAIN_EVERY_S; a new state or
    wave is said at once, on its own line."""

    def __init__(self, cli: Cli, live: bool):
        self.cli = cli
        self.live = live
        self.drawn = False  # a live line is on the screen
        self.said: tuple[str, int] | None = None  # the (state, wave) last said
        self.printed = ""  # the last progress line printed (plain mode)
        self.printed_at = 0.0

    def update(self, doc: dict[str, Any]) -> None:
        if self.cli.as_json:
            return
        key = (doc["state"], doc["wave"])
        if key != self.said:
            self.said = key
            if doc["state"] in ENDED:
                return  # the outcome line says it
            sep = ": " if doc["state"] == "running" else " "
            self._line(f"rollout {doc['id']}{sep}{_state_line(doc)}")
            self.printed_at = 0.0  # the progress under it at once
        if doc["state"] in ENDED:
            return
        line = progress_line(doc)
        if self.live:
            sys.stdout.write(f"\r\x1b[K{line}")
            sys.stdout.flush()
            self.drawn = True
        elif line != self.printed and time.monotonic() - self.printed_at >= PLAIN_EVERY_S:
            click.echo(line)
            self.printed, self.printed_at = line, time.monotonic()

    def _line(self, text: str, err: bool = False) -> None:
        self.stop()
        click.echo(text, err=err)

    def notice(self, text: str) -> None:
        """A line about the wait itself (a lost connection), on stderr in every mode."""
        self._line(text, err=True)

    def stop(self) -> None:
        """Clear the live line, leaving the terminal clean."""
        if self.drawn:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
            self.drawn = False


def progress_line(doc: dict[str, Any]) -> str:
    """`wave 3/10  412/1000 done  2 failed  8 running`."""
    counts = doc["counts"]
    done = sum(counts.get(s, 0) for s in FINISHED)
    active = sum(counts.get(s, 0) for s in ACTIVE)
    line = f"{_wave_label(doc, count=True)}  {done}/{doc['total']} done"
    line += f"  {counts.get('failed', 0)} failed  {active} running"
    if doc["state"] == "running" and doc.get("resume_at"):
        line += f"  (next wave at {format_time(doc['resume_at'])[11:]} UTC)"
    return line if doc["state"] == "running" else f"{line}  ({doc['state']})"


def _state_line(doc: dict[str, Any]) -> str:
    """What the rollout's state means for whoever waits on it."""
    state, rid = doc["state"], doc["id"]
    if state == "running":
        return f"{_wave_label(doc)} running ({len(doc['waves'])} waves in all)"
    if state == "paused":
        return f"paused: no new jobs; waiting for `retort rollout resume {rid}`"
    if state == "waiting_for_approval":
        return (
            f"waiting for approval of {_wave_label(doc)}: an admin token, or one named in "
            f"project {doc['project']}'s settings.lint.approvers, runs "
            f"`retort rollout resume {rid}`"
        )
    return state


# ---------------------------------------------------------------- pause, resume, abort, retry


def _action_command(name: str, action: str, help_text: str, after: str) -> click.Command:
    @api_command(rollout, name)
    @click.argument("rollout_id", metavar="ID", type=int)
    def command(cli: Cli, rollout_id: int) -> int:
        doc = cli.api.rollout_action(rollout_id, action)
        return cli.emit(doc, lambda d: click.echo(f"rollout {d['id']} {d['state']}{after}"))

    command.help = help_text + "\n\nA request that does not fit the state is refused (exit 2)."
    return command


pause = _action_command(
    "pause", "pause", "Pause rollout ID: no new jobs; running ones finish.", ": no new jobs"
)
resume = _action_command(
    "resume",
    "resume",
    "Go on with rollout ID after a pause, a halt or an approval wait (an approver's).",
    "",
)
abort = _action_command(
    "abort",
    "abort",
    "Abort rollout ID (final): jobs not yet running are cancelled, running ones finish.",
    ": no new jobs, jobs not yet running cancelled",
)
retry = _action_command(
    "retry",
    "retry-failed",
    "Give each failed database of rollout ID a new job and go on (from halted or failed).",
    "",
)


def register(main: click.Group) -> None:
    """Add `rollout` to the `retort` group."""
    main.add_command(rollout)


# ---------------------------------------------------------------- reading the document


def _has_canary(doc: dict[str, Any]) -> bool:
    return bool(doc["options"].get("canary_size"))


def _wave_label(doc: dict[str, Any], count: bool = False) -> str:
    """The current wave as Retort names it (`canary`, `wave 2`), with `/10` when asked."""
    waves = doc["waves"]
    if not waves:
        return ""
    name = waves[min(doc["wave"], len(waves) - 1)]["name"]
    if not count or name == "canary":
        return name
    return f"{name}/{len(waves) - _has_canary(doc)}"


def _counts_text(counts: dict[str, int]) -> str:
    order = ["succeeded", "failed", "running", "waiting", "queued", "pending", "cancelled"]
    order += sorted(set(counts) - set(order))
    parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
    return ", ".join(parts) or "none"


def _reason(doc: dict[str, Any]) -> str:
    """Why it did not succeed: the halt's message, else what the counts say."""
    if doc.get("halted"):
        return shorten(str(doc["halted"].get("message") or doc["halted"].get("reason")), 300)
    if doc["state"] == "failed":
        return f"{doc['counts'].get('failed', 0)} of {doc['total']} databases failed"
    return ""
