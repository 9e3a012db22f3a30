"""`retort audit`: verify the audit log through Retort, or offline from an export.

An auditor needs no access to Retort: `retort audit export` (a viewer of
every project) writes the events and the signed checkpoints as JSON lines,
and `retort audit verify --file F --public-key K` checks them with the public
key alone (service/audit/chain.py; no state database, no audit key).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from service.audit.actions import AuditAction
from service.audit.chain import ChainCheck, load_public_keys
from service.client import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from service.client_cli import Cli, api_command


def register(main: click.Group) -> None:
    @main.group()
    def audit() -> None:
        """The hash-chained, keyed audit log and its signed checkpoints."""

    @api_command(audit, "verify")
    @click.option(
        "--file",
        "file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Check an export offline (JSON lines from `retort audit export`), not via Retort.",
    )
    @click.option(
        "--public-key",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="With --file: the checkpoints' Ed25519 public key (PEM; <signing key>.pub).",
    )
    @click.option(
        "--checkpoints",
        "extra",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="With --file: checkpoints kept elsewhere (audit-checkpoints.jsonl, webhook "
        "payloads, log lines as JSON lines). Repeatable.",
    )
    def audit_verify(
        cli: Cli, file: Path | None, public_key: Path | None, extra: tuple[Path, ...]
    ) -> int:
        """Check the audit chain; exit 1 if an event was edited, inserted, removed or forged.

        Through Retort: every hash and HMAC, and the signed checkpoints. Offline
        (--file): every hash and link, and each signed checkpoint against the
        chain; what follows the last checkpoint is only as good as the export.
        """
        if file is None:
            if public_key or extra:
                raise click.UsageError("--public-key and --checkpoints go with --file")
            result = cli.api.get("/v1/audit/verify")
        else:
            if public_key is None:
                raise click.UsageError("--file needs --public-key (the checkpoints' PEM key)")
            result = verify_file(file, public_key, extra)
            if result is None:
                return EXIT_USAGE
        if cli.as_json:
            cli.document(result)
        else:
            click.echo(describe(result))
        return EXIT_OK if result["ok"] else EXIT_FAILED

    @api_command(audit, "export")
    @click.option(
        "-o",
        "--output",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write here (default: standard output).",
    )
    def audit_export(cli: Cli, output: Path | None) -> int:
        """Write every audit event and signed checkpoint as JSON lines (for an auditor)."""
        if output is None:
            cli.api.download("/v1/audit/export", sys.stdout.buffer)
            return EXIT_OK
        partial = output.with_name(output.name + ".partial")
        with open(partial, "wb") as out:
            size = cli.api.download("/v1/audit/export", out)
        partial.replace(output)
        cli.echo(f"wrote {output} ({size} bytes)")
        return EXIT_OK


def describe(result: dict[str, Any]) -> str:
    cps = result.get("checkpoints", 0)
    if result["ok"]:
        text = f"audit log intact: {result['events']} events, {cps} signed checkpoint(s)"
        if "pinned_through" in result:
            text += f"; signed through event {result['pinned_through']}"
        elif result.get("signatures") == "unchecked":
            text += " (signatures unchecked: no public key beside the signing key)"
        return text
    return (
        f"audit log BROKEN at event {result['first_bad']}: {result.get('reason') or 'mismatch'} "
        f"({result['events']} events checked)"
    )


def verify_file(file: Path, public_key: Path, extra: tuple[Path, ...]) -> dict[str, Any] | None:
    try:
        keys = load_public_keys(public_key.read_bytes())
    except ValueError as exc:
        click.echo(f"error: {public_key}: {exc}", err=True)
        return None
    check = ChainCheck(keyring=None)
    checkpoints: list[dict[str, Any]] = []
    broken = False
    for path in (file, *extra):
        with open(path, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    click.echo(f"error: {path}:{number}: not a JSON line", err=True)
                    return None
                if not isinstance(record, dict):
                    continue
                if record.get("type") == "checkpoint":
                    checkpoints.append(record)
                elif path == file and record.get("type") == "event" and not broken:
                    broken = not check.feed(record)
                    if record.get("action") == AuditAction.AUDIT_CHECKPOINT:
                        checkpoints.append({"type": "checkpoint", **(record.get("data") or {})})
    return check.result(checkpoints, keys)
