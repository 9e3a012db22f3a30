"""What every `retort` command that talks to the API shares: the client, the output
mode, errors turned into the documented exit codes.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from service.client import (
    DEFAULT_URL,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ApiError,
    InvalidInput,
    PackError,
    RetortClient,
    Unreachable,
    default_token,
)

# `\b` keeps click from re-wrapping the table.
EXIT_CODES_HELP = """\b
Exit codes:
  0  succeeded, or nothing to do
  1  the migration failed (job failed or cancelled)
  2  usage or request error (also a redirect: use its URL)
  3  refused by a safety check, or waiting for approval
  4  timed out waiting (the job goes on)
  5  cannot reach Retort, authentication failed, or an unexpected error"""


@dataclass
class Cli:
    """What every pipeline command gets: the API client and the output mode."""

    api: RetortClient
    as_json: bool

    def echo(self, text: str = "") -> None:
        """Print human output (nothing in --json mode, where stdout is one document)."""
        if not self.as_json:
            click.echo(text)

    def document(self, doc: Any) -> None:
        """Print the one JSON document of --json mode (or an error document)."""
        click.echo(json.dumps(doc, indent=2))


def api_command(
    group: click.Group | None, name: str
) -> Callable[[Callable[..., int]], click.Command]:
    """Declare a pipeline command: shared --url/--token/--json, errors turned into exit codes.

    `group` None: a command defined at module level, added to a group later.
    """

    def decorate(func: Callable[..., int]) -> click.Command:
        @functools.wraps(func)
        def run(url: str, token: str | None, as_json: bool, **kwargs: Any) -> None:
            for stream in (sys.stdout, sys.stderr):
                # A non-UTF-8 terminal must not turn an arrow into a traceback.
                if hasattr(stream, "reconfigure"):
                    stream.reconfigure(errors="replace")
            try:
                # A token read from a file (a Kubernetes secret) often ends with a newline.
                token = (token or "").strip() or default_token()
                cli = Cli(RetortClient(url, token), as_json)
                code = func(cli, **kwargs)
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
            except Exception as exc:  # noqa: BLE001 - the last resort: never a traceback
                # Never 1, which tells the pipeline the migration failed: nothing
                # here says so. 5 is "could not get a usable answer from Retort".
                message = f"unexpected {type(exc).__name__}: {exc}"
                if as_json:
                    doc = {"error": {"code": "unexpected", "message": message, "details": {}}}
                    click.echo(json.dumps(doc, indent=2))
                else:
                    click.echo(f"error: {message}", err=True)
                code = EXIT_UNAVAILABLE
            raise click.exceptions.Exit(code)

        make = group.command if group is not None else click.command
        command = make(name, epilog=EXIT_CODES_HELP)(run)
        # Appended after the command's own parameters so they come last in --help.
        command.params += [
            click.Option(
                ["--url"],
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
