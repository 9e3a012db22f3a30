"""What every `retort` command that talks to the API shares: the client, the output
mode, errors turned into the documented exit codes.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from service.client import (
    DEFAULT_URL,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ApiError,
    InvalidInput,
    PackError,
    RetortClient,
    Unreachable,
    default_token,
)

# The table, once: in `retort --help` (the group's epilog) and README.md.
# `\b` keeps click from re-wrapping it.
EXIT_CODES_HELP = """\b
Exit codes:
  0  succeeded, or nothing to do
  1  the migration failed (job failed or cancelled)
  2  usage or request error (also a redirect: use its URL)
  3  refused by a safety check, waiting for approval, a plan's blocking
     findings, or drift found
  4  timed out waiting (the job goes on)
  5  cannot reach Retort, authentication failed, or an unexpected error"""
# What every subcommand's help ends with instead of the table.
EXIT_CODES_SEE = "Exit codes: see retort --help."


@dataclass
class Cli:
    """What every pipeline command gets: the API client and the output mode."""

    api: RetortClient
    as_json: bool

    def echo(self, text: str = "") -> None:
        """Print human output (nothing in --json mode, where stdout is one document)."""
        if not self.as_json:
            click.echo(text)

    def emit(self, doc: Any, show: Callable[[Any], None]) -> int:
        """Print `doc`: the JSON document in --json mode, else as `show` prints it; exit 0."""
        if self.as_json:
            self.document(doc)
        else:
            show(doc)
        return EXIT_OK

    def document(self, doc: Any) -> None:
        """Print the one JSON document of --json mode (or an error document)."""
        click.echo(json.dumps(doc, indent=2))


def api_command(
    group: click.Group | None, name: str, url_flag: str = "--url"
) -> Callable[[Callable[..., int]], click.Command]:
    """Declare a pipeline command: shared --url/--token/--json, errors turned into exit codes.

    `group` None: a command defined at module level, added to a group later.
    `url_flag`: the flag of Retort's URL, for a command whose own --url is a
    target database's (`retort database add`).
    """

    def decorate(func: Callable[..., int]) -> click.Command:
        @functools.wraps(func)
        def run(url: str, token: str | None, as_json: bool, **kwargs: Any) -> None:
            for stream in (sys.stdout, sys.stderr):
                # A non-UTF-8 terminal must not turn an arrow into a traceback.
                if hasattr(stream, "reconfigure"):
                    stream.reconfigure(errors="replace")
            code: int | None = None
            try:
                # A token read from a file (a Kubernetes secret) often ends with a newline.
                token = (token or "").strip() or default_token()
                cli = Cli(RetortClient(url, token), as_json)
                code = func(cli, **kwargs)
                sys.stdout.flush()  # a closed pipe shows here, not at exit
            except (ApiError, Unreachable, InvalidInput) as exc:
                if as_json:
                    click.echo(json.dumps(exc.document, indent=2))
                else:
                    auth = isinstance(exc, ApiError) and exc.status in (401, 403)
                    hint = "; set RETORT_TOKEN or --token" if auth else ""
                    click.echo(f"error: {exc}{hint}", err=True)
                code = exc.exit_code
            except PackError as exc:
                click.echo(f"error: {exc}", err=True)
                code = EXIT_USAGE
            except KeyboardInterrupt:
                click.echo("\ninterrupted; a job already requested goes on", err=True)
                code = 130  # the shell's convention for SIGINT
            except (click.ClickException, click.exceptions.Exit, click.Abort):
                raise  # click's own: usage errors print the usage and exit 2
            except OSError as exc:
                if not _closed_pipe(exc):
                    code = _unexpected(exc, as_json)
                else:
                    # `retort jobs | head -1`: the reader has all it wanted. Quietly,
                    # as Unix tools do; an outcome already known (a failed job's 1) stands.
                    _quiet_stdout()
                    code = EXIT_OK if code is None else code
            except Exception as exc:  # noqa: BLE001 - the last resort: never a traceback
                code = _unexpected(exc, as_json)
            raise click.exceptions.Exit(code)

        make = group.command if group is not None else click.command
        command = make(name, epilog=EXIT_CODES_SEE)(run)
        # Appended after the command's own parameters so they come last in --help.
        command.params += [
            click.Option(
                [url_flag, "url"],
                envvar="RETORT_URL",
                default=DEFAULT_URL,
                show_default=True,
                help="Retort's base URL (env RETORT_URL).",
            ),
            click.Option(
                ["--token"],
                envvar="RETORT_TOKEN",
                help="Bearer token (env RETORT_TOKEN; else ./retort-data/admin-token).",
            ),
            click.Option(["--json", "as_json"], is_flag=True, help="Print one JSON document."),
        ]
        return command

    return decorate


def _unexpected(exc: Exception, as_json: bool) -> int:
    """Report an error nothing else expected; exit 5.

    Never 1, which tells the pipeline the migration failed: nothing here says
    so. 5 is "could not get a usable answer from Retort".
    """
    message = f"unexpected {type(exc).__name__}: {exc}"
    try:
        if as_json:
            doc = {"error": {"code": "unexpected", "message": message, "details": {}}}
            click.echo(json.dumps(doc, indent=2))
        else:
            click.echo(f"error: {message}", err=True)
    except OSError as again:
        if not _closed_pipe(again):
            raise
        _quiet_stdout()
    return EXIT_UNAVAILABLE


def _closed_pipe(exc: OSError) -> bool:
    return isinstance(exc, BrokenPipeError) or exc.errno == errno.EPIPE


def _quiet_stdout() -> None:
    """Point stdout at /dev/null after its reader left.

    What is still buffered would be flushed at interpreter exit into the closed
    pipe and raise there, past every handler ("Exception ignored ...", exit 120):
    the descriptor is replaced, so that flush goes nowhere, quietly.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real descriptor (a test's capture): nothing to flush
        pass


# ---------------------------------------------------------------- human output


def print_table(headers: list[str], rows: list[list[str]], empty: str) -> None:
    """Print rows under headers in aligned columns, or `empty` when there is none."""
    if not rows:
        click.echo(empty)
        return
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def format_revs(revs: list[str]) -> str:
    return ", ".join(revs) if revs else "base (nothing applied)"


def format_time(iso: str | None) -> str:
    # 2024-05-01T12:34:56.789+00:00 -> 2024-05-01 12:34:56: enough for a table.
    return (iso or "")[:19].replace("T", " ")


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
